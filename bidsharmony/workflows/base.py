"""The participant-level workflow: one harmonization sub-workflow and one sink per T1w run."""

from __future__ import annotations

import re

from nipype.pipeline import engine as pe

from bidsharmony.interfaces.derivatives import DerivativesSink
from bidsharmony.interfaces.report import ReportFigures
from bidsharmony.workflows.harmonize import init_harmonize_wf


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


def init_bidsharmony_wf(runs, out_dir, model, params=None, device="auto", output_space="native", omp_nthreads=1,
                        method="flow", name=None):
    """``runs``: dicts from ``bids.collect_t1w``; ``method``: flow (2D, BlindHarmony) or bhdiff (3D)."""
    from bidsharmony.workflows.bhdiff import init_bhdiff_wf

    factory = {"flow": init_harmonize_wf, "bhdiff": init_bhdiff_wf}[method]
    wf = pe.Workflow(name=name or workflow_name())
    for run in runs:
        label = run_name(run["entities"])
        hwf = factory(model, params, device=device, output_space=output_space, omp_nthreads=omp_nthreads, name=f"{label}_wf")
        hwf.get_node("inputnode").inputs.t1w = run["path"]
        report = pe.Node(
            ReportFigures(out_dir=str(out_dir), entities=run["entities"], scanner=run.get("scanner") or {}, source=run["path"]),
            name=f"{label}_report",
            mem_gb=1.0,
        )
        sink = pe.Node(
            DerivativesSink(out_dir=str(out_dir), entities=run["entities"], source_relpath=run["relpath"], output_space=output_space),
            name=f"{label}_ds",
            run_without_submitting=True,
            mem_gb=0.2,
        )
        wf.connect([
            (hwf, report, [("outputnode.harmonized", "harmonized"), ("outputnode.info", "info"),
                           ("outputnode.histograms", "histograms"), ("outputnode.trace", "trace")]),
            (hwf, sink, [("outputnode.harmonized", "in_file")]),
            (report, sink, [("info", "info")]),
        ])  # fmt: skip
    return wf
