"""Blind landmark standardisation beside the benchmark's peers, with and without N4 and denoising.

On the quality benchmark's simulated scanners (bidsharmony.simulation, made from IXI-HH
TEST subjects exactly as the benchmark makes them) and scored with its functions against the
truth in the brain (volume PSNR, SSIM, Dice of 3-class k-means, slice steps). Candidates:

- none, histmatch, nyul: the benchmark's peers, fit on TRAIN subjects and given the brain mask;
- standardise: bidsharmony.image.standardise, fit on the same TRAIN subjects, given no mask: its
  landmarks (percentiles of a deep region of the head) are taken on the 1.2 mm canonical volume
  the pipeline makes, and the map is applied to the native voxels (a voxel-wise map must not
  travel through a resampling: see the variants, which also try other regions and percentiles);
- N4 + standardise, denoise + standardise (and N4, denoise alone): antspyx's N4 bias-field
  correction and non-local-means denoising on the native grid with the head mask, before the
  standardisation (costly: --classical-subjects limits them to the first subjects).

Also the unseen real scanners (../shared/data/unseen-scanners, no truth): histogram distance of the
brain to the TRAIN subjects' pooled intensities and GM/WM ratio, before and after, as the
benchmark scores them (brain masks propagated from a TRAIN subject by ANTs affine registration).

    python benchmarks/standardise_probe.py [--subjects 4] [--classical-subjects 1] [--scanners gamma0p7,bias] [--quick]
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import common
import nibabel as nb
import numpy as np

from benchmarks.quality import run, scores
from benchmarks.quality.peers import make_peers
from bidsharmony.image.resample import resample_isotropic, resample_onto, to_ants
from bidsharmony.image.slices import head_mask
from bidsharmony.image.standardise import PERCENTILES, fit_landmarks, landmark_region, standardise, volume_landmarks
from bidsharmony.simulation import QUICK_SCANNERS, SCANNERS, simulate

DATA = common.REPO.parent / "shared" / "data"
VOXEL = 1.2  # mm: the pipeline's canonical grid
STD = "standardise"
PAST = {"N4": "N4-corrected", "denoise": "denoised"}  # the classical steps, and the truth put through the same step
def versus(step: str) -> str:
    return f" (vs {PAST[step]} truth)"


# Scored against the truth and against the truth put through the same step (the suffix).
CLASSICAL = [m for step in PAST for m in (f"{step} + {STD}", step, STD + versus(step), f"{step} + {STD}" + versus(step), step + versus(step))]
MAIN = ["none", "histmatch", "nyul", STD, *CLASSICAL]
DECILES = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)


def whole_head(v, zooms):
    return head_mask(v)


# Landmark rules tried (region, percentiles); the default is the module's.
DEFAULT = "deep region; 5, quartiles, 95 (default)"
VARIANTS = {
    "whole head; deciles (Nyúl's percentiles)": (whole_head, DECILES),
    "whole head; quartiles, 99": (whole_head, (25, 50, 75, 99)),
    "deep region; deciles": (landmark_region, DECILES),
    "deep region; quartiles, 99": (landmark_region, (25, 50, 75, 99)),
    "deep region; 10, quartiles, 90": (landmark_region, (10, 25, 50, 75, 90)),
    DEFAULT: (landmark_region, PERCENTILES),
}
REASSEMBLED = "default, on 1.2 mm, change resampled to native"
METRICS = ["psnr_vol", "ssim_vol", "psnr_slice", "dice", "jump_ratio"]
HEADS = {"psnr_vol": "PSNR vol (dB)", "ssim_vol": "SSIM vol", "psnr_slice": "PSNR slice (dB)", "dice": "Dice CSF/GM/WM",
         "jump_ratio": "slice steps ×truth"}


def canonical_affine(path: Path) -> np.ndarray:
    return nb.as_closest_canonical(nb.load(str(path))).affine


def timed(store: dict, stage: str, fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    store.setdefault(stage, []).append(time.perf_counter() - t0)
    return out


def n4(v: np.ndarray, affine: np.ndarray) -> np.ndarray:
    import ants

    img, mask = to_ants(v, affine), to_ants(head_mask(v).astype(np.float32), affine)
    return ants.n4_bias_field_correction(img, mask=mask).numpy().astype(np.float32)


def denoise(v: np.ndarray, affine: np.ndarray) -> np.ndarray:
    import ants

    img, mask = to_ants(v, affine), to_ants(head_mask(v).astype(np.float32), affine)
    return ants.denoise_image(img, mask).numpy().astype(np.float32)


STEPS = {"N4": n4, "denoise": denoise}


def blind(v: np.ndarray, affine: np.ndarray, standard: dict, times: dict, stage: str = STD, reassembled: bool = True) -> tuple[np.ndarray, dict]:
    """The default standardisation (landmarks on the 1.2 mm volume, map on the native voxels) and,
    for the plain stage (``standard`` holds every variant's fit), the variants; returns (default
    output, {variant: output})."""
    v12, a12 = timed(times, f"resample to {VOXEL} mm", resample_isotropic, v, affine, VOXEL)
    region = {}

    def once(rule):  # each region once per volume
        return lambda vol, zooms: region.setdefault(rule, rule(vol, zooms))

    out = timed(times, f"{stage}: landmarks + map", lambda: standardise(
        v, standard[DEFAULT], source_landmarks=volume_landmarks(v12, region=once(landmark_region))))
    if stage != STD:
        return out, {}
    variants = {name: standardise(v, standard[name], p, volume_landmarks(v12, p, region=once(rule)))
                for name, (rule, p) in VARIANTS.items() if name != DEFAULT}
    if reassembled:  # what the pipeline's Reassemble would bring back from the 1.2 mm grid
        variants[REASSEMBLED] = v + resample_onto(standardise(v12, standard[DEFAULT], source_landmarks=volume_landmarks(
            v12, region=once(landmark_region))) - v12, a12, v.shape, affine)
    return out, variants


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--data", type=Path, default=DATA / "ixi-hh")
    p.add_argument("--unseen", default=str(DATA / "unseen-scanners"), help="real scanners without truth ('none' to skip)")
    p.add_argument("--subjects", type=int, default=None, help="TEST subjects (default 4; --quick 1)")
    p.add_argument("--classical-subjects", type=int, default=None, help="of those, how many also get N4 and denoising (default: all)")
    p.add_argument("--scanners", help=f"comma-separated (default: all: {','.join(SCANNERS)}; --quick: {','.join(QUICK_SCANNERS)})")
    p.add_argument("--train-subjects", type=int, default=None, help="TRAIN subjects every fit uses (default 12; --quick 4)")
    p.add_argument("--classical-train", type=int, default=6, help="of those, how many (put through N4 or denoising) fit the landmarks "
                   "that follow N4 or denoising")
    p.add_argument("--seed", type=int, default=0, help="seeds the simulated scanners as the benchmark does")
    args = p.parse_args()
    device = common.setup(args)
    t_start = time.perf_counter()
    args.subjects = args.subjects or (1 if args.quick else 4)
    args.classical_subjects = args.subjects if args.classical_subjects is None else min(args.classical_subjects, args.subjects)
    args.train_subjects = args.train_subjects or (4 if args.quick else 12)
    scanners = args.scanners.split(",") if args.scanners else list(QUICK_SCANNERS if args.quick else SCANNERS)
    if bad := [s for s in scanners if s not in SCANNERS]:
        p.error(f"unknown scanner(s) {', '.join(bad)}; known: {', '.join(SCANNERS)}")
    if args.quick:
        args.unseen = "none"
    splits = json.loads((args.data / "splits.json").read_text())
    train, test = splits["train"][: args.train_subjects], splits["test"][: args.subjects]

    # -- fits, TRAIN only ---------------------------------------------------------------------
    train_data = [run.load_subject(args.data, s, tissue=False)[:2] for s in train]
    train12 = [resample_isotropic(v, canonical_affine(run.t1w_path(args.data, s)), VOXEL)[0] for s, (v, _) in zip(train, train_data)]
    cache = {}  # each training volume's regions once

    def cached(rule):
        return lambda vol, zooms: cache.setdefault((rule, id(vol)), rule(vol, zooms))

    standard = {name: fit_landmarks(train12, p, region=cached(rule)) for name, (rule, p) in VARIANTS.items()}
    del train12, cache
    # A stage 1 with N4 or denoising puts the target's TRAIN volumes through the same step before the fit.
    classical_train = train[: args.classical_train] if args.classical_subjects else []
    stepped_standard = {}
    for step in PAST if classical_train else []:
        affines = [canonical_affine(run.t1w_path(args.data, s)) for s in classical_train]
        stepped_standard[step] = {DEFAULT: fit_landmarks(
            resample_isotropic(STEPS[step](v, a), a, VOXEL)[0] for (v, _), a in zip(train_data, affines))}
    peers = [pr.fit([v for v, _ in train_data], [m for _, m in train_data]) if pr.population else pr
             for pr in make_peers() if pr.name in ("none", "histmatch", "nyul")]
    reference = np.concatenate([scores.brain_sample(v, m, n=5000, seed=i) for i, (v, m) in enumerate(train_data)])
    target_gm_wm = float(np.mean([scores.gm_wm_ratio(v, m) for v, m in train_data]))
    del train_data
    print(f"fitted on {len(train)} TRAIN subjects; standard landmarks {np.round(standard[DEFAULT], 2).tolist()}", flush=True)

    # -- simulated scanners -------------------------------------------------------------------
    rows, times = [], {}
    for i, sub in enumerate(test):
        truth, mask, tissue = run.load_subject(args.data, sub)
        path = run.t1w_path(args.data, sub)
        affine, zooms = canonical_affine(path), nb.as_closest_canonical(nb.load(str(path))).header.get_zooms()[:3]
        stepped = {step: STEPS[step](truth, affine) for step in PAST} if i < args.classical_subjects else {}
        for name in scanners:
            src = simulate(name, truth, tissue, zooms, run.case_seed(args.seed, sub, name))
            outs = {pr.name: timed(times, pr.name, pr.apply, src, mask) for pr in peers}
            outs[STD], variants = blind(src, affine, standard, times)
            outs.update({f"variant: {k}": v for k, v in variants.items()})
            scored = [(method, vol, truth) for method, vol in outs.items()]
            for step in stepped:  # scored against the truth, and against the truth put through the same step
                done = timed(times, f"{step} (native grid, head mask)", STEPS[step], src, affine)
                scored.append((STD + versus(step), outs[STD], stepped[step]))
                for method, vol in ((step, done), (f"{step} + {STD}", blind(done, affine, stepped_standard[step], times, f"{step} + {STD}")[0])):
                    scored += [(method, vol, truth), (method + versus(step), vol, stepped[step])]
            for method, vol, ref in scored:
                rows.append({"subject": sub, "scanner": name, "kind": SCANNERS[name].kind, "method": method,
                             **scores.score_volume(vol, ref, mask)})
            print(f"{sub} {name}: " + ", ".join(f"{r['method']} {r['psnr_vol']:.2f}" for r in rows[-len(scored):]), flush=True)

    # -- unseen real scanners -----------------------------------------------------------------
    unseen = []
    if args.unseen != "none" and Path(args.unseen).is_dir():
        for path in sorted(Path(args.unseen).glob("sub-*/anat/*_T1w.nii.gz")):
            sub = path.name.split("_")[0]
            mask = run.propagated_brain_mask(path, run.t1w_path(args.data, train[0]), run.labels_path(args.data, train[0]), args.seed)
            source = run.load_canonical(path)
            outs = {pr.name: pr.apply(source, mask) for pr in peers}
            outs[STD], variants = blind(source, canonical_affine(path), standard, {}, reassembled=False)
            outs.update({f"variant: {k}": v for k, v in variants.items()})
            for method, vol in outs.items():
                unseen.append({"subject": sub, "method": method, "histogram_distance": scores.histogram_distance(vol, mask, reference),
                               "gm_wm_ratio": scores.gm_wm_ratio(vol, mask)})
            print(f"unseen {sub}: " + ", ".join(f"{u['method']} {u['histogram_distance']:.4f}" for u in unseen[-len(outs):]), flush=True)

    # -- tables -------------------------------------------------------------------------------
    methods = [m for m in MAIN if any(r["method"] == m for r in rows)]
    by_case = {(r["subject"], r["scanner"], r["method"]): r for r in rows}
    classical_cases = {(r["subject"], r["scanner"]) for r in rows if r["method"] == "N4"}

    def paired(method: str, metric: str, **where) -> float | None:
        """Mean difference to the standardisation alone, on the same cases and against the same truth."""
        base = STD + next((versus(s) for s in PAST if method.endswith(versus(s))), "")
        d = [r[metric] - by_case[(r["subject"], r["scanner"], base)][metric] for r in rows
             if r["method"] == method and all(r[k] == w for k, w in where.items())]
        return float(np.mean(d)) if d else None

    mean_rows = [[m, *[common.mean_by(rows, m, k)[0] for k in METRICS], common.mean_by(rows, m, "psnr_vol")[1],
                  paired(m, "psnr_vol"), paired(m, "dice")] for m in methods]
    out_md = ["## Mean over subjects and scanners", "",
              common.table(["method", *[HEADS[k] for k in METRICS], "n", f"Δ PSNR vol vs {STD}, same cases and truth", f"Δ Dice vs {STD}, same cases and truth"],
                           mean_rows)]
    shown = [m for m in ["none", "histmatch", "nyul", STD] if m in methods]
    extra = [m for m in methods if m in CLASSICAL and (STD in m)]
    for metric in ("psnr_vol", "dice"):
        body = [[f"{name} ({SCANNERS[name].kind})", *[common.mean_by(rows, m, metric, scanner=name)[0] for m in shown],
                 *([common.mean_by([r for r in rows if (r["subject"], r["scanner"]) in classical_cases], STD, metric, scanner=name)[0]] if extra else []),
                 *[common.mean_by(rows, m, metric, scanner=name)[0] for m in extra]] for name in scanners]
        out_md += ["", f"## {HEADS[metric]} per scanner", "",
                   common.table(["scanner", *shown, *([f"{STD}, on the N4/denoise cases"] if extra else []), *extra], body)]
    mono = [s for s in scanners if SCANNERS[s].kind == "monotone"]
    var_rows = []
    for name in [*VARIANTS, REASSEMBLED]:
        m = STD if name == DEFAULT else f"variant: {name}"
        var_rows.append([name, common.mean_by(rows, m, "psnr_vol")[0],
                         float(np.mean([common.mean_by(rows, m, "psnr_vol", scanner=s)[0] for s in mono])) if mono else None,
                         common.mean_by(rows, m, "dice")[0],
                         *[next((u["histogram_distance"] for u in unseen if u["method"] == m and u["subject"] == s), None)
                           for s in sorted({u["subject"] for u in unseen})]])
    out_md += ["", "## Variants of the blind standardisation (the same cases)", "",
               common.table(["landmarks: region; percentiles (and the background)", "PSNR vol (dB)", "PSNR vol, monotone scanners",
                             "Dice", *[f"histogram distance, {s}" for s in sorted({u["subject"] for u in unseen})]], var_rows)]
    if unseen:
        out_md += ["", "## Unseen real scanners (no truth)", "",
                   common.table(["scan", "method", "histogram distance", "GM/WM ratio", "|ratio − target|"],
                                [[u["subject"], u["method"], u["histogram_distance"], u["gm_wm_ratio"], abs(u["gm_wm_ratio"] - target_gm_wm)]
                                 for u in unseen if not u["method"].startswith("variant")])]
    timing = {k: {"median_s": statistics.median(v), "mean_s": float(np.mean(v)), "n": len(v)} for k, v in times.items()}
    out_md += ["", "## Seconds per volume, per stage", "",
               common.table(["stage", "median s", "mean s", "n"], [[k, t["median_s"], t["mean_s"], t["n"]] for k, t in timing.items()])]
    notes = [
        f"Data: {len(test)} IXI-HH TEST subject(s) ({', '.join(test)}) × {len(scanners)} simulated scanner(s), made as the quality "
        f"benchmark makes them (seed {args.seed}); N4 and denoising on the first {args.classical_subjects} subject(s) only "
        f"({len(classical_cases)} cases; the Δ columns compare them with the standardisation alone on those same cases).",
        f"Every fit on the first {len(train)} TRAIN subjects (of {len(splits['train'])}): the standard landmarks, histogram matching's "
        "target, Nyúl's, and the unseen scanners' reference intensities. The peers get the brain mask; the standardisation gets none.",
        "Scores as the quality benchmark's (benchmarks.quality.scores), against the truth, in the brain (dlmuse label > 0), on the "
        "native 2 mm grid: the volume protocol maps the brain's 1st/99th percentiles to 0/1, so only the shape of the map counts, not its units.",
        f"After N4 or denoising, the standardisation's landmarks are fit on the first {len(classical_train)} TRAIN subjects put through "
        "the same step (a stage 1 with the step defines the target domain with it). Such candidates, and the standardisation alone, are "
        "scored twice: against the truth (the benchmark's target: IXI-HH as acquired) and against the truth put through the same step "
        "((vs … truth): the target domain a prior trained after that step would hold). Δ compares like with like: the same cases, "
        "the same truth.",
        f"The standardisation's landmarks come from the {VOXEL} mm canonical volume (the pipeline's grid); the map is applied to the native "
        f"voxels. Applied on the {VOXEL} mm grid and brought back as the pipeline's Reassemble brings a harmonization back (the change, "
        "resampled, added to the input), it loses to the resampling itself: see the variants.",
        "N4 and denoising run on the native grid, where the noise is independent from voxel to voxel and the volume is smaller (on the "
        f"{VOXEL} mm grid an IXI head has (2/{VOXEL})³ ≈ 4.6× the voxels, and both take about that much longer).",
        f"Unseen scanners: the target GM/WM ratio is {target_gm_wm:.3f} (mean over the TRAIN subjects); histogram distance is the "
        "benchmark's Wasserstein-1 distance of robust-scaled brain intensities (0 = the same distribution).",
        f"Whole run {time.perf_counter() - t_start:.0f} s.",
    ]
    results = {"rows": rows, "unseen": unseen, "timing": timing, "train": train, "test": test, "scanners": scanners,
               "classical_subjects": args.classical_subjects, "standard_landmarks": {k: v.tolist() for k, v in standard.items()},
               "default_percentiles": list(PERCENTILES), "target_gm_wm": target_gm_wm}
    common.write_results(args, device, "standardise_probe", "Probe: blind landmark standardisation, with and without N4 and denoising",
                         "\n".join(out_md), notes, results)


if __name__ == "__main__":
    main()
