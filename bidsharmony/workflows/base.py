"""The participant-level workflow: one harmonization sub-workflow and one sink per T1w run."""

from __future__ import annotations

import re

from nipype.pipeline import engine as pe

from bidsharmony.interfaces.derivatives import DerivativesSink
from bidsharmony.interfaces.report import ReportFigures, RunQuality


def _nipype_safe(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]", "_", text)


def run_name(entities: dict) -> str:
    """A Nipype-safe, unique node name for a run: sub_01_ses_2_run_1."""
    from bidsharmony.bids import run_stem

    return _nipype_safe(run_stem(entities))


def workflow_name() -> str:
    """``bidsharmony_<version>_wf``, as fMRIPrep names its own: Nipype reuses a node when its inputs
    hash the same, whatever the code that made it, so an upgrade run in an old work directory would
    otherwise reuse nodes whose outputs no longer match the new workflow's connections."""
    from bidsharmony import __version__

    return f"bidsharmony_{_nipype_safe(__version__)}_wf"


def model_facts(model) -> dict:
    """What the sidecar's ``Model`` records about the model's own quality, from its folder: the
    validation bits/dim where training recorded it, and ``SmokeTest`` where its card calls it a
    smoke(-test) model. An unreadable config or card records nothing (loading the model checks it)."""
    from pathlib import Path

    from bidsharmony.errors import ModelError
    from bidsharmony.modelfolder import CARD, CONFIG, read_config_file

    facts: dict = {}
    if model is None:  # a method without a model (identity)
        return facts
    try:
        config = read_config_file(Path(model) / CONFIG)
    except ModelError:
        config = {}
    if isinstance(config, dict):
        bpd = config.get("validation_bpd", (config.get("training") or {}).get("validation_bpd"))
        if isinstance(bpd, (int, float)) and not isinstance(bpd, bool):
            facts["ValidationBitsPerDim"] = round(float(bpd), 4)
    try:
        with open(Path(model) / CARD, "rb") as f:
            card = f.read(1 << 16).decode("utf-8", "replace")
    except OSError:
        card = ""
    if re.search(r"\bsmoke\b", card, re.IGNORECASE):
        facts["SmokeTest"] = True
    return facts


def init_bidsharmony_wf(*, runs, out_dir, model, params=None, device="auto", output_space="native", omp_nthreads=1,
                        method="flow", name=None):
    """The participant workflow: for each run, ``method``'s harmonization workflow (``methods/``),
    then ``quality`` (the sidecar's slice-step figure, scanner and model facts) → ``ds`` (the
    derivative and its sidecar), and ``report`` (the figures) beside them, so a figure that fails
    to draw never holds back the derivative.

    Parameters
    ----------
    runs : list of dict
        From ``bids.collect_t1w``: ``path``, ``relpath``, ``entities``, ``scanner``.
    out_dir : path
        The derivatives dataset.
    model : path or None
        The model folder (``None`` for a method without one).
    params : dict
        The method's parameters (``harmonize_params``).
    method : str
        A name in ``methods.METHODS``.
    device, output_space, omp_nthreads
        Passed to the method's ``init_wf``.
    name : str
        The workflow's name (default: ``bidsharmony_<version>_wf``, so a new version gets a new
        work directory).

    Inputs: none (each run's ``t1w`` is set). Outputs: none: each run's derivative, sidecar and
    figures are written under ``out_dir`` by its ``ds`` and ``report`` nodes.
    """
    from bidsharmony import methods

    impl = methods.get(method)
    facts = model_facts(model)
    wf = pe.Workflow(name=name or workflow_name())
    for run in runs:
        label = run_name(run["entities"])
        hwf = impl.init_wf(model=model, params=params, device=device, output_space=output_space, omp_nthreads=omp_nthreads, name=f"{label}_wf")
        hwf.get_node("inputnode").inputs.t1w = run["path"]
        quality = pe.Node(RunQuality(source=run["path"], scanner=run.get("scanner") or {}, model_facts=facts),
                          name=f"{label}_quality", mem_gb=1.0)  # fmt: skip
        report = pe.Node(
            ReportFigures(out_dir=str(out_dir), entities=run["entities"], source=run["path"]),
            name=f"{label}_report",
            mem_gb=1.0,
        )
        sink = pe.Node(
            DerivativesSink(out_dir=str(out_dir), entities=run["entities"], source_relpath=run["relpath"], output_space=output_space,
                            description=impl.DESCRIPTION),
            name=f"{label}_ds",
            run_without_submitting=True,
            mem_gb=0.2,
        )
        wf.connect([
            (hwf, quality, [("outputnode.harmonized", "harmonized"), ("outputnode.info", "info")]),
            (hwf, sink, [("outputnode.harmonized", "in_file")]),
            (quality, sink, [("info", "info")]),
            (hwf, report, [("outputnode.harmonized", "harmonized"), ("outputnode.histograms", "histograms"),
                           ("outputnode.trace", "trace")]),
        ])  # fmt: skip
    return wf
