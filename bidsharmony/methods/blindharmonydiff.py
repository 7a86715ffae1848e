"""BlindHarmonyDiff (``--method bhdiff``): a 3D rectified flow (a U-Net velocity field) that
generates the target-domain volume from the source's contrast-invariant edges, then refines its
correlation with the source. Its parts live in ``bidsharmony.bhdiff``; the workflow in
``bidsharmony.workflows.bhdiff``. No model of it ships: ``--model`` is required.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from bidsharmony.argtypes import non_negative_float, non_negative_int, positive_int
from bidsharmony.methods import ModelInfo

LOG = logging.getLogger("bidsharmony")

SUMMARY = "bhdiff: 3D rectified flow from edges (BlindHarmonyDiff; needs a bhdiff --model)"
DESCRIPTION = "T1w harmonized to the model's target domain with a 3D rectified flow from edges (BlindHarmonyDiff)"


def add_arguments(harmonization, training) -> None:
    g = harmonization
    g.add_argument("--ode-steps", type=positive_int, default=15, help="bhdiff: midpoint ODE steps (2 network evaluations each)")
    g.add_argument("--refine-steps", type=non_negative_int, default=6, help="bhdiff: correlation-refinement steps")
    g.add_argument("--refine-step", type=non_negative_float, default=0.005, help="bhdiff: size of each refinement step ([-1, 1] intensity units)")
    g.add_argument("--patch-size", type=non_negative_int, default=0, help="bhdiff: sample in overlapping cubes of this size (0: the whole volume at once)")
    t = training
    t.add_argument("--bhdiff-preset", choices=("tiny", "small", "paper"), default="small", help="bhdiff: 3D U-Net size (paper: 97.5 M parameters, for GPUs)")
    t.add_argument("--train-patch", type=positive_int, default=64, help="bhdiff: training patch edge (voxels)")


def harmonize_params(opts, device: str) -> dict:
    from bidsharmony.bhdiff.volume import BHDiffParams

    return BHDiffParams(ode_steps=opts.ode_steps, refine_steps=opts.refine_steps, refine_step=opts.refine_step,
                        patch=opts.patch_size, seed=opts.random_seed).validate().to_dict()  # fmt: skip


def check_model(model: Path | None) -> ModelInfo:
    from bidsharmony.bhdiff.checkpoint import load_bhdiff_model
    from bidsharmony.errors import UsageError

    if model is None:
        raise UsageError("--method bhdiff needs --model DIR: no bhdiff model ships (train one with --method bhdiff train)")
    _, cfg = load_bhdiff_model(model)  # fails early on a bad model folder
    return ModelInfo(Path(model), cfg.get("name"), cfg["weights_sha256"])


def init_wf(*, model, params: dict, device: str = "auto", output_space: str = "native", omp_nthreads: int = 1,
            name: str = "bhdiff_wf"):
    """The method's workflow: ``workflows.bhdiff.init_bhdiff_wf``, whose docstring gives its
    parameters, inputs (``t1w``) and outputs (``harmonized``, ``info``, ``trace``, ``histograms``)."""
    from bidsharmony.workflows.bhdiff import init_bhdiff_wf

    return init_bhdiff_wf(model=model, params=params, device=device, output_space=output_space, omp_nthreads=omp_nthreads, name=name)


def train_defaults(gpu: bool) -> tuple[tuple[int, int], str]:
    return (20000, 2), "bhdiff defaults"


def train(opts, runs, *, device: str, steps: int, batch: int, run_workflow) -> None:
    """The resample node per run, then flow matching on the volumes' edges."""
    from dataclasses import asdict

    import nibabel as nb
    import numpy as np

    from bidsharmony import __version__
    from bidsharmony.bhdiff.checkpoint import save_bhdiff_model
    from bidsharmony.bhdiff.train import BHDiffTrainConfig, prepare_volume, train_bhdiff
    from bidsharmony.image.slices import cut
    from bidsharmony.metrics import slice_histogram
    from bidsharmony.modelfolder import new_stage, publish_training
    from bidsharmony.space import DEFAULT
    from bidsharmony.workflows.train import init_train_prep_wf, read_manifest

    LOG.info("preprocessing %d T1w run(s) for bhdiff training", len(runs))
    with tempfile.TemporaryDirectory(prefix="bidsharmony-train-") as tmp:
        manifest = Path(tmp) / "manifest.json"
        run_workflow(init_train_prep_wf(runs=runs, manifest=manifest, omp_nthreads=1))
        files = sorted(run.resampled for run in read_manifest(manifest))
    volumes = [np.asanyarray(nb.load(f).dataobj, dtype=np.float32) for f in files]
    LOG.info("edges and normalisation of %d volume(s)", len(volumes))
    prepared = [prepare_volume(v) for v in volumes]
    hist = slice_histogram(np.concatenate([s[r.harmonize.astype(bool)] for s, r in (cut(v) for v in volumes)]))
    cfg = BHDiffTrainConfig(preset=opts.bhdiff_preset, steps=steps, batch_size=batch,
                            learning_rate=opts.learning_rate, patch=opts.train_patch,
                            checkpoint_every=opts.checkpoint_every, seed=opts.random_seed, amp=opts.amp)  # fmt: skip
    stage = new_stage(opts.output_dir, "training")  # built aside, resumable, swapped in when finished
    result = train_bhdiff(prepared, cfg, stage, device=device, progress=opts.verbose > 0, overwrite=opts.overwrite)
    meta = {"name": opts.model_name or opts.output_dir.resolve().name, "preset": opts.bhdiff_preset, "software_version": __version__,
            "method": "bhdiff", "target_histogram": [round(float(x), 5) for x in hist],
            "training": {**asdict(cfg), "device": device, "seconds_last_run": round(result["seconds"], 1),
                         "final_loss_mean_last_50": round(float(np.mean(result["losses"][-50:])), 5)},
            "training_data": {"dataset": str(opts.bids_dir.resolve()), "volumes": len(volumes),
                              "subjects": sorted({r["entities"]["subject"] for r in runs})},
            "preprocessing": {"voxel_size": DEFAULT.voxel_mm, "orientation": DEFAULT.orientation, "intensity": "head 0.5/99.5 % to [-1, 1], clipped",
                              "edges": "3D Canny on the rank-transformed head (bidsharmony.bhdiff.edges)"}}  # fmt: skip
    save_bhdiff_model(stage, result["ema"], meta)
    publish_training(stage, opts.output_dir)
    LOG.info("trained %d steps in %.0f s; model in %s", result["steps"], result["seconds"], opts.output_dir)
