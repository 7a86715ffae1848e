"""``--method identity``: the pipeline without harmonization. The T1w is resampled to the 1.2 mm
grid and reassembled, and nothing else changes: a baseline for what the pipeline alone does to an
image (native output: the input's own voxels, bit for bit in float32), and the smallest example of
a method (one package here and one line in ``methods.METHODS``)."""

from __future__ import annotations

from pathlib import Path

from bidsharmony.methods import ModelInfo

SUMMARY = "identity: no harmonization, the pipeline only (a baseline)"
DESCRIPTION = "T1w passed through the pipeline unharmonized (the identity method: a baseline)"


def add_arguments(harmonization, training) -> None:
    """No options of its own."""


def harmonize_params(opts, device: str) -> dict:
    return {}


def check_model(model: Path | None) -> ModelInfo:
    from bidsharmony.errors import UsageError

    if model is not None:
        raise UsageError("--method identity uses no model; leave out --model")
    return ModelInfo(None, "none", "")


def init_wf(*, model, params: dict, device: str = "auto", output_space: str = "native", omp_nthreads: int = 1,
            name: str = "identity_wf"):
    """resample (1.2 mm RAS) → identity → reassemble (native grid, or the 1.2 mm one).

    Inputs: ``t1w``. Outputs: ``harmonized``, ``info``, ``trace``, ``histograms`` (as every method's).
    """
    from nipype.pipeline import engine as pe

    from bidsharmony.methods.identity.interfaces import IdentityHarmonize
    from bidsharmony.workflows.volumetric import init_volume_wf

    harmonize = pe.Node(IdentityHarmonize(), name="harmonize", mem_gb=1.0)
    return init_volume_wf(harmonize=harmonize, output_space=output_space, omp_nthreads=omp_nthreads, name=name)


def train_defaults(gpu: bool) -> tuple[tuple[int, int], str]:
    return (0, 0), "nothing to train"


def train(opts, runs, *, device: str, steps: int, batch: int, run_workflow) -> None:
    from bidsharmony.errors import UsageError

    raise UsageError("--method identity has nothing to train")
