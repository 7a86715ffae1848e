"""The workflow of a method that harmonizes whole volumes on the harmonization grid (the 3D method,
the identity): resample → the method's node → reassemble, with every method's inputs and outputs."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bidsharmony.interfaces.resample import ResampleToHarmonizationSpace
from bidsharmony.interfaces.slicing import Reassemble
from bidsharmony.space import DEFAULT, Space


def init_volume_wf(*, harmonize: pe.Node, space: Space = DEFAULT, output_space: str = "native", omp_nthreads: int = 1, name: str):
    """resample → ``harmonize`` (a whole volume at once) → reassemble, for methods that do not slice.

    Parameters
    ----------
    harmonize : Node
        Named ``harmonize``; its interface declares ``interfaces.volumetric.VolumeInputSpec`` and
        ``VolumeOutputSpec``.
    space : Space
        The model's (``Space.of_model``): the voxel size the volume is resampled to.
    output_space : str
        ``native`` (the input's own grid) or the space's RAS grid.
    omp_nthreads : int
        Threads for resampling.

    Inputs: ``t1w``. Outputs: ``harmonized`` (NIfTI, native grid or the space's), ``info``, ``trace``,
    ``histograms`` (as ``init_harmonize_wf``).
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["harmonized", "info", "trace", "histograms"]), name="outputnode")
    resample = pe.Node(ResampleToHarmonizationSpace(voxel_size=space.voxel_mm, num_threads=omp_nthreads), name="resample",
                       n_procs=omp_nthreads, mem_gb=1.5)  # fmt: skip
    reassemble = pe.Node(Reassemble(output_space=output_space), name="reassemble", mem_gb=1.5)
    wf.connect([
        (inputnode, resample, [("t1w", "in_file")]),
        (inputnode, reassemble, [("t1w", "in_file")]),
        (resample, harmonize, [("out_file", "in_file")]),
        (resample, reassemble, [("out_file", "resampled")]),
        (harmonize, reassemble, [("out_file", "volume")]),
        (reassemble, outputnode, [("out_file", "harmonized")]),
        (harmonize, outputnode, [("info", "info"), ("trace", "trace"), ("histograms", "histograms")]),
    ])  # fmt: skip
    return wf
