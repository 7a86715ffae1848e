"""BlindHarmony (``--method flow``): a 2D normalizing-flow prior of the target's axial slices,
applied slice by slice after a volume-wide standardisation onto the target's intensity landmarks.

Its parts: the flow (``bidsharmony.flow``), the harmonization solvers (``bidsharmony.harmonize``),
training (``bidsharmony.train``) and the workflow (``bidsharmony.workflows.harmonize``).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

from bidsharmony.argtypes import non_negative_float, non_negative_int, positive_int
from bidsharmony.methods import ModelInfo

LOG = logging.getLogger("bidsharmony")

SUMMARY = "flow: 2D normalizing-flow prior (BlindHarmony)"
DESCRIPTION = "T1w harmonized to the model's target domain with a normalizing-flow prior (BlindHarmony)"
PRESET_NAMES = ("paper", "fast", "tiny")  # mirrored from flow.model.PRESETS (tested): --help imports no torch


def add_arguments(harmonization, training) -> None:
    g = harmonization
    g.add_argument("--standardise", choices=("auto", "landmarks", "none"), default="auto", help="flow: map each volume onto the model's intensity landmarks before slicing, so the output is on the target's scale (auto: where the model has landmarks; none: the published method, output on the input's scale)")
    g.add_argument("--classes", choices=("none", "tissue"), default="none", help="flow: tissue: after the percentile map, a second monotone map that puts the quantiles within the volume's CSF-, grey- and white-like intensity classes onto the target's (the model's class landmarks), so that a head keeps more of its own tissue composition, which percentiles alone pull towards the target's mean; it costs volume PSNR on some scanners (docs/method.md §6). none: the percentile map alone")
    g.add_argument("--landmark-region", choices=("head", "brain"), default="head", help="flow: where the standardisation measures a volume's landmarks. head: in the blind region (the head deeper than 15 mm: skull, sinuses and eyes included); brain: in the brain found by the model's learned brain mask (a small 3D U-Net trained on the target's heads and their brain masks; it sees intensity ranks, so no monotone change of contrast moves it): on the benchmark's TEST heads +1.5 to +2 dB on log and gamma < 1 and a closer TrioTim scan, but -2 to -3 dB on gamma > 1 (docs/method.md §6)")
    g.add_argument("--detail", choices=("auto", "match", "none"), default="auto", help="flow: after the standardisation, denoise or sharpen each volume until its detail level is inside the target's band (auto: where the model has a band; none: leave noise and sharpness as acquired)")
    g.add_argument("--denoiser", choices=("auto", "learned", "non-local-means"), default="auto", help="flow: what the detail stage denoises with (auto: the model's learned denoiser where it holds one, else non-local means)")
    g.add_argument("--field", choices=("auto", "n4-typical", "none"), default="auto", help="flow: after the standardisation, undo the part of the volume's smooth intensity (bias) field that no target head has: N4's field beyond what the target's own heads' fields span, weighted from 0 at the largest leftover of any training head, where the detail stage leaves the volume alone; about 10 s of N4 a volume on 2 CPU cores (docs/method.md §9). auto: where the model holds the typical field; none: leave the field as acquired")
    g.add_argument("--iterations", type=non_negative_int, default=0, help="iterations of the flow loop after the standardisation (the published method: 10; 0, the default, runs no loop: on the benchmark the loop lowers the volume PSNR by about 2 dB after the standardisation)")
    g.add_argument("--alpha", type=non_negative_float, default=1e-3, help="latent shrink per iteration (weight of |z|^2)")
    g.add_argument("--beta-fidelity", type=non_negative_float, default=1e3, help="weight of the similarity to the source")
    g.add_argument("--beta-gradient", type=non_negative_float, default=1e-3, help="weight of the masked edge term |M G x|_1")
    g.add_argument("--similarity", choices=("cosine", "ncc"), default="cosine", help="cosine: uncentred (the published code); ncc: mean-removed (the poster)")
    g.add_argument("--start", choices=("source", "mean"), default="source", help="x_0: the source slice, or the model's mean target slice at that position (the published code; stronger per slice, but adds slice-to-slice steps in volumes: see README)")
    g.add_argument("--solver", choices=("alternating", "latent"), default="alternating", help="alternating image/latent steps (published), or Adam on z through f^-1")
    g.add_argument("--latent-lr", type=non_negative_float, default=0.05, help="Adam step of the latent solver")
    g.add_argument("--batch-size", type=positive_int, default=None, help="slices per flow pass (default: 8 on CPU, 64 on GPU; halves itself on out-of-memory)")
    t = training
    t.add_argument("--preset", choices=PRESET_NAMES, default="fast", help="flow architecture")
    t.add_argument("--validation-fraction", type=non_negative_float, default=0.1, help="fraction of subjects held out for validation (at least one when there are 2 or more, never all; one subject: a contiguous block of its slices)")
    t.add_argument("--val-every", type=positive_int, default=500, help="validate (and keep the best model) every N steps")
    t.add_argument("--augment", action="store_true", help="random left-right flips")
    t.add_argument("--field-volumes", type=non_negative_int, default=30, help="training volumes the target's typical bias field is fitted on (N4 takes about 20 s a volume on 2 CPU cores; 0: none, no field stage)")
    t.add_argument("--denoiser-steps", type=non_negative_int, default=None, help="steps of the learned denoiser's training, before the flow's (default: 12000 on a GPU, 6000 on a CPU, about 35 minutes on 2 cores; 0: none, the detail stage then uses non-local means)")


def harmonize_params(opts, device: str) -> dict:
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
        standardise=opts.standardise,
        classes=opts.classes,
        landmark_region=opts.landmark_region,
        detail=opts.detail,
        denoiser=opts.denoiser,
        field=opts.field,
    ).validate().to_dict()


def check_model(model: Path | None) -> ModelInfo:
    """``--model`` or the bundled default, loaded once on the CPU to fail early on a bad folder."""
    from bidsharmony.flow.checkpoint import load_model
    from bidsharmony.models import default_model

    folder = Path(model) if model is not None else default_model()
    loaded = load_model(folder, device="cpu")
    return ModelInfo(folder, loaded.name, loaded.sha256)


def init_wf(*, model, params: dict, device: str = "auto", output_space: str = "native", omp_nthreads: int = 1,
            name: str = "harmonize_wf"):
    """The method's workflow: ``workflows.harmonize.init_harmonize_wf``, whose docstring gives its
    parameters, inputs (``t1w``) and outputs (``harmonized``, ``info``, ``trace``, ``histograms``)."""
    from bidsharmony.workflows.harmonize import init_harmonize_wf

    return init_harmonize_wf(model=model, params=params, device=device, output_space=output_space, omp_nthreads=omp_nthreads, name=name)


def train_defaults(gpu: bool) -> tuple[tuple[int, int], str]:
    """(steps, slices per step) and why: a CPU step on 256 slices takes seconds and gigabytes."""
    return ((10000, 256), "defaults for a GPU") if gpu else ((2000, 32), "defaults for a CPU")


def _train_denoiser(opts, prepared, subjects: set, landmarks, stage: Path, device: str, meta: dict) -> dict:
    """The learned denoiser (``bidsharmony.train.denoiser``) on the training subjects' T1w, resumable
    in the stage's checkpoint folder; its tensors for the model folder, its entry added to ``meta``."""
    from bidsharmony.train import denoiser as tdn
    from bidsharmony.train.loop import STATE_DIR

    steps = opts.denoiser_steps if opts.denoiser_steps is not None else (12000 if device.startswith("cuda") else 6000)
    if not steps:
        LOG.info("no learned denoiser (--denoiser-steps 0): the detail stage will use non-local means")
        return {}
    files = sorted(run.source for run in prepared if run.subject in subjects)
    cfg = tdn.DenoiserConfig(steps=steps, seed=opts.random_seed, checkpoint_every=opts.checkpoint_every)
    LOG.info("training the learned denoiser: %d steps on %d volume(s)", steps, len(files))
    net, curve = tdn.train_on_files(files, landmarks, cfg, stage / STATE_DIR, overwrite=opts.overwrite,
                                    progress=tdn.log_progress(steps), device=device)
    meta["preprocessing"]["detail"]["learned_denoiser"] = tdn.model_entry(cfg, len(files), len(curve))
    return tdn.to_tensors(net)


def train(opts, runs, *, device: str, steps: int, batch: int, run_workflow) -> None:
    """Preprocess the target's runs with the harmonization's own nodes (``run_workflow`` executes a
    Nipype workflow and returns its graph), then fit the flow, its mean start images, slice
    histogram and intensity landmarks, into a folder built aside and swapped in when finished."""
    from dataclasses import replace

    from bidsharmony import __version__
    from bidsharmony.errors import BidsHarmonyError
    from bidsharmony.flow.checkpoint import PREPROCESSING
    from bidsharmony.flow.model import PRESETS
    from bidsharmony.image.detail import BAND, VOXEL
    from bidsharmony.image.detail import model_entry as detail_entry
    from bidsharmony.image.slices import POSITION_BINS
    from bidsharmony.image.standardise import CLASS_LANDMARKS, LANDMARKS, model_entry
    from bidsharmony.modelfolder import new_stage, publish_training
    from bidsharmony.space import DEFAULT
    from bidsharmony.train import data as tdata
    from bidsharmony.train.loop import TrainConfig, train_flow
    from bidsharmony.workflows.train import init_train_prep_wf, read_manifest

    grid = PRESETS[opts.preset].slice_shape
    LOG.info("preprocessing %d T1w run(s) for training", len(runs))
    space = replace(DEFAULT, slice_shape=tuple(grid))
    with tempfile.TemporaryDirectory(prefix="bidsharmony-train-") as tmp:
        manifest = Path(tmp) / "manifest.json"
        run_workflow(init_train_prep_wf(runs=runs, manifest=manifest, space=space, omp_nthreads=1))
        prepared = read_manifest(manifest)
    slices = tdata.load_slice_set((run.subject, run.slices, run.record) for run in prepared)
    if len(slices) < 2:
        raise BidsHarmonyError(f"{opts.bids_dir}: only {len(slices)} slice(s) with head found; cannot train")
    train_set, val = tdata.split_by_subject(slices, opts.validation_fraction, opts.random_seed)
    LOG.info("training on %d slices (%d subjects), validating on %d slices (%d subjects)",
             len(train_set), len(set(train_set.subject)), len(val), len(set(val.subject)))
    cfg = TrainConfig(
        preset=opts.preset, steps=steps, batch_size=batch, learning_rate=opts.learning_rate,
        val_every=opts.val_every, checkpoint_every=opts.checkpoint_every, augment=opts.augment, seed=opts.random_seed, amp=opts.amp,
    )  # fmt: skip
    meta = {
        "name": opts.model_name or opts.output_dir.resolve().name,
        "preset": opts.preset,
        "software_version": __version__,
        "preprocessing": {
            "voxel_size": space.voxel_mm,
            "slice_axis": "axial (inferior-superior)",
            "slice_shape": list(grid),
            **PREPROCESSING,
            "position_bins": POSITION_BINS,
        },
        "training_data": {
            "dataset": str(opts.bids_dir.resolve()),
            "subjects_train": sorted(set(train_set.subject.tolist())),
            "subjects_validation": sorted(set(val.subject.tolist())),
            "slices_train": len(train_set),
            "slices_validation": len(val),
        },
    }
    landmarks, classes, volumes = tdata.target_landmarks(prepared, set(train_set.subject.tolist()))
    LOG.info("intensity landmarks of %d training volume(s): %s", volumes, ", ".join(f"{x:.1f}" for x in landmarks))
    LOG.info("class landmarks of the same volume(s): %s", ", ".join(f"{x:.1f}" for x in classes))
    meta["preprocessing"]["standardisation"] = model_entry(volumes)
    band, voxel = tdata.target_detail_band(prepared, set(train_set.subject.tolist()), landmarks)
    LOG.info("detail band (min, mean, max) of the standardised training volumes at %s mm: %s",
             " x ".join(f"{x:.2f}" for x in voxel), ", ".join(f"{x:.3f}" for x in band))
    meta["preprocessing"]["detail"] = detail_entry(volumes)
    extras = {"start_images": tdata.mean_start_images(train_set), "target_histogram": tdata.intensity_histogram(train_set),
              LANDMARKS: landmarks, CLASS_LANDMARKS: classes, BAND: band, VOXEL: voxel}
    if opts.field_volumes:
        typical = tdata.target_field(prepared, set(train_set.subject.tolist()), landmarks, opts.field_volumes, opts.random_seed)
        if typical is not None:
            meta["preprocessing"]["field"] = typical.model_entry()
            extras.update(typical.to_extras())
    else:
        LOG.info("no typical bias field (--field-volumes 0)")
    stage = new_stage(opts.output_dir, "training")  # built aside, resumable, swapped in when finished
    tensors = _train_denoiser(opts, prepared, set(train_set.subject.tolist()), landmarks, stage, device, meta)
    summary = train_flow(train_set, val, cfg, stage, device=device, extras=extras, meta=meta,
                         progress=sys.stderr.isatty() or opts.verbose > 0, overwrite=opts.overwrite, tensors=tensors)
    publish_training(stage, opts.output_dir)
    LOG.info("trained %d steps in %.0f s; best validation %.4f bits/dim; model in %s", summary["steps"], summary["seconds"],
             summary["best_val_bpd"], opts.output_dir)
