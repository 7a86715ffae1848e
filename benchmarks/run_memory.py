"""Peak memory of a whole participant run, as a multiple of the input volume.

Each run is the real CLI (``python -m bidsharmony BIDS OUT participant``) in a child process; its
peak resident memory is the ``ru_maxrss`` that ``wait4`` reports for that child (it covers the
child and any process it waited for: with ``--nprocs 1`` Nipype runs every node in the child
itself). The fixed cost of a run (imports, the model, Nipype) is measured the same way on the
example dataset's smallest T1w (33 × 41 × 25 voxels), and "beyond the fixed cost" subtracts it.
The floor of any run, a process that only imports what a run imports, is given too. The volume is
the input as bidsharmony reads it: float32, every voxel of the file's grid.

    nice python benchmarks/run_memory.py                # the studyforrest scan (../shared/data), --nprocs 1
    python benchmarks/run_memory.py --quick             # the fixed-cost run only (a smoke run, ~1 min)
    python benchmarks/run_memory.py --t1w-dataset DIR --participant LABEL

BIDS validation is skipped (``--skip-bids-validation``): the validator is a separate program whose
memory is not bidsharmony's. Results: <out>/run_memory[-quick]-cpu.{json,md}.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

SHARED = common.REPO.parent / "shared" / "data" / "unseen-scanners"


def measure(bids: Path, label: str, session: str | None, tmp: Path, nprocs: int, model: Path | None) -> dict:
    """One participant run of the CLI in a child process: peak RSS (MiB), wall time, the T1w."""
    out, work = tmp / f"out-{label}", tmp / f"work-{label}"
    cmd = [sys.executable, "-m", "bidsharmony", str(bids), str(out), "participant", "--participant-label", label,
           "--nprocs", str(nprocs), "--omp-nthreads", str(nprocs), "--device", "cpu", "--skip-bids-validation", "-w", str(work)]
    if session:
        cmd += ["--session-label", session]
    if model:
        cmd += ["--model", str(model)]
    log = tmp / f"{label}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"the run failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    import nibabel as nb

    t1w = next(p for p in bids.rglob(f"sub-{label}/**/anat/*_T1w.nii*") if not session or f"ses-{session}" in p.name)
    shape = nb.load(str(t1w)).shape
    return {"t1w": str(t1w.relative_to(bids.parent)), "shape": list(shape),
            "voxel_size_mm": [round(float(z), 3) for z in nb.load(str(t1w)).header.get_zooms()[:3]],
            "volume_mib": math.prod(shape) * 4 / 2**20, "peak_rss_mib": usage.ru_maxrss / 1024, "seconds": round(seconds, 1),
            "command": " ".join(cmd[1:]).replace(str(tmp), "$TMP")}  # fmt: skip


IMPORTS = ("import torch, ants, nipype, bids, nibabel, matplotlib.pyplot, bidsharmony.cli.run, bidsharmony.workflows.base, "
           "bidsharmony.reports.html")


def imports_mib() -> float:
    """Peak RSS of a process that only imports what a run imports (the floor of any run)."""
    proc = subprocess.Popen([sys.executable, "-c", IMPORTS], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"the imports failed: {IMPORTS}")
    return usage.ru_maxrss / 1024


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--t1w-dataset", type=Path, default=SHARED, help="BIDS dataset holding the large T1w")
    p.add_argument("--participant", default="forrest", help="its participant label")
    p.add_argument("--nprocs", type=int, default=1, help="--nprocs (and --omp-nthreads) of the runs")
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped model)")
    args = p.parse_args()
    args.device = "cpu"
    device = common.setup(args)
    from bidsharmony.example import build_example

    rows, results = [], []
    imports = imports_mib()
    with tempfile.TemporaryDirectory(prefix="bidsharmony-run-memory-") as tmp:
        tmp = Path(tmp)
        example = build_example(tmp / "example")
        fixed = measure(example, "01", "1", tmp, args.nprocs, args.model)
        runs = [("fixed cost: example sub-01 ses-1", fixed)]
        if not args.quick:
            if not args.t1w_dataset.is_dir():
                sys.exit(f"{args.t1w_dataset}: not found (the studyforrest scan is in ../shared/data/unseen-scanners)")
            runs.append((f"sub-{args.participant}", measure(args.t1w_dataset, args.participant, None, tmp, args.nprocs, args.model)))
    for name, r in runs:
        beyond = r["peak_rss_mib"] - fixed["peak_rss_mib"]
        r.update(name=name, peak_over_volume=r["peak_rss_mib"] / r["volume_mib"], beyond_fixed_mib=beyond,
                 beyond_over_volume=beyond / r["volume_mib"] if r is not fixed else None,
                 beyond_imports_over_volume=(r["peak_rss_mib"] - imports) / r["volume_mib"])
        results.append(r)
        rows.append([name, " × ".join(map(str, r["shape"])), " × ".join(map(str, r["voxel_size_mm"])), round(r["volume_mib"], 1),
                     round(r["peak_rss_mib"]), round(r["peak_over_volume"], 1), round(beyond) if r is not fixed else None,
                     round(r["beyond_over_volume"], 1) if r is not fixed else None,
                     round(r["beyond_imports_over_volume"], 1) if r is not fixed else None, r["seconds"]])  # fmt: skip
    headers = ["run", "shape", "voxel (mm)", "volume, float32 (MiB)", "peak RSS (MiB)", "peak ÷ volume",
               "beyond the fixed cost (MiB)", "beyond ÷ volume", "beyond the imports ÷ volume", "wall (s)"]  # fmt: skip
    notes = [f"Whole participant runs of the CLI, `--nprocs {args.nprocs} --device cpu`, the "
             f"{'given' if args.model else 'shipped default'} model, output space native.",
             "Peak RSS: ru_maxrss of the CLI's process from wait4 (the process and every child it waited for); "
             "with --nprocs 1 Nipype runs every node inside it.",
             "Fixed cost: the same command on the example dataset's 33 × 41 × 25 T1w (imports, model, Nipype); "
             "'beyond the fixed cost' subtracts it.",
             f"Imports alone (a process that only imports what a run imports): {imports:.0f} MiB peak RSS; "
             "'beyond the imports' subtracts that instead (the model, the BIDS index and Nipype then count as the run's)."]  # fmt: skip
    common.write_results(args, device, "run_memory", "Peak memory of a whole participant run", common.table(headers, rows), notes,
                         {"nprocs": args.nprocs, "imports_peak_rss_mib": imports, "runs": results})  # fmt: skip


if __name__ == "__main__":
    main()
