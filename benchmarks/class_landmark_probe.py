"""Landmarks that do not move with tissue composition: tissue-class centres instead of percentiles. Held-out TRAIN heads.

The shipped standardisation maps percentiles (5, 25, …, 95) of the landmark region onto the target's
mean. A percentile is a share of voxels, so a head with more CSF (an older head) has every
percentile lower, and forcing it onto the mean shape gives it the mean head's composition: the
grey-matter fraction moves and its correlation with age is lost (``landmark_gate_probe``; the
quality benchmark's "Biology kept" table). A class centre (the mean intensity of the region's
CSF-, grey- or white-like voxels) depends far less on how many voxels each class holds, and a
monotone change of contrast carries it along with the class. This probe compares, with the
standardisation alone, the shipped percentile map against maps through class points of the same
region on the same 1.2 mm grid (the classes: a deterministic 1D k-means, the benchmark's own):

* ``class quantiles``, in place of the percentiles: the minimum, then quantiles within each of the three
  classes (CSF-like: median; grey-like: quartiles; white-like: quartiles and 95th percentile), as dense
  as the percentiles but each within one class; its target is the TRAIN heads' mean shape, fitted as
  the shipped landmarks are;
* a second pass after the shipped map (``percentiles (shipped) → …``): the class points of the shipped
  map's output (the three k-means centres; the five centres of a 5-class k-means; the class quantiles)
  mapped onto the TRAIN heads' own class points, each TRAIN head mapped affinely onto its own shape
  (its anatomy untouched) and the points averaged. The last is ``--classes tissue``.

Scored on the shipped model's validation heads: volume PSNR and tissue Dice in the brain against the
truth, the change of the k-means grey-matter fraction, and over the heads, the correlation of that
fraction with age (Δr against the truth's r, the benchmark's biology check) — for the truth itself (a
scan from the target's own scanner) and the 12 simulated scanners.

    python benchmarks/class_landmark_probe.py [--subjects 8] [--train-subjects 60]
"""

from __future__ import annotations

import time

import common
import nibabel as nb
import numpy as np

from benchmarks.quality import run, scores
from bidsharmony.flow.checkpoint import read_folder
from bidsharmony.image.io import load_t1w
from bidsharmony.image.resample import canonical, resample_isotropic
from bidsharmony.image.standardise import (
    PERCENTILES,
    VOXEL_MM,
    _increasing,
    class_landmarks,
    landmark_region,
    on_standard_scale,
    piecewise_linear,
)
from bidsharmony.simulation import SCANNERS, simulate

DATA = common.REPO.parent / "shared" / "data" / "ixi-hh"
MODEL = common.REPO / "bidsharmony" / "data" / "models" / "ixi-hh-fast"
SHIPPED = "percentiles (shipped)"


def class_points(x: np.ndarray) -> dict[str, np.ndarray]:
    """Class-centre landmark points of region intensities ``x`` (without the minimum)."""
    within = class_landmarks(x, np.ones(x.shape, bool))[1:]  # the package's class pass points (CLASS_POINTS)
    return {"k-means": scores.kmeans1d(x)[0], "k-means, 5 classes": scores.kmeans1d(x, k=5)[0], "class quantiles": within}


def landmark_sets(grid: np.ndarray, region: np.ndarray) -> dict[str, np.ndarray]:
    """{name: (K + 1,) landmarks} of one volume on the pipeline's grid: the minimum, then the set's points."""
    x = grid[region].astype(np.float64)
    sets = {"percentiles (shipped)": np.percentile(x, PERCENTILES), "class quantiles": class_points(x)["class quantiles"]}
    return {k: _increasing(np.r_[float(grid.min()), v]) for k, v in sets.items()}


def second_pass(first: np.ndarray, region: np.ndarray) -> dict[str, np.ndarray]:
    """{name: landmarks} of a volume already on the standard scale (the shipped map's output): 0, then class points."""
    return {k: _increasing(np.r_[0.0, v]) for k, v in class_points(first[region].astype(np.float64)).items()}


def grid_of(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return resample_isotropic(*canonical(volume, affine), float(VOXEL_MM[0]))[0]


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--subjects", type=int, default=8, help="the shipped model's first N validation subjects, scored")
    p.add_argument("--train-subjects", type=int, default=60, help="TRAIN heads whose mean shapes are the targets")
    args = p.parse_args()
    args.name = args.name if getattr(args, "name", None) else "class_landmark_probe"
    common.setup(args)
    t0 = time.perf_counter()
    read = read_folder(MODEL)
    held = ["sub-" + s for s in read[0]["training_data"]["subjects_validation"][: args.subjects]]
    train = sorted(read[0]["training_data"]["subjects_train"])[: args.train_subjects]
    shapes: dict[str, list] = {}
    seconds: dict[str, list] = {}
    for sub in train:
        img, v = load_t1w(run.t1w_path(DATA, f"sub-{sub}"))
        grid = grid_of(v, img.affine)
        region = landmark_region(grid)
        sets = landmark_sets(grid, region)
        for key, lm in sets.items():
            shapes.setdefault(key, []).append(on_standard_scale(lm))
        first = piecewise_linear(grid, sets[SHIPPED], on_standard_scale(sets[SHIPPED]))  # affine: its own shape
        for key, lm in second_pass(first, region).items():
            seconds.setdefault(key, []).append(lm)
    targets = {k: np.mean(v, axis=0) for k, v in shapes.items()}
    seconds_t = {k: np.mean(v, axis=0) for k, v in seconds.items()}
    print(f"{len(train)} TRAIN heads ({time.perf_counter() - t0:.0f} s)", flush=True)
    for k, t in [*targets.items(), *[(f"{SHIPPED} → {k}", t) for k, t in seconds_t.items()]]:
        print(f"  {k}: {np.round(t, 1).tolist()}", flush=True)

    ages = run.participant_ages(DATA)
    found: dict[str, dict[str, list]] = {}
    truth_gm = []
    for sub in held:
        truth, mask, tissue = run.load_subject(DATA, sub)
        seg = scores.segment(truth, mask)
        truth_gm.append(scores.gm_fraction(seg))
        affine = nb.as_closest_canonical(nb.load(str(run.t1w_path(DATA, sub)))).affine
        zooms = nb.affines.voxel_sizes(affine)
        for name in ("truth", *SCANNERS):
            src = truth if name == "truth" else simulate(name, truth, tissue, zooms, run.case_seed(0, sub, name))
            grid = grid_of(src, affine)
            region = landmark_region(grid)
            sets = landmark_sets(grid, region)
            outs = {key: piecewise_linear(src, lm, targets[key]) for key, lm in sets.items()}
            first = piecewise_linear(grid, sets[SHIPPED], targets[SHIPPED])  # the shipped map on the grid, where the second pass measures
            for key, lm in second_pass(first, region).items():
                outs[f"{SHIPPED} → {key}"] = piecewise_linear(outs[SHIPPED], lm, seconds_t[key])
            for key, out in outs.items():
                psnr = min(scores.volume_scores(out, truth, mask)["psnr_vol"], 99.0)
                td = scores.tissue_dice(out, truth, mask, seg)
                found.setdefault(name, {}).setdefault(key, []).append((psnr, td["dice"], td["gm_fraction"]))
        print(f"{sub} ({time.perf_counter() - t0:.0f} s)", flush=True)

    age = [ages.get(s, np.nan) for s in held]
    r_truth = scores.correlation(age, truth_gm)
    methods = list(found["truth"])
    rows = []

    def cells(d, m):
        a = np.array(d[m])
        gm = 100 * np.abs(a[:, 2] - np.array(truth_gm))
        return a[:, 0].mean(), a[:, 1].mean(), gm.mean(), scores.correlation(age, a[:, 2]) - r_truth

    table = {name: {m: cells(d, m) for m in methods} for name, d in found.items()}
    for name, d in table.items():
        kind = "the target's own scanner" if name == "truth" else SCANNERS[name].kind
        rows.append([f"{name} ({kind})", *[f"{d[m][i]:{('.2f', '.3f', '.2f', '+.3f')[i]}}" for i in range(4) for m in methods]])
    mono = [n for n in SCANNERS if SCANNERS[n].kind == "monotone"]
    for label, names in (("mean, 8 monotone scanners", mono), ("mean, 12 scanners", list(SCANNERS))):
        rows.append([label, *[f"{np.mean([table[n][m][i] for n in names]):{('.2f', '.3f', '.2f', '.3f')[i]}}"
                              if i < 3 else f"{np.mean([abs(table[n][m][3]) for n in names]):.3f}" for i in range(4) for m in methods]])
    rows.append(["scanners with |Δr| ≤ 0.05 (of 12)", *[""] * (3 * len(methods)),
                 *[str(sum(abs(table[n][m][3]) <= 0.05 for n in SCANNERS)) for m in methods]])
    heads = [f"{h}, {m}" for h in ("PSNR vol", "Dice", "|Δ GM fraction| (points)", "Δr GM fraction vs age") for m in methods]
    common.write_results(
        args, "cpu", args.name, "Probe: landmarks from tissue-class centres instead of percentiles (standardisation alone)",
        common.table(["scanner", *heads], rows),
        [f"Held-out heads: {', '.join(held)} (the shipped model's validation subjects; ages {', '.join(f'{a:.0f}' for a in age)}; "
         f"the truth's r = {r_truth:.3f}). Targets: the mean shapes of {len(train)} TRAIN heads, on the pipeline's 1.2 mm grid "
         "in the shipped landmark region: " + "; ".join(f"{k} {np.round(t, 1).tolist()}" for k, t in targets.items()) + "; "
         "second passes (class points of each TRAIN head mapped affinely onto its own shape, its anatomy untouched, averaged; the source's are measured on the shipped map's output): "
         + "; ".join(f"{k} {np.round(t, 1).tolist()}" for k, t in seconds_t.items()) + ". "
         "PSNR vol in dB against the truth (capped at 99); |Δ GM fraction|: the k-means grey-matter fraction of the brain, output "
         "against truth, in percentage points; Δr: Pearson r of that fraction with age over the heads, output's minus truth's "
         "(mean rows: the mean of |Δr|).",
         f"Whole run {time.perf_counter() - t0:.0f} s."],
        {"found": found, "truth_gm": truth_gm, "ages": age, "r_truth": r_truth, "held_out": held,
         "targets": {k: t.tolist() for k, t in targets.items()},
         "second_pass_targets": {k: t.tolist() for k, t in seconds_t.items()}, "train_subjects": len(train)})


if __name__ == "__main__":
    main()
