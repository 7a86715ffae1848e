"""How far can any volume-wide intensity map go on each simulated scanner? Held-out TRAIN subjects only.

The standardisation, histogram matching and Nyúl are all one monotone map of a volume's
intensities. This probe computes the best such map with the answer in hand: each source volume's
brain voxels mapped onto the truth's by rank (a smooth version: the map through 201 quantiles of
source and truth in the brain, applied to every voxel). Scored with the quality benchmark's volume
PSNR in the brain. Where this bound lies close to the untreated volume, no intensity map (blind or
not) can help, and a correction has to act in space: that is what the issue's +2 dB goals on the
bias, noise, blur and tissue-contrast scanners ask of a second stage.

    python benchmarks/monotone_ceiling.py [--subjects 2]
"""

from __future__ import annotations

import json
import time

import common
import nibabel as nb
import numpy as np

from benchmarks.quality import run, scores
from bidsharmony.simulation import SCANNERS, simulate

DATA = common.REPO.parent / "shared" / "data" / "ixi-hh"
QUANTILES = np.linspace(0.0, 100.0, 201)


def best_monotone_map(source: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The source's intensities mapped through its brain quantiles onto the truth's (an oracle)."""
    return np.interp(source, np.percentile(source[mask], QUANTILES), np.percentile(truth[mask], QUANTILES)).astype(np.float32)


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--subjects", type=int, default=2, help="held-out TRAIN subjects (the last ones)")
    p.add_argument("--name", default="monotone_ceiling")
    args = p.parse_args()
    common.setup(args)
    t0 = time.perf_counter()
    held_out = sorted(json.loads((DATA / "splits.json").read_text())["train"])[-args.subjects:]
    found: dict[str, list] = {}
    for sub in held_out:
        truth, mask, tissue = run.load_subject(DATA, sub)
        zooms = nb.affines.voxel_sizes(nb.as_closest_canonical(nb.load(str(run.t1w_path(DATA, sub)))).affine)
        for name in SCANNERS:
            src = simulate(name, truth, tissue, zooms, run.case_seed(0, sub, name))
            none = scores.score_volume(src, truth, mask)["psnr_vol"]
            best = min(scores.score_volume(best_monotone_map(src, truth, mask), truth, mask)["psnr_vol"], 99.0)
            found.setdefault(name, []).append((none, best))
            print(sub, name, f"untreated {none:.2f} dB, best monotone map {best:.2f} dB", flush=True)
    rows = [[f"{name} ({SCANNERS[name].kind})", f"{np.mean([a for a, _ in v]):.2f}", f"{np.mean([b for _, b in v]):.2f}",
             f"{np.mean([b - a for a, b in v]):+.2f}"] for name, v in found.items()]
    common.write_results(
        args, "cpu", args.name, "Probe: the best volume-wide intensity map on each simulated scanner (an oracle)",
        common.table(["scanner", "untreated (dB)", "best monotone map (dB)", "gain"], rows),
        [(f"Held-out TRAIN subjects: {', '.join(held_out)}; volume PSNR in the brain against the truth (capped at 99 dB); the map "
         f"is fitted on the truth itself ({len(QUANTILES)} brain quantiles), so no blind map can do better."),
         f"Whole run {time.perf_counter() - t0:.0f} s."],
        {"psnr_vol": found})


if __name__ == "__main__":
    main()
