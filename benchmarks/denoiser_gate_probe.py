"""Is the learned denoiser's gate needed, and where does it cost? The model's validation heads only.

The detail stage applies the shipped learned denoiser's change with the gate's weight (0 inside the
detail band, 1 from half the band's width above it). This probe applies it at fixed weights 0, ½ and
1 on every simulated scanner, on heads none of the model's trainings used (its validation subjects,
TRAIN split), and reports volume PSNR and tissue Dice against the truth beside the level and the
weight the gate gives. Where full weight costs on a scanner the gate keeps off, the gate is needed;
where the gate runs the network, the columns say what it gains there.

    python benchmarks/denoiser_gate_probe.py [--eval-subjects 2]
"""

from __future__ import annotations

import time

import common
import nibabel as nb
import numpy as np

from benchmarks.quality import run, scores
from bidsharmony.flow.checkpoint import model_denoiser, model_detail_band, model_detail_voxel, model_landmarks, read_folder
from bidsharmony.image.denoiser import denoise
from bidsharmony.image.detail import match_detail
from bidsharmony.image.resample import resample_isotropic
from bidsharmony.image.standardise import grid_landmarks, standardise
from bidsharmony.simulation import SCANNERS, simulate

DATA = common.REPO.parent / "shared" / "data" / "ixi-hh"
MODEL = common.REPO / "bidsharmony" / "data" / "models" / "ixi-hh-fast"
WEIGHTS = (0.0, 0.5, 1.0)


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--eval-subjects", type=int, default=2, help="the model's first N validation subjects")
    p.add_argument("--name", default="denoiser_gate_probe")
    args = p.parse_args()
    common.setup(args)
    t0 = time.perf_counter()
    read = read_folder(MODEL)
    landmarks, _ = model_landmarks(MODEL, read)
    net, band, voxel = model_denoiser(MODEL, read), model_detail_band(MODEL, read), model_detail_voxel(MODEL, read)
    held = ["sub-" + s for s in read[0]["training_data"]["subjects_validation"][: 1 if args.quick else args.eval_subjects]]
    scanners = ["truth", *(["noise", "contrast"] if args.quick else SCANNERS)]
    res: dict[tuple[str, str], list] = {}
    for sub in held:
        truth, mask, tissue = run.load_subject(DATA, sub)
        affine = nb.as_closest_canonical(nb.load(str(run.t1w_path(DATA, sub)))).affine
        truth_seg = scores.segment(truth, mask)
        grid = resample_isotropic(truth, affine, 1.2)  # the harmonization grid the level is measured on
        for scanner in scanners:
            src = truth if scanner == "truth" else simulate(scanner, truth, tissue, nb.affines.voxel_sizes(affine), run.case_seed(0, sub, scanner))
            std = standardise(src, landmarks, source_landmarks=grid_landmarks(src, affine)[0])
            _, rec = match_detail(std, affine, band, (grid[0].shape, grid[1]), voxel, net)  # the stage itself: its level and weight
            change = denoise(net, std, affine) - std
            row = {"level": rec["Level"], "gate weight": rec["Weight"] if rec.get("Denoiser") == "learned" else 0.0}
            for w in WEIGHTS:
                out = std + w * change
                row[f"PSNR w={w:g}"] = scores.volume_scores(out, truth, mask)["psnr_vol"]
                row[f"Dice w={w:g}"] = scores.tissue_dice(out, truth, mask, truth_seg)["dice"]
            for k, v in row.items():
                res.setdefault((scanner, k), []).append(v)
            print(sub, scanner, "; ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    cols = ["level", "gate weight", *[f"PSNR w={w:g}" for w in WEIGHTS], *[f"Dice w={w:g}" for w in WEIGHTS]]
    rows = [[s, *[f"{np.mean(res[(s, c)]):.3f}" if c.startswith(("level", "gate", "Dice")) else f"{np.mean(res[(s, c)]):.2f}"
                  for c in cols]] for s in scanners]
    common.write_results(
        args, "cpu", args.name, "Probe: the learned denoiser at fixed weights, the model's validation heads",
        common.table(["scanner", *cols], rows),
        [(f"Held-out heads: {', '.join(held)} (the shipped model's validation subjects, TRAIN split, used by none of its trainings); "
          f"the model's detail band {band[0]:.3f}–{band[2]:.3f}. Volume PSNR (dB) and k-means tissue Dice in the brain against the "
          "truth, after the standardisation and the network's change at weight w (the gate weight: what the detail stage applies)."),
         f"Whole run {time.perf_counter() - t0:.0f} s."],
        {"results": {f"{s}|{c}": v for (s, c), v in res.items()}, "held_out": held})


if __name__ == "__main__":
    main()
