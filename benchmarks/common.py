"""Shared helpers of the benchmark scripts: arguments, timing, memory, machine info, result files."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the scripts run as files (python benchmarks/x.py): make the benchmarks package importable
    sys.path.insert(0, str(REPO))

from benchmarks.quality.machine import machine_info as _machine_info
from benchmarks.quality.machine import versions

RSS_NOTE = "CPU peak memory is the process-wide peak RSS (ru_maxrss): a high-water mark that never goes down, so a row shows the maximum over everything measured up to and including it."


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: a smoke run (< 2 min on 2 CPU cores)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks", help="results directory")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs after one warm-up; the median is reported")
    return p




def int_list(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot, from /proc/stat."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7], sum(v)


_START = {}


def other_cpu_share() -> float | None:
    """Fraction of the machine's CPU time used by other processes since setup(): a noise indicator."""
    busy, total = _cpu_jiffies()
    if not total or not _START or total == _START["total"]:
        return None
    own = (sum(os.times()[:4]) - _START["own"]) * os.sysconf("SC_CLK_TCK")  # with waited-for children: the runs some scripts measure
    return max(0.0, (busy - _START["busy"] - own) / (total - _START["total"]))


def setup(args) -> torch.device:
    busy, total = _cpu_jiffies()
    _START.update(busy=busy, total=total, own=sum(os.times()[:4]))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    dev = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    torch.manual_seed(0)
    return torch.device(dev)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeats: int, device, warmup: bool = True) -> tuple[float, list[float]]:
    """Median wall time of fn() in seconds over `repeats` runs, after one untimed warm-up run."""
    if warmup:
        fn()
        sync(device)
    times = []
    for _ in range(max(repeats, 1)):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device) -> float:
    """CUDA: max_memory_allocated since reset_peak. CPU: peak RSS of the process (high-water mark)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def mem_header(device) -> str:
    return "peak CUDA alloc (MiB)" if torch.device(device).type == "cuda" else "peak RSS, process (MiB)¹"


def machine_info(device) -> dict:
    return _machine_info(str(torch.device(device)))


def mean_by(rows: list[dict], method: str, metric: str, **where) -> tuple[float | None, int]:
    """(mean of ``metric`` over the rows of ``method`` matching ``where``, or None; how many)."""
    vals = [r[metric] for r in rows if r["method"] == method and all(r[k] == w for k, w in where.items())]
    return (statistics.fmean(vals) if vals else None), len(vals)


def table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(args, device, name: str, title: str, md_table: str, notes: list[str], results: dict) -> None:
    """Print the table and notes; write <out>/<name>[-quick]-<cpu|cuda>.{json,md}."""
    command = shlex.join(["python", *sys.argv])
    m, v = machine_info(device), versions()
    m["other_processes_cpu_share"] = other = other_cpu_share()
    if other is not None:
        notes = [*notes, f"Other processes used {100 * other:.0f}% of the machine's CPU time during this run"
                 + (": the machine was busy, so these timings are unreliable; rerun on a quiet machine." if other > 0.1 else ".")]
    print(md_table + "\n\n" + "\n".join(notes))
    meta = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": m, "versions": v}
    stem = f"{name}{'-quick' if args.quick else ''}-{torch.device(device).type}"
    args.out.mkdir(parents=True, exist_ok=True)
    js, mdp = args.out / f"{stem}.json", args.out / f"{stem}.md"
    js.write_text(json.dumps({**meta, "quick": args.quick, "notes": notes, "results": results}, indent=2) + "\n")
    md = [
        f"# {title}{' (--quick)' if args.quick else ''}",
        "",
        f"Command: `{command}`  ",
        f"Date: {meta['date']}",
        "",
        f"Machine: {m['platform']}; CPU {m['cpu']}, {m['cpu_count']} cores ({m['cpu_affinity']} usable), "
        f"{m['torch_threads']} torch threads; device {m['device']}" + (f" ({m['gpu']})" if m["gpu"] else "")
        + f"; load average at the end {m['load_average_1_5_15min']}",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "",
        md_table,
        "",
        *[f"{n}  " for n in notes],
        "",
    ]
    mdp.write_text("\n".join(md))
    print(f"\nwrote {js} and {mdp}")


def rewrite_model_folder(folder: Path, tensors: dict, cfg: dict, keep_card: bool) -> None:
    """Rewrite a model folder with new tensors and config through the one model-folder writer (new
    sha256), keeping its flow's samples and training curve (the flow is unchanged) and, with
    ``keep_card``, a hand-written card: the writer replaces them whenever the weights change."""
    from bidsharmony.modelfolder import CARD, DESCRIBED, write_folder

    kept = {name: (folder / name).read_bytes() for name in DESCRIBED if (folder / name).is_file() and (name != CARD or keep_card)}
    write_folder(folder, tensors, {k: v for k, v in cfg.items() if k != "weights_sha256"})
    for name, data in kept.items():
        (folder / name).write_bytes(data)


def field_grids(data: Path, subjects: list[str], landmarks, path: Path | None = None):
    """(n, G, G, G) N4 log-field grids (``bidsharmony.image.field.head_grid``) of the target's ``subjects`` (labels
    without ``sub-``) in the BIDS dataset ``data``, each standardised onto ``landmarks`` as harmonization
    standardises it. N4 takes ~17 s a volume, so ``path`` (an .npz) keeps them: read when it holds these
    subjects, else written."""
    import numpy as np

    from benchmarks.quality import run
    from bidsharmony.image.field import head_grid
    from bidsharmony.image.io import load_t1w
    from bidsharmony.image.standardise import grid_landmarks, standardise

    if path is not None and path.is_file():
        kept = np.load(path)
        if list(kept["subjects"]) == list(subjects):
            return kept["grids"]
    t0, grids = time.perf_counter(), []
    for i, sub in enumerate(subjects):
        img, v = load_t1w(run.t1w_path(data, f"sub-{sub}"))
        grids.append(head_grid(standardise(v, landmarks, source_landmarks=grid_landmarks(v, img.affine)[0]), img.affine))
        print(f"N4 grid {i + 1}/{len(subjects)}: sub-{sub} ({time.perf_counter() - t0:.0f} s)", flush=True)
    grids = np.array(grids)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, grids=grids, subjects=np.array(subjects))
    return grids
