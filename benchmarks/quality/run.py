"""Drive the benchmark: simulated sources from TEST subjects, the real CLI, peers, scores, tables.

    python -m benchmarks.quality --quick
    python -m benchmarks.quality --subjects 35 --ablation-subjects 5

Steps (each resumable: the simulated dataset and Nipype's work folders are kept in --work):
1. build a BIDS dataset ``sub-<IXI>/ses-<scanner>`` of simulated source scanners, written in the
   subjects' own orientation (PSR), from TEST subjects only; the truth stays in ixi-hh;
2. run ``bidsharmony SIM OUT participant`` with the defaults and once per ablation (real CLI,
   real Nipype, real resampling); the unseen real scanners go through the defaults too;
3. apply the classical peers to the same files (population fits on TRAIN subjects);
4. score everything against the truth and write the tables, JSON and plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import time
import zlib
from pathlib import Path

import nibabel as nb
import numpy as np

from benchmarks.quality import scores
from benchmarks.quality.peers import make_peers
from benchmarks.quality.plan import ABLATIONS, BHDIFF, METHOD, UNSEEN_ABLATIONS
from bidsharmony.metrics import mask_slices
from bidsharmony.simulation import QUICK_SCANNERS, SCANNERS, simulate

LOG = logging.getLogger("benchmarks.quality")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/ixi-hh"), help="target-domain BIDS dataset with splits.json and derivatives/dlmuse")
    p.add_argument("--unseen", default="../shared/data/unseen-scanners", help="BIDS dataset of real scanners without truth ('none' to skip)")
    p.add_argument("--model", type=Path, help="model folder (default: the bundled model)")
    p.add_argument("--scanners", help=f"comma-separated simulated scanners (default: all: {','.join(SCANNERS)})")
    p.add_argument("--subjects", type=int, help="how many TEST subjects (default: all; --quick: 2)")
    p.add_argument("--ablations", help=f"comma-separated, 'all' or 'none' (default: all; --quick: none): {','.join(ABLATIONS)}")
    p.add_argument("--ablation-subjects", type=int, default=1, help="TEST subjects the ablations run on")
    p.add_argument("--ablation-scanners", default=",".join(QUICK_SCANNERS), help="scanners the ablations run on")
    p.add_argument("--bhdiff-model", type=Path, help="a bhdiff model folder: also score --method bhdiff (3D) on the ablation subjects")
    p.add_argument("--bhdiff-scanners", help="scanners the 3D method runs on (default: the ablation scanners)")
    p.add_argument("--bhdiff-args", default="", help="extra options for the bhdiff run only, e.g. '--ode-steps 8'")
    p.add_argument("--train-subjects", type=int, help="TRAIN subjects for the peers' population fits (default: all; --quick: 20)")
    p.add_argument("--cli-args", default="", help="extra options for every bidsharmony run, e.g. '--iterations 5'")
    p.add_argument("--work", type=Path, default=Path("benchmark-work"), help="simulated data, outputs and Nipype work (kept: a rerun resumes)")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="where the table, JSON and plots go")
    p.add_argument("--name", default=None, help="stem of the result files (default: quality or quality-quick)")
    p.add_argument("--quick", action="store_true", help=f"2 subjects, scanners {','.join(QUICK_SCANNERS)}, no ablations: minutes on 2 cores")
    p.add_argument("--nprocs", type=int, default=None, help="passed to bidsharmony")
    p.add_argument("--device", default="auto", help="passed to bidsharmony")
    p.add_argument("--seed", type=int, default=0, help="seeds the simulated scanners and bidsharmony")
    a = p.parse_args(argv)
    a.scanners = (a.scanners.split(",") if a.scanners else list(QUICK_SCANNERS if a.quick else SCANNERS))
    a.ablation_scanners = [s for s in a.ablation_scanners.split(",") if s in a.scanners]
    bh = a.bhdiff_scanners.split(",") if a.bhdiff_scanners else []
    a.bhdiff_scanners = [s for s in bh if s in a.scanners] if bh else a.ablation_scanners
    unknown = [s for s in a.scanners + bh if s not in SCANNERS]
    if unknown:
        p.error(f"unknown scanner(s) {', '.join(unknown)}; known: {', '.join(SCANNERS)}")
    abl = a.ablations or ("none" if a.quick else "all")
    a.ablations = [] if abl == "none" else list(ABLATIONS) if abl == "all" else abl.split(",")
    if bad := [k for k in a.ablations if k not in ABLATIONS]:
        p.error(f"unknown ablation(s) {', '.join(bad)}; known: {', '.join(ABLATIONS)}")
    a.subjects = a.subjects or (2 if a.quick else None)
    a.train_subjects = a.train_subjects or (20 if a.quick else None)
    a.name = a.name or ("quality-quick" if a.quick else "quality")
    return a


# -- data --------------------------------------------------------------------------------------

def t1w_path(data: Path, sub: str) -> Path:
    return data / sub / "anat" / f"{sub}_T1w.nii.gz"


def labels_path(data: Path, sub: str) -> Path:
    return data / "derivatives" / "dlmuse" / sub / "anat" / f"{sub}_seg-dlmuse_dseg.nii.gz"


def load_canonical(path: Path) -> np.ndarray:
    return np.asarray(nb.as_closest_canonical(nb.load(str(path))).dataobj, dtype=np.float32)


def load_subject(data: Path, sub: str, tissue: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(T1w, brain mask, CSF/GM/WM classes or None), RAS-canonical."""
    t1 = load_canonical(t1w_path(data, sub))
    labels = load_canonical(labels_path(data, sub)).astype(np.int32)
    return t1, labels > 0, scores.tissue_classes(t1, labels) if tissue else None


def participant_ages(data: Path) -> dict[str, float]:
    """{sub-X: age} from the dataset's participants.tsv (empty where it has no ages)."""
    import csv

    path = data / "participants.tsv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    out = {}
    for row in rows:
        try:
            out[row["participant_id"]] = float(row["age"])
        except (KeyError, TypeError, ValueError):
            continue
    return out


def case_seed(seed: int, *parts: str) -> int:
    return zlib.crc32("/".join([str(seed), *parts]).encode())


def build_simulated(args, subjects: list[str]) -> Path:
    """The BIDS dataset of simulated source scanners (from TEST subjects; never the truth itself)."""
    sim = args.work / "sim"
    sim.mkdir(parents=True, exist_ok=True)
    (sim / "dataset_description.json").write_text(json.dumps({
        "Name": "bidsharmony benchmark: simulated source scanners from IXI-HH test subjects",
        "BIDSVersion": "1.10.0", "DatasetType": "raw",
        "License": "CC BY-SA 3.0 (derived from IXI, brain-development.org/ixi-dataset)",
    }, indent=2) + "\n")
    for sub in subjects:
        src = nb.load(str(t1w_path(args.data, sub)))
        canon = nb.as_closest_canonical(src)
        back = nb.orientations.ornt_transform(nb.orientations.io_orientation(canon.affine), nb.orientations.io_orientation(src.affine))
        t1, _, tissue = load_subject(args.data, sub)
        for name in args.scanners:
            out = sim / sub / f"ses-{name}" / "anat" / f"{sub}_ses-{name}_T1w.nii.gz"
            if out.is_file():
                continue
            data = simulate(name, t1, tissue, canon.header.get_zooms()[:3], case_seed(args.seed, sub, name))
            img = nb.Nifti1Image(data, canon.affine).as_reoriented(back)  # back to the subject's own orientation
            img.header.set_xyzt_units("mm")
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.partial.nii.gz")
            nb.save(img, str(tmp))
            tmp.replace(out)
        LOG.info("simulated %d scanner(s) for %s", len(args.scanners), sub)
    return sim


# -- running the CLI ---------------------------------------------------------------------------

def run_cli(args, bids: Path, key: str, extra: list[str], participants=None, sessions=None) -> tuple[Path, float]:
    """Run the real ``bidsharmony … participant``; returns (output folder, wall seconds), the
    seconds None when the run wrote nothing new (every output reused from an earlier run in --work)."""
    out = args.work / f"out-{key}"
    cmd = [sys.executable, "-m", "bidsharmony", str(bids), str(out), "participant",
           "-w", str(args.work / f"work-{key}"), "--random-seed", str(args.seed), "--device", args.device,
           *(["--model", str(args.model)] if args.model else []),
           *(["--nprocs", str(args.nprocs)] if args.nprocs else []),
           *(["--participant-label", *participants] if participants else []),
           *(["--session-label", *sessions] if sessions else []),
           *shlex.split(args.cli_args), *extra]
    log = args.work / f"log-{key}.txt"
    LOG.info("running %s", shlex.join(cmd))
    t0, started = time.perf_counter(), time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"bidsharmony ({key}) exited {rc}; see {log}:\n{tail}")
    # A resumed benchmark whose run wrote nothing: its wall time says nothing about the method.
    reused = not any(p.stat().st_mtime >= started for p in out.glob("sub-*/**/*_desc-harmonized_T1w.nii.gz"))
    LOG.info("%s finished in %.0f s%s", key, wall, " (outputs reused)" if reused else "")
    return out, None if reused else wall


def harmonized(out: Path, sub: str, ses: str | None) -> tuple[np.ndarray, dict]:
    folder = out / sub / (f"ses-{ses}" if ses else "") / "anat"
    path = next(folder.glob("*desc-harmonized_T1w.nii.gz"))
    return load_canonical(path), json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())


# -- unseen scanners ---------------------------------------------------------------------------

def propagated_brain_mask(t1w: Path, atlas_t1w: Path, atlas_labels: Path, seed: int) -> np.ndarray:
    """A brain mask for a scan without one: an IXI TRAIN subject's parcellation brought over by
    ANTs affine registration (nearest neighbour), eroded by 2 voxels against misregistration.
    Not repeatable here: repeated registrations of TrioTim gave masks 9-21 thousand voxels apart (of
    1.6 million) on one ITK thread, with the seed set through ``ants.config`` or ANTS_RANDOM_SEED, and
    with dense sampling. Every method of one run is scored with the same mask, so a run compares them
    like for like; across runs, histogram matching's distance on studyforrest has moved 0.0045-0.0139."""
    import ants
    from scipy import ndimage

    fixed, moving = ants.image_read(str(t1w)), ants.image_read(str(atlas_t1w))
    reg = ants.registration(fixed, moving, type_of_transform="Affine", random_seed=seed)
    mask = ants.apply_transforms(fixed, ants.image_read(str(atlas_labels)) > 0, reg["fwdtransforms"], interpolator="nearestNeighbor")
    img = nb.load(str(t1w))
    canon = nb.as_closest_canonical(nb.Nifti1Image(mask.numpy().astype(np.uint8), img.affine))
    return ndimage.binary_erosion(np.asarray(canon.dataobj) > 0, iterations=2)


# -- the whole run -----------------------------------------------------------------------------

def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    t_start = time.time()
    splits = json.loads((args.data / "splits.json").read_text())
    test = [s if s.startswith("sub-") else f"sub-{s}" for s in splits["test"]][: args.subjects]
    train = [s if s.startswith("sub-") else f"sub-{s}" for s in splits["train"]][: args.train_subjects]
    args.work.mkdir(parents=True, exist_ok=True)
    args.work = args.work.resolve()

    sim = build_simulated(args, test)
    labels = [s.removeprefix("sub-") for s in test]
    outputs = {METHOD: run_cli(args, sim, "default", [], labels, args.scanners)}
    abl_subjects = labels[: args.ablation_subjects]
    for key in args.ablations:
        outputs[key] = run_cli(args, sim, key, ABLATIONS[key][1], abl_subjects, args.ablation_scanners)
    cases = {key: (abl_subjects, args.ablation_scanners) for key in args.ablations}
    if args.bhdiff_model:  # the 3D method, scored beside the 2D one and the peers on the same volumes
        outputs[BHDIFF] = run_cli(args, sim, BHDIFF, ["--method", "bhdiff", "--model", str(args.bhdiff_model.resolve()),
                                                      *shlex.split(args.bhdiff_args)], abl_subjects, args.bhdiff_scanners)
        cases[BHDIFF] = (abl_subjects, args.bhdiff_scanners)

    LOG.info("fitting peers on %d TRAIN subjects", len(train))
    train_data = [load_subject(args.data, s, tissue=False)[:2] for s in train]
    peers = [p.fit([v for v, _ in train_data], [m for _, m in train_data]) if p.population else p for p in make_peers()]
    reference = np.concatenate([scores.brain_sample(v, m, n=5000, seed=i) for i, (v, m) in enumerate(train_data)])
    train_ratios = [scores.gm_wm_ratio(v, m) for v, m in train_data]
    target_gm_wm = float(np.mean(train_ratios))

    rows, examples, models, biology = [], {}, {}, {}
    ages = participant_ages(args.data)
    for sub in test:
        truth, mask, _ = load_subject(args.data, sub)
        truth_seg = scores.segment(truth, mask)  # once per subject: every output of it is scored against it
        biology[sub] = {"age": ages.get(sub), "gm_fraction_truth": scores.gm_fraction(truth_seg)}
        for name in args.scanners:
            source = load_canonical(sim / sub / f"ses-{name}" / "anat" / f"{sub}_ses-{name}_T1w.nii.gz")
            results = {}
            for peer in peers:
                t0 = time.perf_counter()
                results[peer.name] = (peer.apply(source, mask), time.perf_counter() - t0)
            for key, (out, wall) in outputs.items():
                if key != METHOD and (sub.removeprefix("sub-") not in cases[key][0] or name not in cases[key][1]):
                    continue
                vol, side = harmonized(out, sub, name)
                models.setdefault(key, side["Model"])
                results[key] = (vol, side["HarmonizationSeconds"])
            for method, (vol, seconds) in results.items():
                rows.append({"subject": sub, "scanner": name, "kind": SCANNERS[name].kind, "method": method,
                             **scores.score_volume(vol, truth, mask, truth_seg), "seconds": round(float(seconds), 3)})
            if sub == test[0]:
                k = int(np.median(mask_slices(mask)))
                examples[name] = {"truth": truth[..., k], **{m: v[..., k] for m, (v, _) in results.items()}}
        LOG.info("scored %s", sub)

    unseen = []
    if args.unseen != "none" and Path(args.unseen).is_dir():
        out, _ = run_cli(args, Path(args.unseen), "unseen", [])
        # The stage ablations (no loop: seconds per scan) on the unseen scans too, scored with the same masks.
        staged = {key: run_cli(args, Path(args.unseen), f"unseen-{key}", ABLATIONS[key][1])[0]
                  for key in args.ablations if key in UNSEEN_ABLATIONS}
        for path in sorted(Path(args.unseen).glob("sub-*/anat/*_T1w.nii.gz")):
            sub = path.name.split("_")[0]
            mask = propagated_brain_mask(path, t1w_path(args.data, train[0]), labels_path(args.data, train[0]), args.seed)
            source = load_canonical(path)
            vols = {p.name: p.apply(source, mask) for p in peers}
            vols[METHOD] = harmonized(out, sub, None)[0]
            vols.update({f"{METHOD}, {ABLATIONS[key][0]}": harmonized(o, sub, None)[0] for key, o in staged.items()})
            for method, vol in vols.items():
                unseen.append({"subject": sub, "method": method, "brain_ml": float(mask.sum() * np.prod(nb.load(str(path)).header.get_zooms()[:3]) / 1000),
                               "histogram_distance": scores.histogram_distance(vol, mask, reference),
                               "gm_wm_ratio": scores.gm_wm_ratio(vol, mask)})
            LOG.info("scored unseen %s", sub)

    from benchmarks.quality.report import write_report
    from bidsharmony.flow.checkpoint import has_denoiser, read_config
    from bidsharmony.models import default_model

    seen = ["noise"] if has_denoiser(read_config(args.model or default_model())) else []  # what training drew
    if "--landmark-region brain" in " ".join(args.cli_args.split()):
        seen.append("spatial")  # the learned brain mask's training drew smooth fields (and noise)
    write_report(args, rows, unseen, examples, model=models.get(METHOD), bhdiff_model=models.get(BHDIFF), target_gm_wm=target_gm_wm, target_gm_wm_range=(float(np.min(train_ratios)), float(np.max(train_ratios))),
                 walls={k: v[1] for k, v in outputs.items()}, seconds_total=time.time() - t_start,
                 train=train, test=test, biology=biology, seen=seen)
    return 0
