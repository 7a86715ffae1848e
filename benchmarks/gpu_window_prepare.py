"""Prepare a GPU window on a CPU: the data file and the wheels that the GPU machine lacks.

A GPU machine gets a copy of the working tree (64 MiB at most, with the carried folders) and has
torch, numpy, scipy and safetensors, but neither nibabel nor antspyx nor zuko, and no network. So
everything that needs them happens here, once:

- every TRAIN subject of ``splits.json`` is resampled and cut by the project's own functions
  (``image.io.load_t1w`` -> ``image.resample.canonical``/``resample_isotropic`` -> ``image.slices.cut``,
  what the training prep workflow runs) and read back with ``train.data.load_slice_set``;
- ``train.data.split_by_subject`` holds out the validation subjects (``--validation-fraction 0.05``
  and seed 0 give the shipped model's eight);
- the mean start images and the target histogram come from all training subjects
  (``train.data.mean_start_images``/``intensity_histogram``, as the train level computes them);
- the file takes the validation slices at 12 bits (every ``--val-step``-th), one TEST head at 12
  bits for the speed measurement only, and as many training subjects as fit ``--budget-mib``
  (every ``--slice-step``-th slice, on a ``--bits`` grid): subjects no earlier window trained on
  first, so successive windows cover the whole training set;
- the reference model (the shipped default) is scored on the same validation slices, so a window's
  bits/dim has a comparison;
- pure-Python wheels (zuko for the flow's splines; pytest and its dependencies for the CUDA tests).

    python benchmarks/gpu_window_prepare.py                   # -> benchmarks/gpu_window_data/ (ignored by git)
    python benchmarks/gpu_window_prepare.py --budget-mib 20   # a smaller data file

The default budget is what fits: 56 MiB minus the working tree that travels anyway (tracked and
untracked, non-ignored files), at most 32 MiB. Slices are cached per subject in
``benchmarks/.gpu_window_cache/`` (ignored, never carried). Nothing here is committed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import gpu_window_io as gwio  # noqa: E402

OUT = HERE / "gpu_window_data"
CACHE = HERE / ".gpu_window_cache"
ROOT = REPO.parent / "shared" / "data" / "ixi-hh"
DATA_FILE = "gpu_window_data.npz"
MIB = 2**20
# zuko: the flow's spline transforms. pytest and what it imports on Python 3.10-3.13.
WHEELS = ("zuko", "pytest", "pluggy", "iniconfig", "packaging", "pygments", "exceptiongroup", "tomli")


def tree_bytes(repo: Path = REPO) -> int:
    """Bytes of the working tree that a GPU machine receives anyway (tracked + untracked, not ignored)."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=repo, check=True,
                               capture_output=True).stdout.split(b"\0")  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return 0
    total = 0
    for n in names:
        p = repo / n.decode()
        if n and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def subject_runs(root: Path, subject: str) -> list[Path]:
    sub = subject if subject.startswith("sub-") else f"sub-{subject}"
    return sorted(p for p in (root / sub).rglob("*_T1w.nii*") if p.parent.name == "anat")


def slice_subject(root: Path, subject: str, grid=(144, 176), cache: Path | None = None):
    """SliceSet of one subject's head slices (12-bit codes), cut as the train level cuts them."""
    from bidsharmony.image.io import load_t1w
    from bidsharmony.image.resample import canonical, resample_isotropic
    from bidsharmony.image.slices import cut
    from bidsharmony.train.data import SliceSet, load_slice_set

    label = subject.removeprefix("sub-")
    runs = subject_runs(root, label)
    if not runs:
        raise SystemExit(f"{root}: no T1w for sub-{label}")
    key = cache / f"{root.name}_{label}_{grid[0]}x{grid[1]}.npz" if cache else None
    if key is not None and key.is_file():
        with np.load(key, allow_pickle=False) as z:
            return SliceSet(z["codes"], np.array([label] * len(z["codes"])), z["position_bin"])
    items = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(runs):
            img, data = load_t1w(path)  # what ResampleToHarmonizationSpace and SliceVolume run
            data, affine = canonical(data, img.affine)
            data, _ = resample_isotropic(data, affine, 1.2)
            slices, record = cut(data, grid)
            np.save(f"{tmp}/{i}.npy", slices)
            record.save(f"{tmp}/{i}.npz")
            items.append((label, f"{tmp}/{i}.npy", f"{tmp}/{i}.npz"))
        s = load_slice_set(items)
    if key is not None:
        key.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(key, codes=s.codes, position_bin=s.position_bin)
    return s


def preprocessing(grid) -> dict:
    """What a model trained on these slices expects (the train level records the same)."""
    from bidsharmony.flow.scaling import BITS
    from bidsharmony.image.slices import POSITION_BINS

    return {
        "voxel_size": 1.2,
        "orientation": "RAS",
        "slice_axis": "axial (inferior-superior)",
        "slice_shape": list(grid),
        "normalisation": "per-slice min-max to [0, 1] inside the grid",
        "quantisation_bits": BITS,
        "position_bins": POSITION_BINS,
    }


def model_folders(paths) -> list[Path]:
    out = []
    for p in paths:
        p = Path(p)
        if (p / "config.json").is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(q for q in p.iterdir() if (q / "config.json").is_file())
    return out


def previous_subjects(folders, preset: str) -> tuple[dict, Path | None]:
    """{subject: windows that trained on it} from the newest model folder of ``preset``."""
    best, when = None, -1.0
    for f in model_folders(folders):
        cfg = json.loads((f / "config.json").read_text())
        if cfg.get("preset") != preset:
            continue
        t = cfg.get("training", {}).get("finished_unix") or (f / "config.json").stat().st_mtime
        if t > when:
            best, when = (f, cfg), t
    if best is None:
        return {}, None
    data = best[1].get("training_data", {})
    return {str(k): int(v) for k, v in data.get("subject_windows", {}).items()}, best[0]


def collect_wheels(out: Path, names=WHEELS, from_venv: bool = False) -> list[dict]:
    """Pure-Python wheels of ``names`` in ``out``: ``pip download`` (the installed version where
    there is one), or, offline, a zip of the installed distribution (importable from sys.path)."""
    from importlib import metadata

    out.mkdir(parents=True, exist_ok=True)
    got = []
    for name in names:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = None
        spec = f"{name}=={version}" if version else name
        have = {p.name for p in out.glob("*.whl")}
        ok = False
        if not from_venv:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.10",
                                "--implementation", "py", "--abi", "none", "--platform", "any", "-q", "-d", str(out), spec],
                               capture_output=True, text=True)  # fmt: skip
            new = sorted({p.name for p in out.glob("*.whl")} - have)
            ok = r.returncode == 0 and bool(new) or any(p.startswith(name.replace("-", "_") + "-") for p in have)
        if not ok and version:
            ok = _zip_installed(name, out) is not None
        if ok:
            got.append({"name": name, "version": version})
        else:
            print(f"warning: no wheel for {name} (the GPU machine must have it)", file=sys.stderr)
    for p in out.glob("*.whl"):
        if not p.name.endswith("-none-any.whl"):
            p.unlink()  # only pure-Python wheels run on any Python
    return got


def _zip_installed(name: str, out: Path) -> Path | None:
    """The installed files of a pure-Python distribution, zipped as ``<name>-<ver>-py3-none-any.whl``."""
    from importlib import metadata

    dist = metadata.distribution(name)
    files = [f for f in dist.files or [] if "__pycache__" not in f.parts]
    if any(str(f).endswith((".so", ".pyd")) for f in files):
        return None
    path = out / f"{name.replace('-', '_')}-{dist.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            src = Path(dist.locate_file(f))
            if src.is_file() and not str(f).startswith(".."):
                z.write(src, str(f))
    return path


def prepare(root: Path, train_subjects: list[str], test_subjects: list[str], out: Path, budget: int, *, bits: int = 10,
            slice_step: int = 3, val_step: int = 8, validation_fraction: float = 0.05, seed: int = 0,
            previous=(), preset: str = "paper", reference: Path | None = None, cache: Path | None = CACHE,
            wheels: bool = True, wheels_from_venv: bool = False, grid=(144, 176), log=print) -> dict:  # fmt: skip
    """Writes ``out/gpu_window_data.npz`` (and ``out/wheels/``); returns the file's meta."""
    from bidsharmony.train.data import SliceSet, intensity_histogram, mean_start_images, split_by_subject

    train_subjects = [s.removeprefix("sub-") for s in train_subjects]
    test_subjects = [s.removeprefix("sub-") for s in test_subjects]
    if set(train_subjects) & set(test_subjects):
        raise SystemExit(f"subjects in both train and test: {sorted(set(train_subjects) & set(test_subjects))}")
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, s in enumerate(train_subjects):
        parts.append(slice_subject(root, s, grid, cache))
        if (i + 1) % 10 == 0 or i + 1 == len(train_subjects):
            log(f"sliced {i + 1}/{len(train_subjects)} training subjects ({time.time() - t0:.0f} s)")
    full = SliceSet(np.concatenate([p.codes for p in parts]), np.concatenate([p.subject for p in parts]),
                    np.concatenate([p.position_bin for p in parts]))  # fmt: skip
    del parts
    train, val = split_by_subject(full, validation_fraction, seed)
    del full
    val_subjects = sorted(set(val.subject.tolist()))
    meta = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": shlex.join(["python", *sys.argv]),
        "source": {"root": str(root), "dataset": _dataset_name(root), "tag": root.resolve().name},
        "licence": _licence(root),
        "preprocessing": preprocessing(grid),
        "split": {"train_subjects": sorted(set(train.subject.tolist())), "validation_subjects": val_subjects,
                  "test_subjects": test_subjects, "validation_fraction": validation_fraction, "seed": seed},  # fmt: skip
    }
    w = gwio.Writer(meta)

    # what the model needs from all training subjects, exactly as the train level computes it
    start = mean_start_images(train)
    w.add("start_images", gwio.to_codes(start, 12))
    w.arrays["target_histogram"] = intensity_histogram(train).astype(np.float32)
    meta["start_images"] = {"bits": 12, "from": "train.data.mean_start_images of all training subjects"}

    # validation: 12-bit codes, every val_step-th slice of the held-out subjects
    v = val.subset(np.arange(len(val)) % val_step == 0)
    names = sorted(set(v.subject.tolist()))
    w.add("val", v.codes, [names.index(s) for s in v.subject], v.position_bin)
    meta["val"] = {"subjects": names, "bits": 12, "slice_step": val_step, "slices": len(v)}

    # one TEST head on the training grid: speed only, never fitted
    test = slice_subject(root, test_subjects[0], grid, cache)
    w.add("test", gwio.to_codes(test.codes.astype(np.float32) / 4095, bits))
    meta["test"] = {"subject": test_subjects[0], "bits": bits, "slices": len(test), "use": "speed measurement only"}

    if reference is not None and (Path(reference) / "config.json").is_file():
        from bidsharmony.flow.checkpoint import load_model
        from bidsharmony.train.loop import evaluate_bpd

        m = load_model(reference)
        same = m.config.get("training_data", {}).get("subjects_validation")
        meta["reference"] = {"name": m.name, "preset": m.config.get("preset"), "sha256": m.sha256,
                             "validation_bpd_recorded": m.config.get("validation_bpd"),
                             "validation_bpd_here": round(evaluate_bpd(m.flow, v.codes, "cpu"), 5),
                             "same_validation_subjects": same == val_subjects}  # fmt: skip
        log(f"reference {m.name}: {meta['reference']['validation_bpd_here']:.4f} bits/dim on these validation slices")

    wheel_info = collect_wheels(out / "wheels", from_venv=wheels_from_venv) if wheels else []
    meta["wheels"] = wheel_info
    wheel_bytes = sum(p.stat().st_size for p in (out / "wheels").glob("*.whl")) if wheels else 0

    # training subjects: those fewest earlier windows saw first, then a seeded order
    seen, prev = previous_subjects(previous, preset)
    rng = np.random.default_rng(seed + sum(seen.values()))
    order = sorted(rng.permutation(meta["split"]["train_subjects"]).tolist(), key=lambda s: seen.get(s, 0))
    room = budget - wheel_bytes - w.nbytes() - 64 * 1024
    taken, n_slices = [], 0
    for s in order:
        sel = train.subject == s
        codes = gwio.to_codes(train.codes[sel][::slice_step].astype(np.float32) / 4095, bits)
        blob = gwio.encode(codes)
        if len(blob) > room:
            break
        w.add("train", codes, np.full(len(codes), len(taken)), train.position_bin[sel][::slice_step], blob=blob)
        taken.append(s)
        n_slices += len(codes)
        room -= len(blob)
    if not taken:
        raise SystemExit(f"--budget-mib {budget / MIB:.1f}: no training subject fits")
    meta["train"] = {"subjects": taken, "bits": bits, "slice_step": slice_step, "slices": n_slices,
                     "dither": "uniform inside the coarse bin, then 12-bit codes (gpu_window_io.to_12bit)" if bits < 12 else None}  # fmt: skip
    meta["previous"] = {"model": str(prev) if prev else None, "subject_windows": seen}
    w.write(out / DATA_FILE)
    size = (out / DATA_FILE).stat().st_size
    log(f"wrote {out / DATA_FILE}: {size / MIB:.1f} MiB; {len(taken)} of {len(order)} training subjects ({n_slices} slices, "
        f"{bits} bits, every {slice_step}. slice), {len(v)} validation slices, test head {test_subjects[0]} ({len(test)} slices); "
        f"wheels {wheel_bytes / MIB:.1f} MiB; {time.time() - t0:.0f} s")  # fmt: skip
    return meta


def _licence(root: Path) -> str | None:
    """The dataset's licence and attribution: weights trained on it carry both."""
    try:
        d = json.loads((root / "dataset_description.json").read_text())
    except (OSError, ValueError):
        return None
    if not d.get("License"):
        return None
    how = d.get("HowToAcknowledge") or d.get("Acknowledgements")
    return f"{d['License']} (trained on {d.get('Name', root.name)}" + (f"; {how})" if how else ")")


def _dataset_name(root: Path) -> str:
    try:
        return json.loads((root / "dataset_description.json").read_text()).get("Name", root.name)
    except (OSError, ValueError):
        return root.name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("--root", type=Path, default=ROOT, help="the target BIDS dataset (default ../shared/data/ixi-hh)")
    p.add_argument("--splits", type=Path, default=None, help="JSON with 'train' and 'test' subject lists (default ROOT/splits.json)")
    p.add_argument("--train-subjects", nargs="+", default=None, help="instead of --splits: the training subjects")
    p.add_argument("--test-subject", default=None, help="the head timed for speed (default: the first TEST subject)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--budget-mib", type=float, default=None, help="size of the data folder (default: 56 MiB - the working tree, at most 32)")
    p.add_argument("--bits", type=int, default=10, choices=range(8, 13), metavar="{8..12}",
                   help="grid of the training slices (default 10: a third smaller than 12 bits; the reference model "
                        "scores dithered 10-bit slices 0.1 bits/dim above the originals, 8-bit ones 0.5 above)")  # fmt: skip
    p.add_argument("--slice-step", type=int, default=3,
                   help="every n-th training slice (default 3: slices 1.2 mm apart, cut from 2 mm scans, repeat each other; "
                        "the budget goes further on more subjects)")
    p.add_argument("--val-step", type=int, default=8, help="every n-th validation slice (default 8)")
    p.add_argument("--validation-fraction", type=float, default=0.05, help="as the train level's option (0.05: the shipped model's split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="paper", help="the preset the window trains (its earlier models say which subjects were seen)")
    p.add_argument("--previous", nargs="*", type=Path, default=[REPO / "bidsharmony" / "data" / "models"],
                   help="model folders (or folders of them) of earlier windows")
    p.add_argument("--reference", type=Path, default=REPO / "bidsharmony" / "data" / "models" / "ixi-hh-fast")
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--no-wheels", action="store_true")
    p.add_argument("--wheels-from-venv", action="store_true", help="zip the installed packages instead of asking pip (offline)")
    args = p.parse_args(argv)

    if args.train_subjects:
        train, test = args.train_subjects, [args.test_subject] if args.test_subject else []
    else:
        splits = json.loads((args.splits or args.root / "splits.json").read_text())
        train, test = splits["train"], splits["test"]
        if args.test_subject:
            test = [args.test_subject, *[t for t in test if t.removeprefix("sub-") != args.test_subject.removeprefix("sub-")]]
    if not test:
        p.error("a test subject is needed (--test-subject)")
    tree = tree_bytes()
    budget = int(args.budget_mib * MIB) if args.budget_mib else int(min(32 * MIB, 56 * MIB - tree))
    if budget < 4 * MIB:
        p.error(f"the working tree is {tree / MIB:.1f} MiB: no room for data; pass --budget-mib")
    print(f"working tree {tree / MIB:.1f} MiB; data budget {budget / MIB:.1f} MiB")
    prepare(args.root, train, test, args.out, budget, bits=args.bits, slice_step=args.slice_step, val_step=args.val_step,
            validation_fraction=args.validation_fraction, seed=args.seed, previous=args.previous, preset=args.preset,
            reference=args.reference, cache=args.cache, wheels=not args.no_wheels, wheels_from_venv=args.wheels_from_venv)  # fmt: skip
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.out}: {total / MIB:.1f} MiB; with the working tree {(total + tree) / MIB:.1f} MiB of the 64 MiB a GPU machine receives")
    try:
        rel = args.out.resolve().relative_to(REPO)
    except ValueError:
        rel = args.out
    print(f"on the GPU machine: python benchmarks/gpu_window.py --deadline 540 --data {rel}/{DATA_FILE} --out $OUT   (carry: {rel})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
