"""Probe of the loop's latent shrink α and of the start image on slices of simulated scanners.

Why α stays 1e-3 and the start stays 'source' (README, "What the defaults rest on"). Needs the
benchmark's simulated dataset (python -m benchmarks.quality ... --work DIR) and ixi-hh:

    python benchmarks/alpha_probe.py --sim DIR/sim --subject sub-IXI012 --scanners gamma0p7,bias,contrast,noise,gamma1p5

12 central axial slices (every 5th of the central 60) on the 1.2 mm grid, harmonized with the
bundled model; PSNR per slice after per-slice min-max (the papers' protocol) against the true
target slices cut on the source's grid. Prints one row per scanner.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bidsharmony.flow.checkpoint import load_model
from bidsharmony.harmonize.solvers import HarmonizeParams, harmonize_slices
from bidsharmony.image.io import load_t1w
from bidsharmony.image.resample import canonical, resample_isotropic
from bidsharmony.image.slices import cut
from bidsharmony.models import default_model

LOOP_ITERATIONS = 10  # the published loop (the CLI's default runs none)
CONFIGS = {"α 1e-3 (default)": {}, "α 0.01": {"alpha": 0.01}, "α 0.02": {"alpha": 0.02}, "α 0.03": {"alpha": 0.03},
           "mean start": {"start": "mean"}, "mean start, α 0": {"start": "mean", "alpha": 0.0}}


def prep(path):
    img, d = load_t1w(path)
    vol = resample_isotropic(*canonical(d, img.affine), 1.2)[0]
    slices, record = cut(vol)
    return slices, record, vol


def psnr(a, b) -> float:
    def mm(x):
        return (x - x.min()) / (x.max() - x.min() + 1e-8)

    return float(np.mean([10 * np.log10(1 / np.mean((mm(x) - mm(y)) ** 2)) for x, y in zip(a, b)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sim", type=Path, required=True)
    p.add_argument("--data", type=Path, default=Path("../shared/data/ixi-hh"))
    p.add_argument("--subject", default="sub-IXI012")
    p.add_argument("--scanners", default="gamma0p7,bias,contrast,noise,gamma1p5")
    args = p.parse_args()
    torch.manual_seed(0)
    model = load_model(default_model())
    _, rec, tvol = prep(args.data / args.subject / "anat" / f"{args.subject}_T1w.nii.gz")
    idx = np.flatnonzero(rec.harmonize)
    idx = idx[len(idx) // 2 - 30: len(idx) // 2 + 30: 5]
    print("| scanner | none | " + " | ".join(CONFIGS) + " |")
    print("|---" * (len(CONFIGS) + 2) + "|")
    for sc in args.scanners.split(","):
        src, r2, _ = prep(args.sim / args.subject / f"ses-{sc}" / "anat" / f"{args.subject}_ses-{sc}_T1w.nii.gz")
        truth, _ = cut(tvol, offset=r2.offset)  # the truth on the source's grid: the same anatomy per slice
        row = [psnr(src[idx], truth[idx])]
        for cfg in CONFIGS.values():
            params = HarmonizeParams(**{"iterations": LOOP_ITERATIONS, **cfg}).validate()
            start = model.extras["start_images"][torch.as_tensor(r2.position_bin[idx])] if params.start == "mean" else None
            out = harmonize_slices(model.flow, torch.from_numpy(src[idx]), params, start=start).numpy()
            row.append(psnr(out, truth[idx]))
        print(f"| {sc} | " + " | ".join(f"{v:.2f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
