"""How many components of the target's own fields, and which weight: the bias-field stage's choices, on held-out heads.

N4's log-fields (``bidsharmony.image.field.head_grid``) of the shipped model's field subjects (TRAIN,
the model's ``preprocessing.field.subjects``) and of its validation heads under simulated scanners
(``truth`` = the head as acquired, the monotone scanners, the bias scanner) are measured once (N4:
~17 s a volume; ``--cache`` keeps them). Then, for each number K of principal components of the
TRAIN fields and each weight, every case is corrected as ``field.undo`` corrects it (the field moved
by w towards the nearest field the target's heads span, on the acquired intensities, standardised
afresh on the first grid and region) and scored by volume PSNR in the brain against the truth:

- ``size``: w = max(0, 1 − σ₀²/d²), the departure's size alone (the first version of the stage);
- ``gate``: w = 0 up to the largest leftover of any left-out TRAIN head, then 1 − σ₀²/d² (the stage's second version);
- ``soft``: w = max(0, 1 − d²_max/d²), continuous, the gate's threshold as σ₀² (the stage now).

No scanner with noise, blur or a tissue-contrast change is scored: the pipeline runs the field stage
only where the detail stage left the volume alone, which those move out of the target's band.

    python benchmarks/field_gate_probe.py [--components 0,2,4,6,8,10] [--eval-subjects 6] [--cache DIR]
"""

from __future__ import annotations

import time
from pathlib import Path

import common
import nibabel as nb
import numpy as np

from benchmarks.quality import run, scores
from bidsharmony.flow.checkpoint import model_landmarks, read_folder
from bidsharmony.image import field
from bidsharmony.image.resample import resample_isotropic, resample_onto
from bidsharmony.image.standardise import PERCENTILES, landmark_region, standardise, volume_landmarks
from bidsharmony.simulation import simulate

DATA = common.REPO.parent / "shared" / "data" / "ixi-hh"
MODEL = common.REPO / "bidsharmony" / "data" / "models" / "ixi-hh-fast"
SCANNERS = ("truth", "gamma0p7", "gamma1p5", "exp", "log", "bias")
RULES = ("size", "gate", "soft")


def weight(rule: str, grid: np.ndarray, typical: field.TypicalField) -> float:
    d2, _ = typical.weight(grid)
    if rule == "size":
        return max(0.0, 1.0 - typical.n4_var / d2)
    if rule == "soft":
        return max(0.0, 1.0 - typical.n4_gate / d2)
    return max(0.0, 1.0 - typical.n4_var / d2) if d2 > typical.n4_gate else 0.0


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--components", type=common.int_list, default=[0, 2, 4, 6, 8, 10])
    p.add_argument("--eval-subjects", type=int, default=6, help="the model's first N validation subjects")
    p.add_argument("--cache", type=Path, default=None, help="keep the N4 measurements here")
    p.add_argument("--name", default="field_gate_probe")
    args = p.parse_args()
    common.setup(args)
    if args.quick:
        args.components, args.eval_subjects = [0, 2], 1
    t0 = time.perf_counter()
    read = read_folder(MODEL)
    cfg = read[0]
    landmarks, _ = model_landmarks(MODEL, read)
    subjects = cfg["preprocessing"]["field"]["subjects"]
    held = ["sub-" + s for s in cfg["training_data"]["subjects_validation"][: args.eval_subjects]]
    fit_on = subjects[:5] if args.quick else subjects
    grids = common.field_grids(DATA, fit_on, landmarks, args.cache / f"train-{len(fit_on)}.npz" if args.cache else None)
    fits = {k: field.fit_from_grids(grids, k) for k in args.components}
    results: dict[tuple, list] = {}
    for sub in held:
        truth, mask, tissue = run.load_subject(DATA, sub)
        affine = nb.as_closest_canonical(nb.load(str(run.t1w_path(DATA, sub)))).affine
        for scanner in SCANNERS:
            src = truth if scanner == "truth" else simulate(scanner, truth, tissue, nb.affines.voxel_sizes(affine),
                                                            run.case_seed(0, sub, scanner))
            grid_src, gaff = resample_isotropic(src, affine, 1.2)
            region = landmark_region(grid_src)
            std = standardise(src, landmarks, source_landmarks=volume_landmarks(grid_src, region=lambda v, z, r=region: r))
            path = args.cache / f"{sub}_{scanner}.npz" if args.cache else None
            if path is not None and path.is_file():
                got = dict(np.load(path))
            else:
                got = field.measure(std, affine)
                if path is not None:
                    np.savez_compressed(path, **got)
            base = scores.volume_scores(std, truth, mask)["psnr_vol"]
            for k, typical in fits.items():
                nearest = typical.explained(got["grid"])
                for rule in RULES:
                    w = weight(rule, got["grid"], typical)
                    gain = 0.0
                    if w > 0:
                        c = np.where(got["head"], w * (field.from_grid(nearest, got["head"]) - got["g"]), 0.0).astype(np.float32)
                        fixed = (src * np.exp(c)).astype(np.float32)
                        after = volume_landmarks(resample_onto(fixed, affine, grid_src.shape, gaff), PERCENTILES, region=lambda v, z, r=region: r)
                        gain = scores.volume_scores(standardise(fixed, landmarks, source_landmarks=after), truth, mask)["psnr_vol"] - base
                    results.setdefault((scanner, k, rule), []).append((gain, w))
            print(sub, scanner, f"{base:.2f} dB", flush=True)
    rows = []
    for k, typical in fits.items():
        for rule in RULES:
            cells = [f"{np.mean([g for g, _ in results[(s, k, rule)]]):+.2f} ({np.mean([w for _, w in results[(s, k, rule)]]):.2f})"
                     for s in SCANNERS]
            worst = min(g for s in SCANNERS if s != "bias" for g, _ in results[(s, k, rule)])
            rows.append([str(k), rule, f"{typical.n4_var:.5f}", f"{typical.n4_gate:.5f}", *cells, f"{worst:+.2f}"])
    common.write_results(
        args, "cpu", args.name, "Probe: the bias-field stage's components and weight, held-out heads",
        common.table(["K", "weight", "σ₀²", "gate d²_max", *[s + (" (a field)" if s == "bias" else "") for s in SCANNERS],
                      "worst case without a field (dB)"], rows),
        [(f"Held-out heads: {', '.join(held)} (the shipped model's validation subjects, TRAIN split, used by none of its trainings). "
          "Cells: mean gain in volume PSNR (dB) in the brain over the standardised volume, and (mean w). "
          f"Own fields from the N4 grids of the model's {len(grids)} field subjects (TRAIN); σ₀² and the gate by leaving each out."),
         f"Whole run {time.perf_counter() - t0:.0f} s."],
        {"results": {f"{s}|{k}|{r}": v for (s, k, r), v in results.items()}, "held_out": held,
         "fits": {str(k): {"n4_var": t.n4_var, "n4_gate": t.n4_gate} for k, t in fits.items()}})


if __name__ == "__main__":
    main()
