"""Preprocessing for training: the same resample and slice nodes as harmonization, per T1w run."""

from __future__ import annotations

import json
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bidsharmony.interfaces.manifest import WriteManifest
from bidsharmony.space import DEFAULT, Space
from bidsharmony.train.data import PreparedRun
from bidsharmony.workflows.base import run_name
from bidsharmony.workflows.harmonize import init_slices_wf

_FIELDS = (("resampled", "resampled"), ("slices", "slices"), ("record", "records"))  # (slices_wf output, manifest input)


def init_train_prep_wf(*, runs, manifest: Path, space: Space = DEFAULT, omp_nthreads: int = 1, name: str = "train_prep_wf"):
    """The target dataset's preprocessing for training: per T1w run, the harmonization's own
    ``init_slices_wf`` (no standardisation: training fits the landmarks it would use).

    Parameters
    ----------
    runs : list of dict
        From ``bids.collect_t1w``; each run's sub-workflow is named after it.
    manifest : Path
        Where the last node writes what was produced (``read_manifest`` reads it back).
    space : the model's voxel size and slice grid (the default space, with the preset's slice shape)

    Inputs: none (each run's ``t1w`` is set). Outputs: ``outputnode.manifest``, the JSON file at
    ``manifest``: per run, in ``runs``' order, its subject, original T1w, resampled volume, slices
    and slice record.
    """
    wf = pe.Workflow(name=name)
    outputnode = pe.Node(niu.IdentityInterface(fields=["manifest"]), name="outputnode")
    merges = {field: pe.Node(niu.Merge(len(runs)), name=f"merge_{field}", run_without_submitting=True) for field, _ in _FIELDS}
    write = pe.Node(WriteManifest(subjects=[r["entities"]["subject"] for r in runs], sources=[str(r["path"]) for r in runs],
                                  out_file=str(Path(manifest).absolute())), name="manifest", run_without_submitting=True)
    for i, run in enumerate(runs, 1):
        swf = init_slices_wf(space=space, omp_nthreads=omp_nthreads, name=f"{run_name(run['entities'])}_wf")
        swf.get_node("inputnode").inputs.t1w = run["path"]
        wf.connect([(swf, merges[field], [(f"outputnode.{field}", f"in{i}")]) for field, _ in _FIELDS])
    wf.connect([(merges[field], write, [("out", into)]) for field, into in _FIELDS])
    wf.connect([(write, outputnode, [("out_file", "manifest")])])
    return wf


def read_manifest(path) -> list[PreparedRun]:
    """A ``PreparedRun`` per run, in the runs' order, from the manifest an executed
    ``init_train_prep_wf`` wrote."""
    return [PreparedRun(**row) for row in json.loads(Path(path).read_text())]
