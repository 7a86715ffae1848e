"""The embeddable BlindHarmonyDiff workflow: the same inputs and outputs as ``init_harmonize_wf``."""

from __future__ import annotations

from nipype.pipeline import engine as pe

from bidsharmony.interfaces.bhdiff import BHDiffHarmonize
from bidsharmony.space import Space
from bidsharmony.workflows.volumetric import init_volume_wf


def bhdiff_mem_gb(shape=(150, 180, 150), base: int = 32) -> float:
    """A rough whole-volume estimate: the U-Net's widest activations dominate (float32)."""
    voxels = shape[0] * shape[1] * shape[2]
    return round(1.0 + 12 * base * voxels * 4 / 2**30, 1)


def init_bhdiff_wf(*, model, params: dict | None = None, device: str = "auto", output_space: str = "native",
                   omp_nthreads: int = 1, name: str = "bhdiff_wf"):
    """Harmonize one T1w with a BlindHarmonyDiff model folder.

    resample (1.2 mm RAS) → harmonize (the 3D rectified flow from edges, then the correlation
    refinement) → reassemble (native grid, or the 1.2 mm one).

    Parameters
    ----------
    model : path of a bhdiff model folder
    params : BHDiffParams fields (defaults where missing)
    device : ``auto``, ``cpu``, ``cuda`` or ``cuda:N``
    output_space : ``native`` or ``harmonization``

    Inputs: ``t1w``. Outputs: ``harmonized``, ``info``, ``trace``, ``histograms`` (as init_harmonize_wf).
    """
    import json
    from pathlib import Path

    from bidsharmony.bhdiff.volume import BHDiffParams

    config = json.loads((Path(model) / "config.json").read_text())
    params = BHDiffParams(**(params or {})).validate().to_dict()
    harmonize = pe.Node(BHDiffHarmonize(model=str(model), params=params, device=device, num_threads=omp_nthreads),
                        name="harmonize", n_procs=omp_nthreads,
                        mem_gb=bhdiff_mem_gb(base=config.get("architecture", {}).get("base", 32)))  # fmt: skip
    return init_volume_wf(harmonize=harmonize, space=Space.of_model(config), output_space=output_space, omp_nthreads=omp_nthreads, name=name)
