"""Would landmarks measured in a learned brain mask standardise better than the blind region? Held-out TRAIN heads.

``benchmarks/brain_landmark_probe.py`` found that the standardisation's five landmarks gain +1.5 dB
of volume PSNR when measured in the true brain (the parcellation's mask on both sides), and lose
when the brain comes from affine registration (which is also not repeatable). This probe puts the
learned brain mask (``bidsharmony.image.brainmask``, from a model folder that holds one:
``benchmarks/fit_brainmask.py``) in its place, on the same held-out heads and scanners:

* ``blind region (shipped)`` — the shipped standardisation;
* ``true brain, P5`` — the parcellation's brain on both sides (the ceiling);
* ``learned brain, P5`` — the learned mask on both sides: the target's standard landmarks measured
  in it on TRAIN heads, the source's in it on the simulated scan, both on the 2 mm grid of the voxels
  as acquired (``brainmask.brain_on_grid``): what ``--landmark-region brain`` does;
* ``learned brain on the grid, P5`` — the same, measured on the pipeline's 1.2 mm grid: the mask found
  on that grid's volume resampled to 2 mm and brought back onto it (``region_on_grid`` below).

Also: the learned mask's Dice against the parcellation's on every held-out scan, whether running it
twice gives the same mask (bit for bit), its time per volume, and on the two unseen real scans the
histogram distance to IXI-HH in the quality benchmark's own brain mask.

    python benchmarks/brainmask_probe.py MODEL_FOLDER [--subjects 8] [--train-subjects 30]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import common
import nibabel as nb
import numpy as np
from brain_landmark_probe import DATA, UNSEEN, landmarks, standard

from benchmarks.quality import run, scores
from bidsharmony.flow.checkpoint import model_landmarks, read_folder
from bidsharmony.image.brainmask import MM, brain_on_grid, from_tensors, mask
from bidsharmony.image.resample import canonical, resample_isotropic
from bidsharmony.image.standardise import VOXEL_MM, grid_landmarks, on_standard_scale, standardise, volume_landmarks
from bidsharmony.simulation import SCANNERS, simulate

P5 = (5.0, 25.0, 50.0, 75.0, 95.0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def region_on_grid(net, grid: np.ndarray, zooms) -> np.ndarray:
    """The learned mask of a canonical grid's volume: found on its resampling to 2 mm, brought back (both grids
    share their first voxel's centre, so grid voxel i sits at 2 mm index i·zoom/2; beyond, the nearest)."""
    from scipy import ndimage

    coarse, _ = resample_isotropic(np.asarray(grid, np.float32), np.diag([*(float(z) for z in zooms), 1.0]), MM)
    brain = mask(net, coarse).astype(np.float32)
    scale = np.diag([float(z) / MM for z in zooms])
    return ndimage.affine_transform(brain, scale, output_shape=grid.shape, order=1, mode="nearest") > 0.5


def on_grid(net, volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Landmarks in the learned mask on the pipeline's grid (``region_on_grid``)."""
    grid, _ = resample_isotropic(*canonical(volume, affine), float(VOXEL_MM[0]))
    region = region_on_grid(net, grid, VOXEL_MM)
    return volume_landmarks(grid, P5, region=lambda *_: region)


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("model", type=Path, help="a model folder holding a brain mask (benchmarks/fit_brainmask.py)")
    p.add_argument("--subjects", type=int, default=8, help="the model's first N validation subjects, scored")
    p.add_argument("--train-subjects", type=int, default=30, help="TRAIN heads the standard brain landmarks are measured on")
    p.add_argument("--name", default="brainmask_probe")
    args = p.parse_args()
    common.setup(args)
    t0 = time.perf_counter()
    read = read_folder(args.model)
    cfg, tensors = read
    entry = cfg["preprocessing"]["standardisation"]["brain_mask"]
    net = from_tensors(tensors, entry["channels"], args.model)
    blind = model_landmarks(args.model, read)[0]
    held = ["sub-" + s for s in cfg["training_data"]["subjects_validation"][: args.subjects]]
    fit = ["sub-" + s for s in sorted(cfg["training_data"]["subjects_train"])][: args.train_subjects]

    true_pairs, learned_pairs, fit_dice, grid_shapes = [], [], [], []
    for sub in fit:
        t1, mask, _ = run.load_subject(DATA, sub, tissue=False)
        affine = nb.as_closest_canonical(nb.load(str(run.t1w_path(DATA, sub)))).affine
        coarse, _, learned = brain_on_grid(net, t1, affine)
        true_pairs.append((t1, mask))
        learned_pairs.append((coarse, learned))
        fit_dice.append(dice(learned, mask))
        grid_shapes.append(on_standard_scale(on_grid(net, t1, affine)))
    targets = {"true brain, P5": standard(true_pairs, P5), "learned brain, P5": standard(learned_pairs, P5),
               "learned brain on the grid, P5": np.mean(grid_shapes, axis=0)}
    print(f"standard landmarks fitted ({time.perf_counter() - t0:.0f} s)", flush=True)

    rows: dict[str, dict[str, list]] = {}
    mask_dice: dict[str, list] = {}
    seconds, repeat_same = [], []
    for sub in held:
        truth, mask, tissue = run.load_subject(DATA, sub)
        truth_seg = scores.segment(truth, mask)
        affine = nb.as_closest_canonical(nb.load(str(run.t1w_path(DATA, sub)))).affine
        zooms = nb.affines.voxel_sizes(affine)
        for name in ["truth", *SCANNERS]:
            src = truth if name == "truth" else simulate(name, truth, tissue, zooms, run.case_seed(0, sub, name))
            t = time.perf_counter()
            coarse, _, learned = brain_on_grid(net, src, affine)
            seconds.append(time.perf_counter() - t)
            if name == "gamma1p2":
                repeat_same.append(bool(np.array_equal(learned, brain_on_grid(net, src, affine)[2])))
            mask_dice.setdefault(name, []).append(dice(learned, mask))
            outs = {"untreated": src, "blind region (shipped)": standardise(src, blind, source_landmarks=grid_landmarks(src, affine)[0]),
                    "true brain, P5": standardise(src, targets["true brain, P5"], P5, source_landmarks=landmarks(src, mask, P5)),
                    "learned brain, P5": standardise(src, targets["learned brain, P5"], P5, source_landmarks=landmarks(coarse, learned, P5)),
                    "learned brain on the grid, P5": standardise(src, targets["learned brain on the grid, P5"], P5,
                                                                  source_landmarks=on_grid(net, src, affine))}
            for key, v in outs.items():
                s = scores.score_volume(v, truth, mask, truth_seg)
                rows.setdefault(key, {}).setdefault(name, []).append((s["psnr_vol"], s["dice"]))
        print(f"{sub} ({time.perf_counter() - t0:.0f} s)", flush=True)

    unseen = {}
    splits = [s if s.startswith("sub-") else f"sub-{s}" for s in json.loads((DATA / "splits.json").read_text())["train"]]
    reference = np.concatenate([scores.brain_sample(*run.load_subject(DATA, s, tissue=False)[:2], n=5000, seed=i)
                                for i, s in enumerate(splits[:12])])
    for path in sorted(UNSEEN.glob("sub-*/anat/*_T1w.nii.gz")) if UNSEEN.is_dir() else []:
        emask = run.propagated_brain_mask(path, run.t1w_path(DATA, splits[0]), run.labels_path(DATA, splits[0]), 0)
        img = nb.load(str(path))
        v, aff = canonical(np.asarray(img.dataobj, np.float32), img.affine)
        coarse, _, learned = brain_on_grid(net, v, aff)
        outs = {"untreated": v, "blind region (shipped)": standardise(v, blind, source_landmarks=grid_landmarks(v, aff)[0]),
                "learned brain, P5": standardise(v, targets["learned brain, P5"], P5, source_landmarks=landmarks(coarse, learned, P5)),
                "learned brain on the grid, P5": standardise(v, targets["learned brain on the grid, P5"], P5,
                                                              source_landmarks=on_grid(net, v, aff))}
        key = path.name.split("_")[0]
        unseen[key] = {k: scores.histogram_distance(o, emask, reference) for k, o in outs.items()}
        unseen[key]["mask_ml"] = float(learned.sum() * 8.0 / 1000)
        print(f"{path.name} ({time.perf_counter() - t0:.0f} s)", flush=True)

    scanners = list(SCANNERS)
    groups = {"monotone (8)": [n for n in scanners if SCANNERS[n].kind == "monotone"], "truth": ["truth"], "log": ["log"],
              "gamma0p7": ["gamma0p7"], "gamma1p5": ["gamma1p5"], "bias": ["bias"], "noise": ["noise"], "blur": ["blur"],
              "contrast": ["contrast"], "all 12": scanners}
    base = rows["blind region (shipped)"]

    def mean(r, names, i=0):
        return float(np.mean([np.mean([c[i] for c in r[n]]) for n in names]))

    table = []
    for key, r in rows.items():
        table.append([key, *[f"{mean(r, names):.2f}" for names in groups.values()],
                      f"{mean(r, scanners) - mean(base, scanners):+.2f}", f"{mean(r, scanners, 1):.3f}",
                      *[f"{unseen[s][key]:.4f}" if key in unseen.get(s, {}) else "–" for s in sorted(unseen)]])
    dice_table = common.table(["scan", "mask Dice, mean", "min"],
                              [[n, f"{np.mean(d):.4f}", f"{np.min(d):.4f}"] for n, d in mask_dice.items()])
    common.write_results(
        args, "cpu", args.name, "Probe: landmarks in a learned brain mask, against the blind region (held-out TRAIN heads)",
        common.table(["landmarks", *[f"PSNR vol, {g}" for g in groups], "Δ all vs shipped", "Dice, all 12",
                      *[f"histogram distance, {s}" for s in sorted(unseen)]], table)
        + "\n\nThe learned mask against the parcellation's brain (labels > 0):\n\n" + dice_table,
        [(f"Held-out heads: {', '.join(held)} (the model's validation subjects) × the truth and the 12 simulated scanners; "
          f"PSNR vol in dB. Standard brain landmarks on {len(fit)} TRAIN heads ({fit[0]}…; the mask's Dice there "
          f"{np.mean(fit_dice):.4f}). Unseen scans: Wasserstein-1 distance to IXI-HH's brain intensities in the quality "
          "benchmark's own mask (0 = the same distribution); learned mask volume "
          + ", ".join(f"{s} {unseen[s]['mask_ml']:.0f} ml" for s in sorted(unseen)) + "."),
         f"The model: {args.model} (brain mask: {json.dumps(entry['training'])}).",
         (f"Repeatability: the gamma1p2 scan of each head masked twice: identical masks on {sum(repeat_same)} of "
          f"{len(repeat_same)}. Time per mask (resampling, ranks, the network twice, cleaning): median "
          f"{np.median(seconds):.2f} s."),
         f"Whole run {time.perf_counter() - t0:.0f} s."],
        {"psnr_dice": rows, "mask_dice": mask_dice, "unseen": unseen, "repeat_same": repeat_same, "seconds": seconds,
         "held_out": held, "fit": fit, "fit_dice": fit_dice, "model": str(args.model)})


if __name__ == "__main__":
    main()
