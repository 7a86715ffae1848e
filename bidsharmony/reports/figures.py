"""The report's figures (matplotlib, PNG): before/after/difference views, histograms, convergence."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bidsharmony.metrics import HISTOGRAM_BINS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Atomic: a figure appears whole or not at all."""
    from bidsharmony.outputs import atomic_save

    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    _plt().close(fig)


def _views(v: np.ndarray, centre) -> list[np.ndarray]:
    """Sagittal, coronal and axial sections through ``centre`` of a RAS array (rotated so that
    superior or anterior is up; neurological convention: the subject's right on the right)."""
    i, j, k = centre
    return [np.rot90(v[i, :, :]), np.rot90(v[:, j, :]), np.rot90(v[:, :, k])]


def before_after(before: np.ndarray, after: np.ndarray, path: Path, title: str) -> None:
    """3 rows (sagittal, coronal, axial) × before | after | difference (after − before), both
    images on the same grey scale so a change of contrast is visible as such."""
    plt = _plt()
    mask = before > 0.1 * np.percentile(before, 99)
    centre = [int(np.median(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))))) for ax in range(3)]
    lo, hi = np.percentile(np.concatenate([before[mask], after[mask]]), [0.5, 99.5])
    diff = after - before
    dmax = float(np.percentile(np.abs(diff[mask]), 99.5)) or 1.0
    fig, axes = plt.subplots(3, 3, figsize=(9, 9))
    for r, (b, a, d) in enumerate(zip(_views(before, centre), _views(after, centre), _views(diff, centre))):
        axes[r, 0].imshow(b, cmap="gray", vmin=lo, vmax=hi)
        axes[r, 1].imshow(a, cmap="gray", vmin=lo, vmax=hi)
        im = axes[r, 2].imshow(d, cmap="RdBu_r", vmin=-dmax, vmax=dmax)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(("sagittal", "coronal", "axial")[r])
    for c, name in enumerate(("before (input)", "after (harmonized)", "difference (after − before)")):
        axes[0, c].set_title(name, fontsize=10)
    fig.colorbar(im, ax=axes[:, 2], shrink=0.6, label="intensity change")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def histograms(before: np.ndarray, after: np.ndarray, target: np.ndarray | None, path: Path, title: str) -> None:
    """Densities of the normalised slice intensities the flow sees: input, output, target domain."""
    plt = _plt()
    x = (np.arange(HISTOGRAM_BINS) + 0.5) / HISTOGRAM_BINS
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(x, before, label="input", color="tab:orange")
    ax.plot(x, after, label="harmonized", color="tab:blue")
    if target is not None:
        ax.fill_between(x, target, color="0.6", alpha=0.4, label="target domain (model)")
    ax.set_xlabel("normalised intensity (per-slice min–max)")
    ax.set_ylabel("density")
    ax.legend(frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def convergence(trace: dict, path: Path, title: str) -> None:
    """The loop's objective terms per iteration (means over slices)."""
    plt = _plt()
    keys = [k for k in ("similarity", "gradient_l1", "z_norm") if trace.get(k)]
    labels = {"similarity": "similarity to the input", "gradient_l1": "masked edge term |M G x|₁", "z_norm": "latent norm |z|"}
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(3.3 * max(len(keys), 1), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.plot(range(1, len(trace[k]) + 1), trace[k], marker="o", ms=3)
        ax.set_title(labels[k], fontsize=9)
        ax.set_xlabel("iteration")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
