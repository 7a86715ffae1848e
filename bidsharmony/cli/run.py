"""``bidsharmony`` entry point: validate, build the workflow, run it, map errors to exit codes."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

from bidsharmony.errors import (
    EXIT_CANT_CREATE,
    EXIT_FAILURE,
    EXIT_OK,
    BidsHarmonyError,
    OutputError,
    UnknownLevelError,
    UsageError,
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


def _nipype_config(opts, work_dir: Path, log_dir: Path) -> None:
    """Configure Nipype here and in its workers: MultiProc's forkserver workers re-read the config
    from NIPYPE_CONFIG_DIR rather than inheriting the parent's, so it is written to a file."""
    import configparser

    settings = {
        "execution": {
            "crashdump_dir": str(log_dir),
            "crashfile_format": "txt",
            "stop_on_first_crash": str(opts.stop_on_first_crash).lower(),
            "remove_unnecessary_outputs": "false",
            "poll_sleep_duration": "0.1",
            "check_version": "false",
            "hash_method": "content",
        },
        "monitoring": {"enabled": str(opts.resource_monitor).lower()},
        "logging": {
            "workflow_level": "INFO" if opts.verbose else "WARNING",
            "interface_level": "INFO" if opts.verbose > 1 else "WARNING",
            "utils_level": "WARNING",
            "log_to_file": "false",
        },
    }
    cfg_dir = work_dir / "nipype-config"
    try:
        cfg_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{work_dir}: cannot create the work directory ({e.strerror})") from None
    parser = configparser.ConfigParser()
    parser.read_dict(settings)
    with open(cfg_dir / "nipype.cfg", "w") as f:
        parser.write(f)
    os.environ["NIPYPE_CONFIG_DIR"] = str(cfg_dir)
    os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network

    from nipype import config
    from nipype import logging as nlogging

    config.update_config(settings)
    nlogging.update_logging(config)


# How each batch scheduler is told a node's memory and cores (Nipype passes these per node).
_REQUESTS = {
    "SLURM": ("sbatch_args", "--mem={mem_mb}M --cpus-per-task={n_procs}"),
    "SLURMGraph": ("sbatch_args", "--mem={mem_mb}M --cpus-per-task={n_procs}"),
    "PBS": ("qsub_args", "-l mem={mem_mb}mb,nodes=1:ppn={n_procs}"),
    "PBSGraph": ("qsub_args", "-l mem={mem_mb}mb,nodes=1:ppn={n_procs}"),
    "LSF": ("bsub_args", "-M {mem_mb} -n {n_procs}"),
}


def _request_resources(wf, plugin: str, node_args: dict) -> None:
    """Give each node its scheduler request from its declared mem_gb / n_procs, plus what the plugin
    YAML's ``node_plugin_args`` adds by node name (e.g. a GPU partition for ``harmonize``)."""
    key, template = _REQUESTS.get(plugin, (None, None))
    for node in wf._get_all_nodes():
        args = dict(node.plugin_args or {})
        if key:
            mem_mb = max(256, round(node.mem_gb * 1024))
            args[key] = " ".join(filter(None, [template.format(mem_mb=mem_mb, n_procs=node.n_procs), args.get(key)]))
        extra = dict(node_args.get(node.name) or {})
        for k, v in extra.items():
            args[k] = f"{args[k]} {v}" if k == key and k in args and isinstance(v, str) else v
        node.plugin_args = args


# The smallest --mem a run can work in: the largest mem_gb every workflow declares (resample and
# reassemble; tests/test_robustness.py keeps it in step with the built workflows). MultiProc never
# schedules a node that asks for more than is free, so less would run forever, or not at all.
MIN_MEM_GB = 1.5
_PLUGIN_KEYS = ("plugin", "plugin_args", "node_plugin_args")


def _plugin_names() -> list[str]:
    """The plugins Nipype can run (``nipype.pipeline.plugins.<Name>Plugin``)."""
    from nipype.pipeline import plugins

    return sorted(n[: -len("Plugin")] for n in dir(plugins) if n.endswith("Plugin") and n != "Plugin"
                  and isinstance(getattr(plugins, n), type))  # fmt: skip


def _check_args(path, where: str, args) -> dict:
    """plugin_args (or one node's): a mapping; scheduler flags (``*_args``) are strings (they are
    joined with each node's request); counts are positive integers; memory_gb a positive number."""
    if args is None:
        return {}
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise UsageError(f"{path}: {where} must be a mapping of option names to values, got {type(args).__name__}")
    for k, v in args.items():
        if k.endswith("_args") and not isinstance(v, str):
            raise UsageError(f"{path}: {where}.{k} must be a string of scheduler flags, got {v!r}")
        if k in ("n_procs", "n_gpu_procs", "max_jobs") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UsageError(f"{path}: {where}.{k} must be a positive integer, got {v!r}")
        if k == "memory_gb" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise UsageError(f"{path}: {where}.memory_gb must be a positive number, got {v!r}")
    return dict(args)


def read_plugin_file(path: Path) -> tuple[str, dict, dict]:
    """A ``--use-plugin`` YAML, checked whole: (plugin, plugin_args, node_plugin_args).

    Checked before anything is written (fMRIPrep's format: ``plugin``, ``plugin_args``; plus
    ``node_plugin_args`` by node name), so a typo fails at once rather than after the first nodes.
    """
    import yaml

    if not path.is_file():
        raise UsageError(f"{path}: plugin file not found")
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"{path}: not a readable YAML file ({' '.join(str(e).split())})") from None
    if not isinstance(spec, dict) or "plugin" not in spec:
        raise UsageError(f"{path}: not a Nipype plugin YAML with a 'plugin' key (e.g. plugin: SLURM)")
    unknown = sorted(str(k) for k in spec if k not in _PLUGIN_KEYS)
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}; a plugin YAML has {', '.join(_PLUGIN_KEYS)}")
    names = _plugin_names()
    if spec["plugin"] not in names:
        raise UsageError(f"{path}: unknown Nipype plugin {spec['plugin']!r}; choose one of {', '.join(names)}")
    args = _check_args(path, "plugin_args", spec.get("plugin_args"))
    node_args = spec.get("node_plugin_args")
    if node_args is not None and not isinstance(node_args, dict):
        raise UsageError(f"{path}: node_plugin_args must map node names to plugin_args")
    node_args = {str(k): _check_args(path, f"node_plugin_args.{k}", v) for k, v in (node_args or {}).items()}
    return spec["plugin"], args, node_args


def _check_memory(path_or_flag: str, memory_gb: float, need_gb: float, what: str) -> None:
    if memory_gb < need_gb:
        raise UsageError(f"{path_or_flag}: {memory_gb:g} GB is less than {what} needs ({need_gb:g} GB); "
                         f"give at least {need_gb:g}GB")


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
            _check_memory(f"{opts.use_plugin}: plugin_args.memory_gb", args["memory_gb"], MIN_MEM_GB, "the largest node")
            memory = None
    if memory is not None:
        _check_memory("--mem", memory, MIN_MEM_GB, "the largest node")
    logs, work = opts.output_dir / "logs", opts.output_dir / ".bidsharmony-work"
    if opts.analysis_level == "train":
        logs, work = train_side_dirs(opts.output_dir.absolute(), opts.output_dir.absolute().name)
    _check_not_a_file(logs, "log directory", ancestors=False)
    if opts.work_dir is None:
        _check_not_a_file(work, "work directory", ancestors=False)
    else:
        _check_not_a_file(opts.work_dir.absolute(), "work directory")


def _plugin(opts, nprocs: int) -> tuple[str, dict]:
    # forkserver: the parent has already used torch (model checks), and forking a process whose
    # OpenMP pool is initialised deadlocks its children.
    plugin_args = {"n_procs": nprocs, "raise_insufficient": False, "mp_context": "forkserver"}
    if opts.mem:
        plugin_args["memory_gb"] = opts.mem
    if opts.use_plugin is None:
        return ("MultiProc" if nprocs > 1 else "Linear"), plugin_args
    plugin, args, node_args = read_plugin_file(opts.use_plugin)
    args["node_plugin_args"] = node_args
    if plugin == "MultiProc":
        args = {**plugin_args, **args}
    return plugin, args


def _harmonize_params(opts, device: str) -> dict:
    from bidsharmony.harmonize.solvers import HarmonizeParams

    # Small batches are fastest on a CPU (cache); a GPU wants many slices per pass.
    batch = opts.batch_size or (64 if device.startswith("cuda") else 8)
    return HarmonizeParams(
        iterations=opts.iterations,
        alpha=opts.alpha,
        beta_fidelity=opts.beta_fidelity,
        beta_gradient=opts.beta_gradient,
        similarity=opts.similarity,
        start=opts.start,
        solver=opts.solver,
        latent_lr=opts.latent_lr,
        batch_size=batch,
        seed=opts.random_seed,
    ).to_dict()


def _train_params(opts, device: str) -> tuple[int, int]:
    """Steps and batch size of a training: the options, or defaults that fit the device (a CPU
    step on 256 slices takes seconds and gigabytes; 10 000 of them would run for hours)."""
    gpu = device.startswith("cuda")
    if opts.method == "bhdiff":
        defaults, why = (20000, 2), "bhdiff defaults"
    else:
        defaults, why = ((10000, 256), "defaults for a GPU") if gpu else ((2000, 32), "defaults for a CPU")
    steps = opts.steps or defaults[0]
    batch = opts.train_batch_size or defaults[1]
    chosen = [f"{what} {value} ({'--' + flag if given else why})" for what, value, flag, given in
              (("steps", steps, "steps", opts.steps), ("batch size", batch, "train-batch-size", opts.train_batch_size))]
    LOG.info("training on %s: %s", device, ", ".join(chosen))
    return steps, batch


def train_side_dirs(output_dir: Path, name: str) -> tuple[Path, Path]:
    """The train level's logs and work directory: beside the model folder, hidden, so that the
    published folder holds the model's files only."""
    parent = output_dir.parent
    return parent / f".{name}-logs", parent / f".{name}-work"


def _select_runs(opts):
    from bidsharmony import bids

    participants = [bids.clean_label(x, "sub") for x in opts.participant_label or []]
    sessions = [bids.clean_label(x, "ses") for x in opts.session_label or []]
    filters = bids.load_filters(opts.bids_filter_file)
    return bids.collect_t1w(opts.bids_dir, participants, sessions, filters, filter_file=opts.bids_filter_file,
                            database_dir=opts.bids_database_dir)


def _clean_work_dir(work_dir: Path, runs) -> None:
    """--clean-workdir: forget the selected runs' finished nodes (of every bidsharmony version and
    of training preparation), and nothing else: other participants' nodes may belong to a run that
    is going on now, and the work directory may hold what is not bidsharmony's."""
    import shutil

    from bidsharmony.workflows.base import run_name

    labels = {run_name(r["entities"]) for r in runs}
    for top in sorted(p for p in work_dir.glob("*_wf") if p.is_dir() and not p.is_symlink()):
        for node in sorted(top.iterdir()):
            label = node.name.rsplit("_", 1)[0]
            if node.is_dir() and not node.is_symlink() and label in labels and node.name.endswith(("_wf", "_quality", "_report", "_ds")):
                LOG.info("--clean-workdir: removing %s", node)
                shutil.rmtree(node)


def _check_images(runs) -> None:
    from bidsharmony.image.io import load_t1w

    for run in runs:
        load_t1w(run["path"])


def _execute(wf, opts, nprocs: int, log_dir: Path):
    plugin, plugin_args = _plugin(opts, nprocs)
    if plugin_args.get("memory_gb") is not None:  # the exact figure: a harmonize node can ask more than MIN_MEM_GB
        node = max(wf._get_all_nodes(), key=lambda n: n.mem_gb)
        label = "--mem" if plugin_args["memory_gb"] == opts.mem else f"{opts.use_plugin}: plugin_args.memory_gb"
        _check_memory(label, plugin_args["memory_gb"], node.mem_gb, f"the {node.name} node")
    _request_resources(wf, plugin, plugin_args.pop("node_plugin_args", {}))
    # Nipype's batch plugins name jobs after $LOGNAME, which containers and CI often lack.
    os.environ.setdefault("LOGNAME", os.environ.get("USER") or "bidsharmony")
    if opts.write_graph:
        try:
            wf.write_graph(graph2use="colored", format="svg", simple_form=True)
        except Exception as e:  # graphviz missing is not a reason to fail a run
            LOG.warning("could not write the workflow graph: %s", e)
    plugin_args.setdefault("status_callback", ProgressReport(wf))
    try:
        return wf.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError as e:
        crashes = sorted(log_dir.glob("crash-*"))
        cause = _crash_cause(crashes[-1]) if crashes else str(e)
        if "OutputError: " in cause:  # a full disk, a lost mount: the output's own exit code
            raise OutputError(cause.split("OutputError: ", 1)[1] + f" (crash files in {log_dir})") from e
        if m := _FULL_IN_CRASH.search(cause):
            raise OutputError(f"cannot write: {m.group(2)} (crash files in {log_dir})") from e
        raise BidsHarmonyError(f"workflow failed: {cause} (crash files in {log_dir})") from e


class ProgressReport:
    """Nipype's status callback (called in the main process, every plugin): one INFO line per
    finished harmonization or resampling, with its time, so a long run is never silent (a 3D
    harmonization on a CPU takes many minutes; Nipype's own log is quiet without -v)."""

    STEPS: ClassVar[dict[str, str]] = {"harmonize": "harmonized", "resample": "resampled"}

    def __init__(self, wf):
        self.total = {k: sum(1 for n in wf._get_all_nodes() if n.name == k) for k in self.STEPS}
        self.done = dict.fromkeys(self.STEPS, 0)
        self.started: dict[str, float] = {}

    def __call__(self, node, status: str) -> None:
        if node.name not in self.STEPS:
            return
        if status == "start":
            self.started[node.fullname] = time.perf_counter()
        elif status == "end":
            self.done[node.name] += 1
            t0 = self.started.pop(node.fullname, None)
            run = next((p for p in node.fullname.split(".") if p.startswith("sub_")), node.fullname).removesuffix("_wf")
            LOG.info("%s %d/%d: %s (%s)", self.STEPS[node.name], self.done[node.name], self.total[node.name], run,
                     "reused" if t0 is None else f"{time.perf_counter() - t0:.0f} s")


# A full disk, a quota, a file-size limit or a read-only mount: the output's exit code, not a crash.
_FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_FULL_IN_CRASH = re.compile(rf"OSError: \[Errno ({'|'.join(str(n) for n in _FULL_OR_READ_ONLY)})\] (.*)")


def _on_sigterm(signum, frame):
    """SIGTERM (a scheduler's walltime, docker stop): say how to resume, then die of the signal.
    Raising instead would be swallowed by whichever Nipype node is running. Nothing is lost:
    outputs are renamed into place only when complete, and the next run removes stale partials."""
    print("bidsharmony: terminated; rerun the same command to resume", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _crash_cause(crash: Path) -> str:
    """The last line of the traceback in a Nipype crash file: the actual error."""
    lines = [ln.strip() for ln in crash.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ("Error:" in ln or "Error(" in ln) and not ln.startswith("File ")]
    return errors[-1] if errors else crash.name


def run_participant(opts, nprocs: int, omp: int, work_dir: Path, log_dir: Path) -> int:
    from bidsharmony.bids import check_output_paths, write_dataset_description
    from bidsharmony.device import resolve_device
    from bidsharmony.flow.checkpoint import load_model
    from bidsharmony.models import default_model
    from bidsharmony.outputs import participant_locks, remove_stale_partials
    from bidsharmony.workflows.base import init_bidsharmony_wf

    runs = _select_runs(opts)
    subjects = sorted({r["entities"]["subject"] for r in runs})
    if opts.reports_only:
        return _reports_only(opts, subjects)
    _check_images(runs)
    device = resolve_device(opts.device)
    if opts.method == "bhdiff":
        from bidsharmony.bhdiff.train import load_bhdiff_model
        from bidsharmony.bhdiff.volume import BHDiffParams

        if opts.model is None:
            raise UsageError("--method bhdiff needs --model DIR: no bhdiff model ships (train one with --method bhdiff train)")
        model = opts.model
        _, cfg = load_bhdiff_model(model)  # fails early on a bad model folder
        name, sha = cfg.get("name"), cfg["weights_sha256"]
        params = BHDiffParams(ode_steps=opts.ode_steps, refine_steps=opts.refine_steps, refine_step=opts.refine_step,
                              patch=opts.patch_size, seed=opts.random_seed).validate().to_dict()  # fmt: skip
    else:
        model = opts.model or default_model()
        loaded = load_model(model, device="cpu")  # fails early on a bad model folder
        name, sha = loaded.name, loaded.sha256
        params = _harmonize_params(opts, device)
    LOG.info("%d T1w run(s); %s model %s (sha256 %s…); device %s", len(runs), opts.method, name, sha[:12], device)
    check_output_paths(opts.output_dir, runs)
    with participant_locks(opts.output_dir, subjects):
        write_dataset_description(opts.output_dir, opts.bids_dir)
        remove_stale_partials(opts.output_dir)
        if opts.clean_workdir:
            _clean_work_dir(work_dir, runs)
        wf = init_bidsharmony_wf(runs, opts.output_dir, model, params, device=device, output_space=opts.output_space,
                                 omp_nthreads=omp, method=opts.method)
        wf.base_dir = str(work_dir)
        t0 = time.perf_counter()
        _execute(wf, opts, nprocs, log_dir)
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


def run_train(opts, nprocs: int, omp: int, work_dir: Path, log_dir: Path) -> int:
    import torch

    from bidsharmony import __version__
    from bidsharmony.device import resolve_device
    from bidsharmony.flow.model import PRESETS
    from bidsharmony.image.slices import POSITION_BINS
    from bidsharmony.train import data as tdata
    from bidsharmony.train.loop import TrainConfig, train_flow
    from bidsharmony.workflows.train import collect_slices, init_train_prep_wf

    runs = _select_runs(opts)
    _check_images(runs)
    device = resolve_device(opts.device)
    torch.set_num_threads(omp)
    if opts.clean_workdir:
        _clean_work_dir(work_dir, runs)
    if opts.method == "bhdiff":
        return _train_bhdiff(opts, runs, device, nprocs, work_dir, log_dir)
    grid = PRESETS[opts.preset].slice_shape
    wf = init_train_prep_wf(runs, voxel_size=1.2, grid_shape=grid, omp_nthreads=1)
    wf.base_dir = str(work_dir)
    LOG.info("preprocessing %d T1w run(s) for training", len(runs))
    graph = _execute(wf, opts, nprocs, log_dir)
    slices = tdata.load_slice_set(collect_slices(graph, runs))
    if len(slices) < 2:
        raise BidsHarmonyError(f"{opts.bids_dir}: only {len(slices)} slice(s) with head found; cannot train")
    train, val = tdata.split_by_subject(slices, opts.validation_fraction, opts.random_seed)
    LOG.info("training on %d slices (%d subjects), validating on %d slices (%d subjects)",
             len(train), len(set(train.subject)), len(val), len(set(val.subject)))
    steps, batch = _train_params(opts, device)
    cfg = TrainConfig(
        preset=opts.preset, steps=steps, batch_size=batch, learning_rate=opts.learning_rate,
        val_every=opts.val_every, checkpoint_every=opts.checkpoint_every, augment=opts.augment, seed=opts.random_seed, amp=opts.amp,
    )  # fmt: skip
    meta = {
        "name": opts.model_name or opts.output_dir.resolve().name,
        "preset": opts.preset,
        "software_version": __version__,
        "preprocessing": {
            "voxel_size": 1.2,
            "orientation": "RAS",
            "slice_axis": "axial (inferior-superior)",
            "slice_shape": list(grid),
            "normalisation": "per-slice min-max to [0, 1] inside the grid",
            "quantisation_bits": 12,
            "position_bins": POSITION_BINS,
        },
        "training_data": {
            "dataset": str(opts.bids_dir.resolve()),
            "subjects_train": sorted(set(train.subject.tolist())),
            "subjects_validation": sorted(set(val.subject.tolist())),
            "slices_train": len(train),
            "slices_validation": len(val),
        },
    }
    extras = {"start_images": tdata.mean_start_images(train), "target_histogram": tdata.intensity_histogram(train)}
    from bidsharmony.flow.checkpoint import new_stage, publish_training

    stage = new_stage(opts.output_dir, "training")  # built aside, resumable, swapped in when finished
    summary = train_flow(train, val, cfg, stage, device=device, extras=extras, meta=meta, progress=sys.stderr.isatty() or opts.verbose > 0,
                         overwrite=opts.overwrite)  # fmt: skip
    publish_training(stage, opts.output_dir)
    LOG.info("trained %d steps in %.0f s; best validation %.4f bits/dim; model in %s", summary["steps"], summary["seconds"], summary["best_val_bpd"], opts.output_dir)
    return EXIT_OK


def _train_bhdiff(opts, runs, device: str, nprocs: int, work_dir: Path, log_dir: Path) -> int:
    """--method bhdiff train: the resample node per run, then flow matching on the volumes."""
    from dataclasses import asdict

    import nibabel as nb
    import numpy as np

    from bidsharmony import __version__
    from bidsharmony.bhdiff.train import BHDiffTrainConfig, prepare_volume, save_bhdiff_model, train_bhdiff
    from bidsharmony.image.slices import cut
    from bidsharmony.metrics import slice_histogram
    from bidsharmony.workflows.train import init_train_prep_wf

    wf = init_train_prep_wf(runs, voxel_size=1.2, omp_nthreads=1)
    wf.base_dir = str(work_dir)
    LOG.info("preprocessing %d T1w run(s) for bhdiff training", len(runs))
    graph = _execute(wf, opts, nprocs, log_dir)
    files = sorted(n.result.outputs.out_file for n in graph.nodes() if n.name == "resample")
    volumes = [np.asanyarray(nb.load(f).dataobj, dtype=np.float32) for f in files]
    LOG.info("edges and normalisation of %d volume(s)", len(volumes))
    prepared = [prepare_volume(v) for v in volumes]
    hist = slice_histogram(np.concatenate([s[r.harmonize.astype(bool)] for s, r in (cut(v) for v in volumes)]))
    steps, batch = _train_params(opts, device)
    cfg = BHDiffTrainConfig(preset=opts.bhdiff_preset, steps=steps, batch_size=batch,
                            learning_rate=opts.learning_rate, patch=opts.train_patch,
                            checkpoint_every=opts.checkpoint_every, seed=opts.random_seed, amp=opts.amp)  # fmt: skip
    from bidsharmony.flow.checkpoint import new_stage, publish_training

    stage = new_stage(opts.output_dir, "training")  # built aside, resumable, swapped in when finished
    result = train_bhdiff(prepared, cfg, stage, device=device, progress=opts.verbose > 0, overwrite=opts.overwrite)
    meta = {"name": opts.model_name or opts.output_dir.resolve().name, "preset": opts.bhdiff_preset, "software_version": __version__,
            "method": "bhdiff", "target_histogram": [round(float(x), 5) for x in hist],
            "training": {**asdict(cfg), "device": device, "seconds_last_run": round(result["seconds"], 1),
                         "final_loss_mean_last_50": round(float(np.mean(result["losses"][-50:])), 5)},
            "training_data": {"dataset": str(opts.bids_dir.resolve()), "volumes": len(volumes),
                              "subjects": sorted({r["entities"]["subject"] for r in runs})},
            "preprocessing": {"voxel_size": 1.2, "orientation": "RAS", "intensity": "head 0.5/99.5 % to [-1, 1], clipped",
                              "edges": "3D Canny on the rank-transformed head (bidsharmony.bhdiff.edges)"}}  # fmt: skip
    save_bhdiff_model(stage, result["ema"], meta)
    publish_training(stage, opts.output_dir)
    LOG.info("trained %d steps in %.0f s; model in %s", result["steps"], result["seconds"], opts.output_dir)
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
            _nipype_config(opts, work_dir, log_dir)
        return LEVEL_RUNNERS[opts.analysis_level](opts, nprocs, omp, work_dir, log_dir)
    except BidsHarmonyError as e:
        if opts.verbose:
            LOG.exception("error")
        print(f"bidsharmony: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("bidsharmony: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in _FULL_OR_READ_ONLY:
            raise
        if opts.verbose:
            LOG.exception("error")
        print(f"bidsharmony: error: {e.filename2 or e.filename}: cannot write ({e.strerror})", file=sys.stderr)
        return EXIT_CANT_CREATE
    except Exception as e:  # an unexpected failure: one line, traceback with -v
        if opts.verbose:
            LOG.exception("unexpected error")
        print(f"bidsharmony: error: {type(e).__name__}: {e} (rerun with -v for the traceback)", file=sys.stderr)
        return EXIT_FAILURE
