"""Preprocessing for training: the same resample and slice nodes as harmonization, per T1w run."""

from __future__ import annotations

from nipype.pipeline import engine as pe

from bidsharmony.space import DEFAULT, Space
from bidsharmony.workflows.base import run_name
from bidsharmony.workflows.harmonize import init_slices_wf


def init_train_prep_wf(runs, *, space: Space = DEFAULT, omp_nthreads: int = 1, name: str = "train_prep_wf"):
    """The target dataset's preprocessing for training: per T1w run, the harmonization's own
    ``init_slices_wf`` (no standardisation: training fits the landmarks it would use).

    Parameters
    ----------
    runs : list of dict
        From ``bids.collect_t1w``; each run's sub-workflow is named after it.
    space : the model's voxel size and slice grid (the default space, with the preset's slice shape)

    Inputs: none (each run's ``t1w`` is set). Outputs: per run, the ``resample`` and ``slice`` nodes'
    files, which ``collect_slices`` reads from the executed graph.
    """
    wf = pe.Workflow(name=name)
    for run in runs:
        swf = init_slices_wf(space=space, omp_nthreads=omp_nthreads, name=f"{run_name(run['entities'])}_wf")
        swf.get_node("inputnode").inputs.t1w = run["path"]
        wf.add_nodes([swf])
    return wf


def collect_slices(exec_graph, runs) -> list[tuple[str, str, str, str, str]]:
    """(subject, slices.npy, record.npz, resampled volume, original T1w) per run, from an executed
    ``init_train_prep_wf``."""
    by_name: dict = {}
    for node in exec_graph.nodes():
        if node.name in ("slice", "resample"):
            by_name.setdefault(node.fullname.split(".")[-2], {})[node.name] = node.result.outputs
    out = []
    for run in runs:
        res = by_name[f"{run_name(run['entities'])}_wf"]
        out.append((run["entities"]["subject"], res["slice"].slices, res["slice"].record, res["resample"].out_file, run["path"]))
    return out
