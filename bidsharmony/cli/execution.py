"""Running a Nipype workflow for the CLI: Nipype's configuration, plugins and their YAML, scheduler
requests per node, memory checks, progress lines, the work directory, and a crash's cause."""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from pathlib import Path
from typing import ClassVar

from bidsharmony.errors import BidsHarmonyError, OutputError, UsageError

LOG = logging.getLogger("bidsharmony")


def nipype_config(opts, work_dir: Path, log_dir: Path) -> None:
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


def request_resources(wf, plugin: str, node_args: dict) -> None:
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


def plugin_names() -> list[str]:
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
    names = plugin_names()
    if spec["plugin"] not in names:
        raise UsageError(f"{path}: unknown Nipype plugin {spec['plugin']!r}; choose one of {', '.join(names)}")
    args = _check_args(path, "plugin_args", spec.get("plugin_args"))
    node_args = spec.get("node_plugin_args")
    if node_args is not None and not isinstance(node_args, dict):
        raise UsageError(f"{path}: node_plugin_args must map node names to plugin_args")
    node_args = {str(k): _check_args(path, f"node_plugin_args.{k}", v) for k, v in (node_args or {}).items()}
    return spec["plugin"], args, node_args


def check_memory(path_or_flag: str, memory_gb: float, need_gb: float, what: str) -> None:
    if memory_gb < need_gb:
        raise UsageError(f"{path_or_flag}: {memory_gb:g} GB is less than {what} needs ({need_gb:g} GB); "
                         f"give at least {need_gb:g}GB")


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


def clean_work_dir(work_dir: Path, runs) -> None:
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


def execute(wf, opts, nprocs: int, log_dir: Path):
    plugin, plugin_args = _plugin(opts, nprocs)
    if plugin_args.get("memory_gb") is not None:  # the exact figure: a harmonize node can ask more than MIN_MEM_GB
        node = max(wf._get_all_nodes(), key=lambda n: n.mem_gb)
        label = "--mem" if plugin_args["memory_gb"] == opts.mem else f"{opts.use_plugin}: plugin_args.memory_gb"
        check_memory(label, plugin_args["memory_gb"], node.mem_gb, f"the {node.name} node")
    request_resources(wf, plugin, plugin_args.pop("node_plugin_args", {}))
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
FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


_FULL_IN_CRASH = re.compile(rf"OSError: \[Errno ({'|'.join(str(n) for n in FULL_OR_READ_ONLY)})\] (.*)")


def _crash_cause(crash: Path) -> str:
    """The last line of the traceback in a Nipype crash file: the actual error."""
    lines = [ln.strip() for ln in crash.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ("Error:" in ln or "Error(" in ln) and not ln.startswith("File ")]
    return errors[-1] if errors else crash.name
