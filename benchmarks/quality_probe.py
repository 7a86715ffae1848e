"""A quick quality probe that chose the loop's defaults (start image, similarity).

Not the full quality benchmark: simulated source scanners are made from central slices of IXI-HH
TEST subjects (docs/method.md §4 transforms, a smooth multiplicative bias, Rician-like noise; each
slice min-max rescaled), harmonized with a model, and scored by PSNR against the true target slice
(the papers' protocol: per-slice min-max to [0, 1]).

    bidsharmony ../shared/data/ixi-hh /tmp/ixi-fast train --preset fast --steps 1000 \\
        --train-batch-size 32 --learning-rate 1e-3 --validation-fraction 0.05 --augment \\
        --participant-label <the 150 TRAIN labels of splits.json>
    python benchmarks/quality_probe.py /tmp/ixi-fast [--subjects 2 --slices 20]
"""

from __future__ import annotations

import json
import time

import common
import numpy as np
import torch

from bidsharmony.flow.checkpoint import load_model
from bidsharmony.harmonize.solvers import HarmonizeParams, harmonize_slices
from bidsharmony.harmonize.volume import START_IMAGES
from bidsharmony.image.io import load_t1w
from bidsharmony.image.resample import canonical, resample_isotropic
from bidsharmony.image.slices import cut

DATA = common.REPO.parent / "shared" / "data" / "ixi-hh"
CONFIGS = {
    "source start, cosine": dict(start="source", similarity="cosine"),
    "mean start, cosine (published)": dict(start="mean", similarity="cosine"),
    "mean start, ncc": dict(start="mean", similarity="ncc"),
    "mean start, ncc, beta_fid=0": dict(start="mean", similarity="ncc", beta_fidelity=0.0),
}


def minmax(a):
    lo, hi = a.min((1, 2), keepdims=True), a.max((1, 2), keepdims=True)
    return (a - lo) / np.maximum(hi - lo, 1e-8)


def psnr(a, b) -> float:
    return float(np.mean([10 * np.log10(1.0 / np.mean((a[i] - b[i]) ** 2)) for i in range(len(a))]))


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("model")
    p.add_argument("--subjects", type=int, default=2)
    p.add_argument("--slices", type=int, default=20, help="central slices per subject")
    args = p.parse_args()
    device = common.setup(args)
    model = load_model(args.model, device=device)
    test = json.loads((DATA / "splits.json").read_text())["test"][: args.subjects]
    truth, bins = [], []
    for s in test:
        img, data = load_t1w(DATA / s / "anat" / f"{s}_T1w.nii.gz")
        slices, rec = cut(resample_isotropic(*canonical(data, img.affine), 1.2)[0])
        idx = np.flatnonzero(rec.harmonize & (rec.position > 0.35) & (rec.position < 0.85))[::4][: args.slices]
        truth.append(slices[idx])
        bins.append(rec.position_bin[idx])
    g, pb = np.concatenate(truth), np.concatenate(bins)
    h, w = g.shape[1:]
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    rng = np.random.default_rng(0)
    transforms = {
        "gamma 0.7": lambda x: x**0.7,
        "gamma 1.5": lambda x: x**1.5,
        "exp": np.exp,
        "log": lambda x: np.log1p(3 * x),
        "bias field": lambda x: x * (1 + 0.35 * (0.8 * xx + 0.6 * yy)),
        "Rician noise": lambda x: np.sqrt((x + rng.normal(0, 0.04, x.shape)) ** 2 + rng.normal(0, 0.04, x.shape) ** 2),
    }
    start = model.extras[START_IMAGES][torch.as_tensor(pb)]
    rows, t0 = [], time.perf_counter()
    for name, t in transforms.items():
        src = minmax(t(g).astype(np.float32))
        row = {"transform": name, "none": psnr(src, g)}
        for cname, kw in CONFIGS.items():
            params = HarmonizeParams(batch_size=8, iterations=10, **kw)  # the published loop (the CLI's default runs none)
            out = harmonize_slices(model.flow, torch.from_numpy(src), params, start=start if params.start == "mean" else None, device=device)
            row[cname] = psnr(out.numpy(), g)
        rows.append(row)
    cols = ["transform", "none", *CONFIGS]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join([r["transform"]] + [f"{r[c]:.2f}" for c in cols[1:]]) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    notes = (
        f"PSNR (dB) against the true target slice, {len(g)} slices of {len(test)} IXI-HH test subjects; "
        f"model {model.name} ({model.config.get('preset')}, validation {model.config.get('validation_bpd')} bits/dim, "
        f"sha256 {model.sha256[:12]}…); 10 iterations, alpha 1e-3, beta_fid 1e3, beta_grad 1e-3; {time.perf_counter() - t0:.0f} s."
    )
    common.write_results(args, device, "quality_probe", "Quality probe: which start and similarity", table, [notes], {"rows": rows, "model_sha256": model.sha256})


if __name__ == "__main__":
    main()
