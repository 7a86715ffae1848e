"""Figures saved with a trained model: samples at three temperatures and the training curve."""

from __future__ import annotations

from pathlib import Path

TEMPERATURES = (0.5, 0.75, 1.0)


def save_figures(flow, history: dict, out_dir, seed: int = 0, per_row: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from bidsharmony.flow.scaling import from_flow

    out_dir = Path(out_dir)
    gen = torch.Generator(device=next(flow.parameters()).device).manual_seed(seed)
    fig, axes = plt.subplots(len(TEMPERATURES), per_row, figsize=(per_row * 1.6, len(TEMPERATURES) * 1.9))
    for r, t in enumerate(TEMPERATURES):
        imgs = from_flow(flow.sample(per_row, temperature=t, generator=gen)).cpu().numpy()
        for c in range(per_row):
            ax = axes[r, c]
            ax.imshow(imgs[c, 0].T, cmap="gray", origin="lower", vmin=0, vmax=1)
            ax.set_axis_off()
        axes[r, 0].set_title(f"T = {t}", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(out_dir / "samples.png", dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    if history.get("step"):
        ax.plot(history["step"], history["train_bpd"], lw=0.6, alpha=0.6, label="train")
    if history.get("val_step"):
        ax.plot(history["val_step"], history["val_bpd"], "o-", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("bits / dim")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "training_curve.png", dpi=90)
    plt.close(fig)
