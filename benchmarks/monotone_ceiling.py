"""How far can any volume-wide intensity map go on each simulated scanner? Held-out TRAIN subjects only.

The standardisation, histogram matching and Nyúl are all one monotone map of a volume's
intensities. This probe fits two such maps with the answer in hand (oracles): the source's brain
histogram matched onto the truth's (201 quantiles), and the non-decreasing function of the source's
intensity closest to the truth in the brain in least squares (isotonic regression of the truth's
robust-scaled intensities on the source's, ``scipy.optimize``). Neither is a strict bound under the
benchmark's score, which rescales each output by its own brain percentiles (isotonic regression
shrinks the extremes, and the rescaling then costs it), but both see the truth. Scored with the quality benchmark's volume
PSNR in the brain, beside the shipped model's blind standardisation (no mask, no truth) on the same
volumes. Where even these maps stay close to the untreated volume, no intensity map (blind or
not) can help, and a correction has to act in space: that is what the issue's +2 dB goals on the
bias, noise, blur and tissue-contrast scanners ask of a second stage.

    python benchmarks/monotone_ceiling.py [--subjects 4]
"""

from __future__ import annotations

import json
import time

import common
import nibabel as nb
import numpy as np

from benchmarks.quality import run, scores
from bidsharmony.flow.checkpoint import model_landmarks
from bidsharmony.image.standardise import grid_landmarks, standardise
from bidsharmony.simulation import SCANNERS, simulate

DATA = common.REPO.parent / "shared" / "data" / "ixi-hh"
MODEL = common.REPO / "bidsharmony" / "data" / "models" / "ixi-hh-fast"
QUANTILES = np.linspace(0.0, 100.0, 201)


def quantile_map(source: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The source's brain histogram matched onto the truth's (an oracle)."""
    return np.interp(source, np.percentile(source[mask], QUANTILES), np.percentile(truth[mask], QUANTILES)).astype(np.float32)


def isotonic_map(source: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The least-squares non-decreasing map of the source's brain voxels onto the truth's (an oracle)."""
    from scipy.optimize import isotonic_regression

    order = np.argsort(source[mask], kind="stable")
    fitted = np.empty(order.size)
    fitted[order] = isotonic_regression(scores.robust_scale(truth, mask)[mask][order]).x
    out = np.zeros(source.shape, np.float32)
    out[mask] = fitted
    return out


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--subjects", type=int, default=4, help="held-out TRAIN subjects (the last ones)")
    p.add_argument("--name", default="monotone_ceiling")
    args = p.parse_args()
    common.setup(args)
    t0 = time.perf_counter()
    held_out = sorted(json.loads((DATA / "splits.json").read_text())["train"])[-args.subjects:]
    landmarks = model_landmarks(MODEL)[0]
    found: dict[str, list] = {}
    for sub in held_out:
        truth, mask, tissue = run.load_subject(DATA, sub)
        affine = nb.as_closest_canonical(nb.load(str(run.t1w_path(DATA, sub)))).affine
        zooms = nb.affines.voxel_sizes(affine)
        for name in SCANNERS:
            src = simulate(name, truth, tissue, zooms, run.case_seed(0, sub, name))
            none = scores.score_volume(src, truth, mask)["psnr_vol"]
            best = max(min(scores.score_volume(f(src, truth, mask), truth, mask)["psnr_vol"], 99.0) for f in (quantile_map, isotonic_map))
            std = standardise(src, landmarks, source_landmarks=grid_landmarks(src, affine)[0])
            blind = scores.score_volume(std, truth, mask)["psnr_vol"]
            found.setdefault(name, []).append((none, best, blind))
            print(sub, name, f"untreated {none:.2f} dB, oracle map {best:.2f} dB, standardised {blind:.2f} dB", flush=True)
    rows = [[f"{name} ({SCANNERS[name].kind})", *[f"{np.mean([r[i] for r in v]):.2f}" for i in range(3)],
             f"{np.mean([r[1] - r[0] for r in v]):+.2f}", f"{np.mean([r[2] - r[0] for r in v]):+.2f}"] for name, v in found.items()]
    common.write_results(
        args, "cpu", args.name, "Probe: how far a volume-wide intensity map can go on each simulated scanner (oracles)",
        common.table(["scanner", "untreated (dB)", "the better oracle map (dB)", "standardised, blind (dB)", "oracle's gain",
                      "standardisation's gain"], rows),
        [(f"Held-out TRAIN subjects: {', '.join(held_out)}; volume PSNR in the brain against the truth (capped at 99 dB); "
         "the oracle: the better of two maps fitted on the truth itself in the brain (its histogram matched; isotonic regression); "
         "not a strict bound (the score rescales each output by its own brain percentiles), but a map that sees the answer."),
         f"Whole run {time.perf_counter() - t0:.0f} s."],
        {"psnr_vol": found})


if __name__ == "__main__":
    main()
