"""Detail matching (bidsharmony.image.detail) after the standardisation, on held-out TRAIN subjects.

The band is fitted on the first --fit TRAIN subjects (1.2 mm grid, standardised with the shipped
model's landmarks); the simulated scanners are made from the last --subjects TRAIN subjects (held
out of the band's fit; never TEST, so that nothing about the stage is chosen on the benchmark's
subjects), standardised as the pipeline does (landmarks on the 1.2 mm volume, map on the native
voxels), then detail-matched on the native grid. Scored with the benchmark's functions against the
truth in the brain.

    python benchmarks/detail_probe.py [--fit 30] [--subjects 3] [--scanners gamma0p7,noise,blur]
"""

from __future__ import annotations

import json
import time

import common
import nibabel as nb
import numpy as np

from benchmarks.quality import run, scores
from bidsharmony.flow.checkpoint import model_landmarks
from bidsharmony.image.detail import detail_level, fit_band, match_detail
from bidsharmony.image.resample import resample_isotropic
from bidsharmony.image.standardise import standardise, volume_landmarks
from bidsharmony.simulation import SCANNERS, simulate

DATA = common.REPO.parent / "shared" / "data" / "ixi-hh"
MODEL = common.REPO / "bidsharmony" / "data" / "models" / "ixi-hh-fast"
VOXEL = 1.2


def standardised(v, affine, landmarks):
    """(native standardised, 1.2 mm standardised, 1.2 mm affine): the pipeline's stage 1."""
    v12, a12 = resample_isotropic(v, affine, VOXEL)
    source = volume_landmarks(v12)
    return standardise(v, landmarks, source_landmarks=source), standardise(v12, landmarks, source_landmarks=source), a12


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--fit", type=int, default=30, help="TRAIN subjects the band is fitted on (the first ones)")
    p.add_argument("--subjects", type=int, default=3, help="held-out TRAIN subjects the scanners are made from (the last ones)")
    p.add_argument("--scanners", default=",".join(SCANNERS))
    p.add_argument("--name", default="detail_probe")
    args = p.parse_args()
    common.setup(args)
    t0 = time.perf_counter()
    train = sorted(json.loads((DATA / "splits.json").read_text())["train"])
    landmarks, _ = model_landmarks(MODEL)

    def affine_of(sub):
        return nb.as_closest_canonical(nb.load(str(run.t1w_path(DATA, sub)))).affine

    levels = []
    for sub in train[: args.fit]:
        v = run.load_canonical(run.t1w_path(DATA, sub))
        levels.append(detail_level(standardised(v, affine_of(sub), landmarks)[1]))
    band = fit_band(levels)
    print(f"band {np.round(band, 3).tolist()} from {args.fit} TRAIN subjects ({time.perf_counter() - t0:.0f} s)", flush=True)

    rows, times = [], []
    for sub in train[-args.subjects:]:
        truth, mask, tissue = run.load_subject(DATA, sub)
        affine = affine_of(sub)
        for name in args.scanners.split(","):
            src = simulate(name, truth, tissue, nb.affines.voxel_sizes(affine), run.case_seed(0, sub, name))
            std, std12, a12 = standardised(src, affine, landmarks)
            t = time.perf_counter()
            out, rec = match_detail(std, affine, band, (std12.shape, a12))
            times.append(time.perf_counter() - t)
            for method, vol in (("standardise", std), ("standardise + detail", out)):
                rows.append({"subject": sub, "scanner": name, "method": method, "action": rec["Action"],
                             "weight": rec["Weight"], "level": rec["Level"], **scores.score_volume(vol, truth, mask)})
            a, b = rows[-2], rows[-1]
            print(f"{sub} {name:9s} level {rec['Level']:.3f} → {rec['LevelReached']:.3f} {rec['Action']:8s} w {rec['Weight']:.2f}: "
                  f"PSNR {a['psnr_vol']:.2f} → {b['psnr_vol']:.2f}, Dice {a['dice']:.3f} → {b['dice']:.3f} ({times[-1]:.1f} s)", flush=True)

    table = []
    for name in args.scanners.split(","):
        a = [r for r in rows if r["scanner"] == name and r["method"] == "standardise"]
        b = [r for r in rows if r["scanner"] == name and r["method"] != "standardise"]
        pa, pb = np.mean([r["psnr_vol"] for r in a]), np.mean([r["psnr_vol"] for r in b])
        table.append([name, ", ".join(sorted({r["action"] for r in b})), round(pa, 2), round(pb, 2), f"{pb - pa:+.2f}",
                      round(float(np.mean([r["dice"] for r in a])), 3), round(float(np.mean([r["dice"] for r in b])), 3)])
    common.write_results(
        args, "cpu", args.name, "Probe: detail matching after the standardisation",
        common.table(["scanner", "action", "PSNR vol, standardise (dB)", "+ detail (dB)", "Δ", "Dice, standardise", "+ detail"], table),
        [f"Band (min, mean, max) from the first {args.fit} TRAIN subjects: {np.round(band, 4).tolist()}.",
         f"Held-out TRAIN subjects: {', '.join(train[-args.subjects:])}; median {np.median(times):.1f} s per volume for the "
         f"matching; whole run {time.perf_counter() - t0:.0f} s."],
        {"band": band.tolist(), "rows": rows})

if __name__ == "__main__":
    main()
