"""``bidsharmony`` entry point: validate, build the workflow, run it, map errors to exit codes."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from bidsharmony import methods
from bidsharmony.cli.execution import (
    FULL_OR_READ_ONLY,
    MIN_MEM_GB,
    check_memory,
    clean_work_dir,
    execute,
    nipype_config,
    read_plugin_file,
)
from bidsharmony.cli.selection import check_images, select_runs
from bidsharmony.cli.train import run_train, train_side_dirs
from bidsharmony.errors import (
    EXIT_CANT_CREATE,
    EXIT_FAILURE,
    EXIT_OK,
    BidsHarmonyError,
    OutputError,
    UnknownLevelError,
)

LOG = logging.getLogger("bidsharmony")


def _setup_logging(verbose: int, log_dir: Path | None = None) -> None:
    level = logging.WARNING - 10 * min(verbose + 1, 2)  # default INFO, -v DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s bidsharmony %(levelname)s: %(message)s", "%H:%M:%S"))
    LOG.handlers[:] = [handler]
    LOG.setLevel(level)
    LOG.propagate = False
    if log_dir is not None:
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{log_dir}: cannot create the log directory ({e.strerror})") from None
        fh = logging.FileHandler(log_dir / f"bidsharmony-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s"))
        LOG.addHandler(fh)


def _check_not_a_file(path: Path, what: str, ancestors: bool = True) -> None:
    """Refuse a directory to be created where a file is (itself or, with ``ancestors``, a parent),
    before anything is written: mkdir would fail later with a traceback."""
    for p in (path, *path.parents) if ancestors else (path,):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise OutputError(f"{p}: exists and is not a directory; cannot create the {what}"
                                  + ("" if p == path else f" {path}"))
            return


def check_options(opts) -> None:
    """What can be refused from the options alone, before OUT_DIR or the work directory is written:
    the plugin YAML, a --mem below what one node needs, a file where a directory will be created."""
    if opts.analysis_level == "group":
        _check_not_a_file(opts.output_dir / "logs", "log directory", ancestors=False)
        return
    memory = opts.mem
    if opts.use_plugin is not None:
        plugin, args, _ = read_plugin_file(opts.use_plugin)
        if plugin == "MultiProc" and "memory_gb" in args:
            check_memory(f"{opts.use_plugin}: plugin_args.memory_gb", args["memory_gb"], MIN_MEM_GB, "the largest node")
            memory = None
    if memory is not None:
        check_memory("--mem", memory, MIN_MEM_GB, "the largest node")
    logs, work = opts.output_dir / "logs", opts.output_dir / ".bidsharmony-work"
    if opts.analysis_level == "train":
        logs, work = train_side_dirs(opts.output_dir.absolute(), opts.output_dir.absolute().name)
    _check_not_a_file(logs, "log directory", ancestors=False)
    if opts.work_dir is None:
        _check_not_a_file(work, "work directory", ancestors=False)
    else:
        _check_not_a_file(opts.work_dir.absolute(), "work directory")


def _on_sigterm(signum, frame):
    """SIGTERM (a scheduler's walltime, docker stop): say how to resume, then die of the signal.
    Raising instead would be swallowed by whichever Nipype node is running. Nothing is lost:
    outputs are renamed into place only when complete, and the next run removes stale partials."""
    print("bidsharmony: terminated; rerun the same command to resume", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def run_participant(opts, nprocs: int, omp: int, work_dir: Path, log_dir: Path) -> int:
    from bidsharmony.bids import check_output_paths, write_dataset_description
    from bidsharmony.device import resolve_device
    from bidsharmony.outputs import participant_locks, remove_stale_partials
    from bidsharmony.workflows.base import init_bidsharmony_wf

    runs = select_runs(opts)
    subjects = sorted({r["entities"]["subject"] for r in runs})
    if opts.reports_only:
        return _reports_only(opts, subjects)
    check_images(runs)
    device = resolve_device(opts.device)
    method = methods.get(opts.method)
    model = method.check_model(opts.model)  # fails early on a bad model folder
    params = method.harmonize_params(opts, device)
    used = f"model {model.name} (sha256 {model.sha256[:12]}…)" if model.folder is not None else "no model"
    LOG.info("%d T1w run(s); method %s, %s; device %s", len(runs), opts.method, used, device)
    check_output_paths(opts.output_dir, runs)
    with participant_locks(opts.output_dir, subjects):
        write_dataset_description(opts.output_dir, opts.bids_dir)
        remove_stale_partials(opts.output_dir, subjects)
        if opts.clean_workdir:
            clean_work_dir(work_dir, runs)
        wf = init_bidsharmony_wf(runs=runs, out_dir=opts.output_dir, model=model.folder, params=params, device=device, output_space=opts.output_space,
                                 omp_nthreads=omp, method=opts.method)
        wf.base_dir = str(work_dir)
        t0 = time.perf_counter()
        execute(wf, opts, nprocs, log_dir)
        from bidsharmony.reports.html import write_participant_report

        for subject in subjects:
            LOG.info("report: %s", write_participant_report(opts.output_dir, subject))
    LOG.info("harmonized %d run(s) in %.1f s; outputs in %s", len(runs), time.perf_counter() - t0, opts.output_dir)
    return EXIT_OK


def _reports_only(opts, subjects) -> int:
    """--reports-only: rewrite the participant reports from the outputs already in OUT_DIR."""
    from bidsharmony.errors import NoFilesError
    from bidsharmony.outputs import participant_locks
    from bidsharmony.reports.html import write_participant_report

    done = [s for s in subjects if any((opts.output_dir / f"sub-{s}").glob("**/anat/*_desc-harmonized_T1w.json"))]
    if not done:
        raise NoFilesError(f"{opts.output_dir}: no harmonized outputs of the selected participants; run without --reports-only first")
    for s in sorted(set(subjects) - set(done)):
        LOG.warning("sub-%s: no harmonized outputs in %s; no report", s, opts.output_dir)
    with participant_locks(opts.output_dir, done):
        for subject in done:
            LOG.info("report: %s", write_participant_report(opts.output_dir, subject))
    return EXIT_OK


def run_group(opts, *_args) -> int:
    from bidsharmony.group import write_group_summary

    path = write_group_summary(opts.output_dir)
    LOG.info("group summary: %s", path)
    return EXIT_OK


LEVEL_RUNNERS = {"participant": run_participant, "train": run_train, "group": run_group}


def main(argv=None) -> int:
    from bidsharmony.cli.parser import build_parser

    opts = build_parser().parse_args(argv)
    # Called in-process (tests, other tools), main() leaves the logger and SIGTERM as it found them.
    saved_logging = (LOG.handlers[:], LOG.level, LOG.propagate)
    _setup_logging(opts.verbose)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return _main(opts)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        for h in LOG.handlers:
            if h not in saved_logging[0]:
                h.close()
        LOG.handlers[:], LOG.level, LOG.propagate = saved_logging


def _main(opts) -> int:
    try:
        if opts.analysis_level not in LEVEL_RUNNERS:
            raise UnknownLevelError(f"unknown analysis level {opts.analysis_level!r}: choose participant, group or train")
        opts.bids_dir = opts.bids_dir.absolute()
        opts.output_dir = opts.output_dir.absolute()
        from bidsharmony import bids

        if opts.analysis_level != "group":
            bids.check_dataset(opts.bids_dir, opts.skip_bids_validation)
            bids.check_input_kind(opts.bids_dir)
        check_options(opts)
        if opts.analysis_level == "train":
            from bidsharmony.models import check_training_folder

            check_training_folder(opts.output_dir, opts.overwrite)  # before OUT_DIR, logs or work are written
        bids.check_output_dir(opts.bids_dir, opts.output_dir)
        from bidsharmony.outputs import ensure_inside

        if opts.analysis_level == "train":  # beside the model folder, which holds the model only
            log_dir, default_work = train_side_dirs(opts.output_dir, opts.output_dir.name)
            ensure_inside(log_dir, opts.output_dir.parent)
            ensure_inside(default_work, opts.output_dir.parent)
        else:
            log_dir = ensure_inside(opts.output_dir / "logs", opts.output_dir)
            default_work = opts.output_dir / ".bidsharmony-work"
        _setup_logging(opts.verbose, log_dir)
        work_dir = (opts.work_dir or ensure_inside(default_work, default_work.parent)).absolute()
        bids.check_work_dir(opts.bids_dir, work_dir)
        if opts.analysis_level != "group" and not opts.skip_bids_validation:
            from bidsharmony.validation import validate_dataset

            validate_dataset(opts.bids_dir, log_dir)  # the BIDS validator, as fMRIPrep runs it
        if opts.analysis_level != "train":
            from bidsharmony.validation import write_bidsignore

            write_bidsignore(opts.output_dir, work_dir)  # reports, figures and logs are not BIDS
        nprocs = opts.nprocs or os.cpu_count() or 1
        omp = min(opts.omp_nthreads or min(8, nprocs), nprocs)
        if opts.analysis_level != "group":
            nipype_config(opts, work_dir, log_dir)
        return LEVEL_RUNNERS[opts.analysis_level](opts, nprocs, omp, work_dir, log_dir)
    except BidsHarmonyError as e:
        if opts.verbose:
            LOG.exception("error")
        print(f"bidsharmony: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("bidsharmony: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:  # one line naming the file; a full disk or read-only mount is the output's code
        if opts.verbose:
            LOG.exception("error")
        where = e.filename2 or e.filename
        if e.errno in FULL_OR_READ_ONLY:
            print(f"bidsharmony: error: {where}: cannot write ({e.strerror})", file=sys.stderr)
            return EXIT_CANT_CREATE
        print(f"bidsharmony: error: {f'{where}: ' if where else ''}{e.strerror or e} (rerun with -v for the traceback)", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as e:  # an unexpected failure: one line, traceback with -v
        if opts.verbose:
            LOG.exception("unexpected error")
        print(f"bidsharmony: error: {type(e).__name__}: {e} (rerun with -v for the traceback)", file=sys.stderr)
        return EXIT_FAILURE
