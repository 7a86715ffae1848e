"""Can N4, shrunk towards the target's own typical field, undo the bias scanner without harming the rest?

N4 (Tustison et al. 2010, antspyx) estimates a volume's smooth field, but removing it all moved
IXI-HH's images about 16–20 dB away from the truth: the target's images carry a field of their own.
This probe removes only the part of a source's field that the target's images do not share:

* From ``--train-subjects`` target TRAIN volumes (held-out heads excluded): each standardised
  volume's N4 log-field, zero mean in the head, is sampled on a G³ grid over the head's bounding box.
  Their mean m is the target's typical field; their between-subject variance σ₀² (per grid point,
  averaged) how much a target head's own field differs from it.
* A source's N4 log-field g on the same grid differs from m by d² = mean((g − m)²). A target head has
  d² ≈ σ₀²; the expected share of the difference that is the source's extra field is
  w = max(0, 1 − σ₀²/d²) (James–Stein-type shrinkage). The source is multiplied in the head by
  exp(w · (m − g)) and standardised again (the field moved its landmarks).

Scored like the other probes: held-out TRAIN heads (the model's validation subjects, used by none of
its trainings) under the benchmark's simulated scanners, volume PSNR in the brain against the truth,
gains over the standardised volume. Two orders: the field on the standardised volume, and on the
volume after the pipeline's detail stage (the shipped learned denoiser, with its gate), because N4's
estimate on a noisy volume differs. The field is scored as applied (its log has zero mean in the head,
so the volume stays near the standard scale) and standardised again; the second standardisation
alone is a column too, since it is not the identity (its landmark region is measured again, on the
mapped volume).

    python benchmarks/n4_prior_probe.py [--train-subjects 30] [--eval-subjects 2] [--cache DIR]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import common
import nibabel as nb
import numpy as np
from scipy import ndimage

from benchmarks.quality import run, scores
from bidsharmony.flow.checkpoint import model_denoiser, model_detail_band, model_detail_voxel, model_landmarks, read_folder
from bidsharmony.image.detail import match_detail
from bidsharmony.image.resample import resample_isotropic, to_ants
from bidsharmony.image.slices import head_mask
from bidsharmony.image.standardise import grid_landmarks, standardise
from bidsharmony.simulation import simulate

DATA = common.REPO.parent / "shared" / "data" / "ixi-hh"
MODEL = common.REPO / "bidsharmony" / "data" / "models" / "ixi-hh-fast"
G = 24  # grid points per axis over the head's bounding box
SCANNERS = ("bias", "truth", "gamma0p7", "gamma1p5", "noise", "blur", "contrast")


def n4_log_field(v: np.ndarray, affine: np.ndarray, head: np.ndarray) -> np.ndarray:
    """N4's log-field of ``v`` (antspyx defaults, shrink 2), zero mean in the head."""
    import ants

    field = ants.n4_bias_field_correction(to_ants(v, affine), mask=to_ants(head.astype(np.float32), affine), shrink_factor=2,
                                          return_bias_field=True).numpy()
    g = np.log(np.maximum(field, 1e-6))
    return (g - g[head].mean()).astype(np.float32)


def _box(head: np.ndarray) -> tuple[slice, ...]:
    idx = np.argwhere(head)
    return tuple(slice(int(a), int(b)) for a, b in zip(idx.min(0), idx.max(0) + 1, strict=True))


def to_grid(g: np.ndarray, head: np.ndarray) -> np.ndarray:
    c = g[_box(head)]
    return ndimage.zoom(c, [G / s for s in c.shape], order=1, grid_mode=True, mode="nearest")


def from_grid(m: np.ndarray, head: np.ndarray) -> np.ndarray:
    box = _box(head)
    size = [s.stop - s.start for s in box]
    out = np.zeros(head.shape, np.float32)
    out[box] = ndimage.zoom(m, [s / G for s in size], order=1, grid_mode=True, mode="nearest")[tuple(slice(0, s) for s in size)]
    return out


def low_order(a: np.ndarray) -> np.ndarray:
    """The low-order part of a grid: linearly down to 4³ and back (a coil's field varies over the whole head)."""
    small = ndimage.zoom(a, 4 / G, order=1, grid_mode=True, mode="nearest")
    return ndimage.zoom(small, G / 4, order=1, grid_mode=True, mode="nearest")


def train_fields(subjects, landmarks, cache: Path | None) -> np.ndarray:
    """(n, G, G, G) log-fields of the target TRAIN ``subjects`` (cached by subject list)."""
    path = cache / f"n4-fields-{len(subjects)}.npz" if cache else None
    if path is not None and path.is_file() and list(np.load(path)["subjects"]) == list(subjects):
        return np.load(path)["grids"]
    grids = []
    for sub in subjects:
        p = run.t1w_path(DATA, sub)
        affine = nb.as_closest_canonical(nb.load(str(p))).affine
        v = run.load_canonical(p)
        s = standardise(v, landmarks, source_landmarks=grid_landmarks(v, affine)[0])
        head = head_mask(s)
        grids.append(to_grid(n4_log_field(s, affine, head), head))
        print(f"TRAIN {sub}: field done", flush=True)
    grids = np.array(grids)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, grids=grids, subjects=np.array(subjects))
    return grids


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--train-subjects", type=int, default=30, help="target TRAIN volumes the typical field is fitted on")
    p.add_argument("--eval-subjects", type=int, default=2, help="the model's first N validation subjects, scored")
    p.add_argument("--cache", type=Path, default=None, help="keep the TRAIN fields here (N4 takes ~17 s a volume)")
    p.add_argument("--gates", action="store_true",
                   help="instead of the detail-stage columns, two other weights: N4 on a smoothed copy (σ 1 voxel), and only the "
                        "low-order (4³) part of the departure, weighed against the TRAIN heads' low-order spread")
    p.add_argument("--name", default="n4_prior_probe")
    args = p.parse_args()
    common.setup(args)
    if args.quick:
        args.train_subjects, args.eval_subjects = 3, 1
    t0 = time.perf_counter()
    read = read_folder(MODEL)
    cfg = read[0]
    landmarks, _ = model_landmarks(MODEL, read)
    band, voxel, net = model_detail_band(MODEL, read), model_detail_voxel(MODEL, read), model_denoiser(MODEL, read)
    held = ["sub-" + s for s in cfg["training_data"]["subjects_validation"][: args.eval_subjects]]
    train = [s for s in sorted(json.loads((DATA / "splits.json").read_text())["train"]) if s not in held][: args.train_subjects]
    grids = train_fields(train, landmarks, args.cache)
    m = grids.mean(0)
    var0 = float(np.mean(np.var(grids, 0, ddof=1)))
    loo = [float(np.mean((grids[i] - (grids.sum(0) - grids[i]) / (len(grids) - 1)) ** 2)) for i in range(len(grids))]
    lows = np.array([low_order(gr - m) for gr in grids])
    var0_low = float(np.mean(np.sum(lows**2, 0) / (len(grids) - 1)))
    t_train = time.perf_counter() - t0
    cols = ["standardised (dB)", "re-standardised only", "field (N4, shrunk)", "field, standardised again", "w",
            *(["N4 on a smoothed copy", "w (smoothed)", "low-order departure only", "w (low-order)"] if args.gates else
              ["after detail stage (dB)", "+ field (N4 on it, shrunk)", "w after detail"])]
    results: dict[tuple[str, str], list] = {}
    for sub in held:
        truth, mask, tissue = run.load_subject(DATA, sub)
        affine = nb.as_closest_canonical(nb.load(str(run.t1w_path(DATA, sub)))).affine
        grid = resample_isotropic(truth, affine, 1.2)  # the grid the detail stage measures its level on
        for scanner in SCANNERS:
            src = truth if scanner == "truth" else simulate(scanner, truth, tissue, nb.affines.voxel_sizes(affine), run.case_seed(0, sub, scanner))
            std = standardise(src, landmarks, source_landmarks=grid_landmarks(src, affine)[0])

            def psnr(x, truth=truth, mask=mask):
                return min(scores.volume_scores(x, truth, mask)["psnr_vol"], 99.0)

            def again(x, affine=affine):
                return standardise(x, landmarks, source_landmarks=grid_landmarks(x, affine)[0])

            def fixed(x, affine=affine, smooth=False):
                """(x corrected by its N4 field shrunk towards m, w, head, g); N4 on a smoothed copy if asked."""
                head = head_mask(x)
                g = n4_log_field(ndimage.gaussian_filter(x, 1.0) if smooth else x, affine, head)
                w = max(0.0, 1.0 - var0 / float(np.mean((to_grid(g, head) - m) ** 2)))
                return np.where(head, x * np.exp(w * (from_grid(m, head) - g)), x).astype(np.float32), w, head, g

            base = psnr(std)
            out, w, head, g = fixed(std)
            values = [base, psnr(again(std)) - base, psnr(out) - base, psnr(again(out)) - base, w]
            if args.gates:
                smooth, ws, _, _ = fixed(std, smooth=True)
                dep = low_order(to_grid(g, head) - m)  # the same N4 field, its low-order part only
                wl = max(0.0, 1.0 - var0_low / float(np.mean(dep**2)))
                lowfix = again(np.where(head, std * np.exp(-wl * from_grid(dep, head)), std).astype(np.float32))
                values += [psnr(again(smooth)) - base, ws, psnr(lowfix) - base, wl]
            else:
                detailed, _ = match_detail(std, affine, band, (grid[0].shape, grid[1]), voxel, net)
                both, w2, _, _ = fixed(detailed)
                values += [psnr(detailed), psnr(both) - psnr(detailed), w2]
            row = dict(zip(cols, values, strict=True))
            for k, val in row.items():
                results.setdefault((scanner, k), []).append(val)
            print(sub, scanner, "; ".join(f"{k} {val:+.2f}" for k, val in row.items()), flush=True)
    plain = {"standardised (dB)", "after detail stage (dB)"} | {c for c in cols if c.startswith("w")}
    rows = [[s + (" (a field)" if s == "bias" else ""), *[f"{np.mean(results[(s, c)]):.2f}" if c in plain
                                                        else f"{np.mean(results[(s, c)]):+.2f}" for c in cols]] for s in SCANNERS]
    common.write_results(
        args, "cpu", args.name, "Probe: N4 shrunk towards the target's typical field, held-out TRAIN heads",
        common.table(["scanner", *cols], rows),
        [(f"Held-out heads: {', '.join(held)} (the shipped model's validation subjects, TRAIN split, used by none of its trainings). " +
          ("Gains in volume PSNR (dB) in the brain over the standardised volume, all corrections standardised again but column 3; "
           "with --gates, N4 on a copy smoothed by a Gaussian of σ 1 voxel, and the low-order (4³) part of the departure alone "
           f"weighed against the TRAIN heads' low-order spread ({var0_low:.4f})" if args.gates else
           "Gains in volume PSNR (dB) in the brain: columns 2-4 over the standardised volume, column 7 over the volume after the "
           "detail stage (the shipped learned denoiser behind its gate)") + "; w: the shrinkage weight."),
         (f"Target's typical field: N4 (antspyx, shrink 2) log-fields of {len(train)} IXI-HH TRAIN volumes on a {G}³ grid over the "
          f"head's bounding box; between-subject variance σ₀² = {var0:.4f} (leave-one-out d² of the TRAIN heads: "
          f"{np.min(loo):.4f}–{np.max(loo):.4f}, median {np.median(loo):.4f}); {t_train:.0f} s."),
         f"Whole run {time.perf_counter() - t0:.0f} s."],
        {"results": {f"{s}|{c}": v for (s, c), v in results.items()}, "var0": var0, "loo_d2": loo, "train": train, "held_out": held})


if __name__ == "__main__":
    main()
