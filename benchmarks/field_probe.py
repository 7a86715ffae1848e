"""Bias-field stage (``bidsharmony.image.field``) on held-out heads: N4 shrunk towards the target's typical field, gated by the detail stage.

The target's typical field is fitted on ``--train-subjects`` IXI-HH TRAIN volumes (the model's
validation subjects excluded), standardised with the shipped model's landmarks. Each held-out head (the
shipped model's validation subjects, used by none of its trainings) goes through the benchmark's
simulated scanners and is scored by volume PSNR in the brain against the truth:

* ``field``: the stage on every volume (``field.undo``: N4's field beyond what the target's own heads
  span, shrunk by w = 1 − d²_max/d², undone on the source's own intensities, then standardised afresh on the first
  standardisation's grid and region), as a gain over the standardised volume;
* the pipeline's order: the detail stage (learned denoiser behind its gate, or sharpening), then the
  field only where the detail stage left the volume alone (its level in the target's band), as a gain
  over the detail stage alone.

    python benchmarks/field_probe.py [--train-subjects 30] [--eval-subjects 4] [--cache DIR] [--shipped]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import common
import nibabel as nb
import numpy as np

from benchmarks.quality import run, scores
from bidsharmony.flow.checkpoint import (
    model_denoiser,
    model_detail_band,
    model_detail_voxel,
    model_field,
    model_landmarks,
    read_folder,
)
from bidsharmony.image import field
from bidsharmony.image.detail import match_detail
from bidsharmony.image.resample import resample_isotropic
from bidsharmony.image.standardise import PERCENTILES, landmark_region, standardise, volume_landmarks
from bidsharmony.simulation import SCANNERS as KNOWN
from bidsharmony.simulation import simulate

DATA = common.REPO.parent / "shared" / "data" / "ixi-hh"
MODEL = common.REPO / "bidsharmony" / "data" / "models" / "ixi-hh-fast"
SCANNERS = ("bias", "truth", "gamma0p7", "gamma1p5", "exp", "noise", "blur", "contrast")


def typical(subjects, landmarks, cache: Path | None, components: int) -> field.TypicalField:
    path = cache / f"typical-grids-{len(subjects)}.npz" if cache else None
    return field.fit_from_grids(common.field_grids(DATA, [s.removeprefix("sub-") for s in subjects], landmarks, path), components)


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--train-subjects", type=int, default=30)
    p.add_argument("--eval-subjects", type=int, default=4, help="the model's first N validation subjects, scored")
    p.add_argument("--scanners", default=",".join(SCANNERS))
    p.add_argument("--cache", type=Path, default=None, help="keep the TRAIN heads' N4 grids here (N4 takes ~17 s a volume)")
    p.add_argument("--components", type=int, default=field.COMPONENTS, help="principal components of the heads' own fields kept")
    p.add_argument("--shipped", action="store_true", help="use the shipped model's own typical field (its 30 field subjects) instead of fitting one")
    p.add_argument("--name", default="field_probe")
    args = p.parse_args()
    common.setup(args)
    if args.quick:
        args.train_subjects, args.eval_subjects, args.scanners = 3, 1, "bias,truth"
    scanners = [s for s in args.scanners.split(",") if s]
    unknown = [s for s in scanners if s != "truth" and s not in KNOWN]
    if unknown:
        p.error(f"unknown scanners: {unknown}")
    t0 = time.perf_counter()
    read = read_folder(MODEL)
    cfg = read[0]
    landmarks, _ = model_landmarks(MODEL, read)
    band, voxel, net = model_detail_band(MODEL, read), model_detail_voxel(MODEL, read), model_denoiser(MODEL, read)
    validation = ["sub-" + s for s in cfg["training_data"]["subjects_validation"]]
    held = validation[: args.eval_subjects]
    train = [s for s in sorted(json.loads((DATA / "splits.json").read_text())["train"]) if s not in validation][: args.train_subjects]
    if args.shipped:
        typ, train = model_field(MODEL, read), ["sub-" + s for s in cfg["preprocessing"]["field"]["subjects"]]
    else:
        typ = typical(train, landmarks, args.cache, args.components)
    t_train = time.perf_counter() - t0
    cols = ["standardised (dB)", "+ field", "w", "seconds", "detail stage alone (dB)", "detail action", "pipeline: + field where in band"]
    results: dict[tuple[str, str], list] = {}
    for sub in held:
        truth, mask, tissue = run.load_subject(DATA, sub)
        affine = nb.as_closest_canonical(nb.load(str(run.t1w_path(DATA, sub)))).affine
        for scanner in scanners:
            src = truth if scanner == "truth" else simulate(scanner, truth, tissue, nb.affines.voxel_sizes(affine),
                                                            run.case_seed(0, sub, scanner))
            grid_src, gaff = resample_isotropic(src, affine, 1.2)  # the pipeline's grid: landmarks are measured there
            grid = (grid_src.shape, gaff)
            std = standardise(src, landmarks, source_landmarks=volume_landmarks(grid_src))
            t1 = time.perf_counter()
            fixed, rec = field.undo(src, affine, std, typ, landmarks, PERCENTILES, grid, landmark_region(grid_src))
            seconds = time.perf_counter() - t1

            def psnr(x, truth=truth, mask=mask):
                return min(scores.volume_scores(x, truth, mask)["psnr_vol"], 99.0)

            base = psnr(std)
            detailed, detail = match_detail(std, affine, band, grid, voxel, net)
            alone = psnr(detailed)
            piped = psnr(fixed) - alone if detail["Action"] == "none" else 0.0
            values = [base, psnr(fixed) - base, rec["Weight"], seconds, alone, detail["Action"], piped]
            row = dict(zip(cols, values, strict=True))
            for k, val in row.items():
                results.setdefault((scanner, k), []).append(val)
            print(sub, scanner, "; ".join(f"{k} {val}" for k, val in row.items()), flush=True)
    plain = {"standardised (dB)", "detail stage alone (dB)", "w", "seconds"}

    def cell(s, c):
        v = results[(s, c)]
        if c == "detail action":
            return ", ".join(sorted(set(v)))
        return f"{np.mean(v):.2f}" if c in plain else f"{np.mean(v):+.2f}"

    rows = [[s + (" (a field)" if s == "bias" else ""), *[cell(s, c) for c in cols]] for s in scanners]
    common.write_results(
        args, "cpu", args.name, "Probe: the bias-field stage (N4's field beyond what the target's own heads span, shrunk), held-out heads",
        common.table(["scanner", *cols], rows),
        [f"Held-out heads: {', '.join(held)} (the shipped model's validation subjects, TRAIN split, used by none of its trainings). "
         "Gains in volume PSNR (dB) in the brain: '+ field' over the standardised volume (the stage on every volume), the last "
         "column over the detail stage alone (the pipeline: the field only where the detail stage did nothing, else +0). "
         "Means over the heads; w: the shrinkage weight.",
         f"Typical field {'of the shipped model, ' if args.shipped else ''}from {len(train)} IXI-HH TRAIN volumes (validation subjects excluded), {len(typ.n4_basis)} principal "
         f"components of their own fields; a left-out head's leftover σ₀² = {typ.n4_var:.5f}; "
         f"{t_train:.0f} s (or read from --cache).",
         f"Whole run {time.perf_counter() - t0:.0f} s."],
        {"results": {f"{s}|{c}": v for (s, c), v in results.items()}, "n4_var": typ.n4_var, "components": len(typ.n4_basis), "train": train, "held_out": held})


if __name__ == "__main__":
    main()
