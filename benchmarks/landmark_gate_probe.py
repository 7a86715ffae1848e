"""Should the standardisation leave alone a head whose landmarks already look like the target's? Held-out TRAIN heads.

The standardisation maps every volume's landmark *shape* onto the target's mean shape μ. A shape is a
volume's landmarks on the standard scale, s = S (λ − λ₀)/(λ_K − λ₀): its first and last entries are
0 and S, the K − 1 between them free. A head from the target's own scanner has its own shape, which
differs from μ as tissue composition differs between people (a larger CSF share with age), so the
map alters it, and with it what a study measures. The field stage avoids the same trap with a gate
(``bidsharmony.image.field``); this probe measures the same idea for the landmarks:

* the TRAIN heads' shapes give the target's spread: the mean m and covariance C of the free entries;
  a source's departure d² = (s − m)ᵀ C⁻¹ (s − m)/(K − 1), and the gate d²₀ is the median (or 90th
  percentile, or maximum) of the TRAIN heads' own departures, each left out of m and C in turn;
* the gated map sends the source's landmarks to s + w (μ − s) with w = max(0, 1 − d²₀/d²) (the
  James–Stein form the field stage uses): w = 0 is an affine map (the head keeps its own shape), w = 1
  is the shipped map.

Scored with the quality benchmark's volume PSNR and tissue Dice in the brain against the truth, and
the change of the k-means grey-matter fraction (what the benchmark's biology check correlates with
age), on the shipped model's validation heads: the truth itself (a scan from the target's scanner)
and the 12 simulated scanners.

``--pipeline`` scores the shipped map and the median gate in the pipeline's order instead: the
standardisation, then the detail stage (the shipped band and learned denoiser), then, where the
detail stage left the volume alone, the field stage (the shipped typical field; its second
standardisation onto the same landmarks the first one used). N4 runs on most cases, so this takes
about 4 times longer.

    python benchmarks/landmark_gate_probe.py [--subjects 4] [--train-subjects 142] [--pipeline]
"""

from __future__ import annotations

import time

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
from bidsharmony.image.intensity import prepare
from bidsharmony.image.io import load_t1w
from bidsharmony.image.resample import resample_isotropic
from bidsharmony.image.standardise import (
    PERCENTILES,
    grid_landmarks,
    on_standard_scale,
    standardise,
    volume_landmarks,
)
from bidsharmony.simulation import SCANNERS, simulate

DATA = common.REPO.parent / "shared" / "data" / "ixi-hh"
MODEL = common.REPO / "bidsharmony" / "data" / "models" / "ixi-hh-fast"
GATES = ("median", "p90", "max")


def spread(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, inverse covariance) of (n, k) free entries."""
    return x.mean(0), np.linalg.inv(np.cov(x.T) + 1e-6 * np.eye(x.shape[1]))


def departure(x: np.ndarray, mean: np.ndarray, inv: np.ndarray) -> float:
    d = x - mean
    return float(d @ inv @ d) / d.size


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--subjects", type=int, default=4, help="the shipped model's first N validation subjects, scored")
    p.add_argument("--train-subjects", type=int, default=142, help="TRAIN heads whose shapes give the target's spread")
    p.add_argument("--pipeline", action="store_true", help="the shipped map and the median gate, each followed by the detail and field stages")
    p.add_argument("--name", default=None, help="default: landmark_gate_probe[-pipeline]")
    args = p.parse_args()
    args.name = args.name or "landmark_gate_probe" + ("-pipeline" if args.pipeline else "")
    common.setup(args)
    t0 = time.perf_counter()
    read = read_folder(MODEL)
    mu = model_landmarks(MODEL, read)[0]
    held = ["sub-" + s for s in read[0]["training_data"]["subjects_validation"][: args.subjects]]
    train = sorted(read[0]["training_data"]["subjects_train"])[: args.train_subjects]
    shapes = []
    for sub in train:
        img, v = load_t1w(run.t1w_path(DATA, f"sub-{sub}"))
        shapes.append(on_standard_scale(grid_landmarks(v, img.affine)[0]))
    free = slice(1, len(mu) - 1)
    x = np.array(shapes)[:, free]
    left = [departure(x[i], *spread(np.delete(x, i, 0))) for i in range(len(x))]
    gates = {"median": float(np.median(left)), "p90": float(np.percentile(left, 90)), "max": float(np.max(left))}
    mean, inv = spread(x)
    if args.pipeline:
        gates = {"median": gates["median"]}
        band, voxel, net, typical = model_detail_band(MODEL, read), model_detail_voxel(MODEL, read), model_denoiser(MODEL, read), model_field(MODEL, read)

        def stages(src, affine, landmarks, grid_src, grid, source):
            """The Standardise node's stages (``image.intensity.prepare``): the native voxels it hands on."""
            return prepare(grid_src, grid[1], landmarks, PERCENTILES, native=(src, affine), band=band, target_voxel=voxel,
                           denoiser=net, typical=typical, source_landmarks=source).native
    print(f"{len(x)} TRAIN shapes ({time.perf_counter() - t0:.0f} s); gates " + ", ".join(f"{k} {v:.2f}" for k, v in gates.items()), flush=True)

    found: dict[str, dict[str, list]] = {}
    for sub in held:
        truth, mask, tissue = run.load_subject(DATA, sub)
        seg = scores.segment(truth, mask)
        affine = nb.as_closest_canonical(nb.load(str(run.t1w_path(DATA, sub)))).affine
        zooms = nb.affines.voxel_sizes(affine)
        for name in ("truth", *SCANNERS):
            src = truth if name == "truth" else simulate(name, truth, tissue, zooms, run.case_seed(0, sub, name))
            if args.pipeline:  # landmarks on the pipeline's 1.2 mm grid, as grid_landmarks measures them
                grid_src, grid_affine = resample_isotropic(src, affine, 1.2)
                lm, grid = volume_landmarks(grid_src), (grid_src, (grid_src.shape, grid_affine))
            else:
                lm, grid = grid_landmarks(src, affine)[0], None
            s = on_standard_scale(lm)
            d2 = departure(s[free], mean, inv)
            targets = {"shipped (w = 1)": mu}
            for key, gate in gates.items():
                w = max(0.0, 1.0 - gate / max(d2, 1e-12))
                targets[f"gated, {key}"] = s + w * (mu - s)
                found.setdefault(name, {}).setdefault(f"w, {key}", []).append(w)
            outs = {key: stages(src, affine, y, *grid, lm) if grid else standardise(src, y, source_landmarks=lm)
                    for key, y in targets.items()}
            found.setdefault(name, {}).setdefault("d2", []).append(d2)
            for key, v in outs.items():
                sc = scores.score_volume(v, truth, mask, seg)
                gm = abs(scores.gm_fraction(scores.segment(v, mask)) - scores.gm_fraction(seg))
                found[name].setdefault(key, []).append((min(sc["psnr_vol"], 99.0), sc["dice"], 100 * gm))
        print(f"{sub} ({time.perf_counter() - t0:.0f} s)", flush=True)

    methods = ["shipped (w = 1)", *[f"gated, {k}" for k in gates]]
    rows = []
    for name, d in found.items():
        kind = "the target's own scanner" if name == "truth" else SCANNERS[name].kind
        cells = [f"{np.mean([c[i] for c in d[m]]):.{(2, 3, 2)[i]}f}" for i in range(3) for m in methods]
        rows.append([f"{name} ({kind})", f"{np.mean(d['d2']):.2f}", *[f"{np.mean(d[f'w, {k}']):.2f}" for k in gates], *cells])
    mono = [n for n in SCANNERS if SCANNERS[n].kind == "monotone"]
    rows.append(["mean, 8 monotone scanners", "", *[""] * len(gates),
                 *[f"{np.mean([np.mean([c[i] for c in found[n][m]]) for n in mono]):.{(2, 3, 2)[i]}f}" for i in range(3) for m in methods]])
    heads = [f"PSNR vol, {m}" for m in methods] + [f"Dice, {m}" for m in methods] + [f"|Δ GM fraction| (points), {m}" for m in methods]
    common.write_results(
        args, "cpu", args.name, "Probe: a gate on the landmark map (leave a head with a target-like landmark shape alone)",
        common.table(["scanner", "d²", *[f"w, {k}" for k in gates], *heads], rows),
        [f"Held-out heads: {', '.join(held)} (the shipped model's validation subjects); the target's spread from {len(x)} TRAIN heads' "
         "shapes (the free landmarks on the standard scale, measured as harmonization measures them); gates (their leave-one-out "
         "departures): " + ", ".join(f"{k} {v:.2f}" for k, v in gates.items()) + ". PSNR vol in dB against the truth (capped at 99); "
         "|Δ GM fraction|: the k-means grey-matter fraction of the brain, output against truth, in percentage points."
         + (" In the pipeline's order: each map followed by the detail stage, and by the field stage where the detail stage did nothing."
            if args.pipeline else ""),
         f"Whole run {time.perf_counter() - t0:.0f} s."],
        {"found": found, "gates": gates, "held_out": held, "train_subjects": len(x)})


if __name__ == "__main__":
    main()
