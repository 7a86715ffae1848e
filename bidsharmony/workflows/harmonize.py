"""The embeddable harmonization workflow.

Example (inside another Nipype pipeline)::

    from bidsharmony.workflows.harmonize import init_harmonize_wf
    hwf = init_harmonize_wf(model="/models/ixi-hh")
    wf.connect(anat_node, "t1w", hwf, "inputnode.t1w")
    wf.connect(hwf, "outputnode.harmonized", sink, "in_file")
"""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bidsharmony.interfaces.harmonize import Harmonize
from bidsharmony.interfaces.resample import ResampleToHarmonizationSpace
from bidsharmony.interfaces.slicing import Reassemble, SliceVolume
from bidsharmony.interfaces.standardise import Standardise
from bidsharmony.space import DEFAULT, Space


def init_slices_wf(*, space: Space = DEFAULT, omp_nthreads: int = 1, landmarks=None, class_landmarks=None, detail_band=None,
                   detail_voxel=None, detail_model=None, field_model=None, brain_model=None,
                   name: str = "slices_wf"):
    """T1w -> canonical isotropic volume [-> standardised onto ``landmarks`` [-> a foreign bias field
    undone -> detail-matched to ``detail_band``]] -> normalised slices on the model grid.

    The same nodes feed training and harmonization, so both see identical inputs.

    Parameters
    ----------
    space : Space
        The voxel size and slice grid (``Space.of_model`` of the model; ``DEFAULT`` when training one).
    omp_nthreads : int
        Threads for resampling.
    landmarks : (array, list) or None
        The model's (standard landmarks, percentiles) (``model_landmarks``), read once when the
        workflow is built, not once per run in each node; None: no standardisation (training).
    class_landmarks : array or None
        The model's class landmarks (``model_class_landmarks``): the class pass follows the
        percentile map; None: the percentile map alone.
    detail_band : array or None
        The model's (min, mean, max) detail band; None: no detail matching.
    detail_voxel : array or None
        The target's acquired voxel size the band's levels are measured at (``model_detail_voxel``;
        None: as acquired).
    detail_model : path or None
        A model folder holding a learned denoiser (``model_denoiser``), used above the band instead
        of non-local means; None: non-local means.
    field_model : path or None
        A model folder holding the target's typical field (``model_field``): the part of the
        volume's field the target's images lack is undone on the native voxels, before detail
        matching (they are standardised again after it); None: no field stage.
    brain_model : path or None
        A model folder holding a learned brain mask (``model_brainmask``): the landmarks are measured in
        the brain it finds, and ``landmarks`` and ``class_landmarks`` must be the model's landmarks
        measured in it; None: in the blind landmark region.

    Inputs: ``t1w``. Outputs: ``resampled`` (NIfTI: the volume the slices were cut from, standardised
    when ``landmarks`` are given), ``slices`` (.npy), ``record`` (.npz); with ``landmarks`` also
    ``unstandardised`` (the resampled volume before the map) and ``standardisation`` (the map, JSON);
    with ``detail_band`` or ``field_model`` also ``native`` (the native voxels standardised, their
    field undone and detail-matched).
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["resampled", "slices", "record", "unstandardised", "standardisation", "native"]),
                         name="outputnode")
    resample = pe.Node(
        ResampleToHarmonizationSpace(voxel_size=space.voxel_mm, num_threads=omp_nthreads),
        name="resample",
        n_procs=omp_nthreads,
        mem_gb=1.5,
    )
    cut = pe.Node(SliceVolume(grid_shape=space.slice_shape), name="slice", mem_gb=1.0)
    wf.connect([
        (inputnode, resample, [("t1w", "in_file")]),
        (cut, outputnode, [("slices", "slices"), ("record", "record")]),
    ])  # fmt: skip
    if landmarks is None:
        wf.connect([(resample, cut, [("out_file", "in_file")]), (resample, outputnode, [("out_file", "resampled")])])
        return wf
    standard, percentiles = landmarks
    standardise = pe.Node(Standardise(standard=[float(x) for x in standard], percentiles=percentiles), name="standardise", mem_gb=1.5)
    if class_landmarks is not None:
        standardise.inputs.class_standard = [float(x) for x in class_landmarks]
    if field_model is not None:
        standardise.inputs.field_model = str(field_model)
    if brain_model is not None:
        standardise.inputs.brain_model = str(brain_model)
    if detail_band is not None:
        standardise.inputs.band = [float(x) for x in detail_band]
        if detail_voxel is not None:
            standardise.inputs.target_voxel = [float(x) for x in detail_voxel]
        if detail_model is not None:
            standardise.inputs.denoiser_model = str(detail_model)
    if detail_band is not None or field_model is not None:
        wf.connect([(standardise, outputnode, [("native_file", "native")])])
    wf.connect([
        (inputnode, standardise, [("t1w", "source")]),
        (resample, standardise, [("out_file", "in_file")]),
        (resample, outputnode, [("out_file", "unstandardised")]),
        (standardise, cut, [("out_file", "in_file")]),
        (standardise, outputnode, [("out_file", "resampled"), ("standardisation", "standardisation")]),
    ])  # fmt: skip
    return wf


def harmonize_mem_gb(model_config: dict, batch_size: int) -> float:
    """A scheduler's memory request for the harmonization node (activations dominate)."""
    arch = model_config.get("architecture", {})
    h, w = Space.of_model(model_config).slice_shape
    per_slice = arch.get("hidden", 96) * (h // 2) * (w // 2) * 4 * 12  # ~12 live feature maps
    return round(1.0 + batch_size * per_slice / 1e9, 1)


def resolve_detail(requested: str, standardise: str, model, read: tuple | None = None):
    """(``match`` or ``none``, the model's band or None, the voxel size its levels are measured at or
    None): ``auto`` matches where the model holds a detail band and the volume is standardised (the
    band is on the standard scale). ``read``: the folder's ``read_folder``, if the caller has it."""
    from bidsharmony.errors import ModelError
    from bidsharmony.flow.checkpoint import model_detail_band, model_detail_voxel

    if requested == "none":
        return "none", None, None
    if standardise != "landmarks":
        if requested == "match":
            raise ModelError(f"{model}: --detail match needs the standardisation (its band is on the standard scale); "
                             "drop --standardise none or pass --detail none")
        return "none", None, None
    band = model_detail_band(model, read)
    if band is None:
        if requested == "match":
            raise ModelError(f"{model}: the model has no detail band; refit it (benchmarks/fit_landmarks.py) or pass --detail none")
        return "none", None, None
    return "match", band, model_detail_voxel(model, read)


def resolve_denoiser(requested: str, detail: str, config: dict, model) -> str:
    """``learned`` or ``non-local-means`` (``none`` without detail matching): ``auto`` is the
    learned one where the model holds one; ``learned`` with a model without one is refused."""
    from bidsharmony.errors import ModelError
    from bidsharmony.flow.checkpoint import has_denoiser

    if detail != "match":
        return "none"
    if requested == "learned" and not has_denoiser(config):
        raise ModelError(f"{model}: the model holds no learned denoiser; retrain it (train --denoiser-steps) or pass --denoiser non-local-means")
    return "non-local-means" if requested == "non-local-means" or not has_denoiser(config) else "learned"


def resolve_field(requested: str, detail: str, config: dict, model) -> str:
    """``n4-typical`` or ``none``: ``auto`` undoes the foreign field where the model holds the
    target's typical field and the detail stage runs (its level gates the field: N4 is trusted only
    on volumes the detail stage leaves alone, ``image.field``); ``n4-typical`` otherwise is refused."""
    from bidsharmony.errors import ModelError
    from bidsharmony.flow.checkpoint import has_field

    if requested == "none":
        return "none"
    if detail != "match" or not has_field(config):
        if requested == "n4-typical":
            why = ("needs the detail stage (its level decides where N4 can be trusted); drop --detail none" if detail != "match"
                   else "the model holds no typical field; refit it (benchmarks/fit_field.py)")
            raise ModelError(f"{model}: --field n4-typical {why}, or pass --field none")
        return "none"
    return "n4-typical"


def resolve_classes(requested: str, standardise: str, model, read: tuple | None = None):
    """(``tissue`` or ``none``, the model's class landmarks or None): ``tissue`` needs the standardisation
    and a model with class landmarks, and is refused otherwise."""
    from bidsharmony.errors import ModelError
    from bidsharmony.flow.checkpoint import model_class_landmarks

    if requested == "none":
        return "none", None
    if standardise != "landmarks":
        raise ModelError(f"{model}: --classes tissue needs the standardisation; drop --standardise none or pass --classes none")
    found = model_class_landmarks(model, read)
    if found is None:
        raise ModelError(f"{model}: the model has no class landmarks; refit them (benchmarks/fit_landmarks.py --classes-only) "
                         "or pass --classes none")
    return "tissue", found


def resolve_region(requested: str, standardise: str, model, read: tuple | None = None):
    """(``brain`` or ``head``, the model's brain mask (``model_brainmask``) or None): ``brain`` needs the
    standardisation and a model holding a learned brain mask, and is refused otherwise."""
    from bidsharmony.errors import ModelError
    from bidsharmony.flow.checkpoint import model_brainmask

    if requested == "head":
        return "head", None
    if standardise != "landmarks":
        raise ModelError(f"{model}: --landmark-region brain needs the standardisation; drop --standardise none or pass "
                         "--landmark-region head")
    found = model_brainmask(model, read)
    if found is None:
        raise ModelError(f"{model}: the model has no learned brain mask (benchmarks/fit_brainmask.py adds one); pass "
                         "--landmark-region head")
    return "brain", found


def resolve_standardise(requested: str, config: dict, model) -> str:
    """``auto`` → ``landmarks`` where the model holds landmarks, else ``none`` (with a warning);
    ``landmarks`` with a model without them is refused."""
    import logging

    from bidsharmony.errors import ModelError
    from bidsharmony.flow.checkpoint import has_landmarks

    if has_landmarks(config):
        return "none" if requested == "none" else "landmarks"
    if requested == "landmarks":
        raise ModelError(f"{model}: the model has no intensity landmarks (trained before standardisation existed); retrain it "
                         "or pass --standardise none")
    if requested == "auto":
        logging.getLogger("bidsharmony").warning("%s: the model has no intensity landmarks; harmonizing without standardisation "
                                                 "(retrain it to standardise)", model)
    return "none"


def init_harmonize_wf(
    *,
    model,
    params: dict | None = None,
    device: str = "auto",
    output_space: str = "native",
    omp_nthreads: int = 1,
    name: str = "harmonize_wf",
):
    """Harmonize one T1w with a flow model.

    resample (1.2 mm RAS) → standardise (onto the model's intensity landmarks, volume-wide, then its class landmarks) →
    slice → harmonize (the flow loop) → reassemble (native grid, or the 1.2 mm one).

    Parameters
    ----------
    model : path of a model folder (``model.safetensors`` + ``config.json``)
    params : HarmonizeParams fields (defaults where missing); ``standardise`` ``auto`` is resolved here
    device : ``auto``, ``cpu``, ``cuda`` or ``cuda:N``
    output_space : ``native`` (the input's grid, affine and header) or ``harmonization`` (1.2 mm RAS)

    Inputs: ``t1w``. Outputs: ``harmonized`` (NIfTI; on the model's standard intensity scale when
    standardised, else on the input's), ``info`` (dict for the sidecar), ``trace`` (per-iteration
    objective terms, JSON), ``histograms`` (slice-intensity densities before/after and the model's
    target, JSON).
    """
    from bidsharmony.errors import ModelError
    from bidsharmony.flow.checkpoint import model_landmarks, read_config, read_folder
    from bidsharmony.harmonize.solvers import HarmonizeParams

    config = read_config(model)
    params = HarmonizeParams(**(params or {})).validate()
    params.standardise = resolve_standardise(params.standardise, config, model)
    landmarks, read = None, None
    if params.standardise == "landmarks":
        read = read_folder(model)  # the weights read and hashed once, for the landmarks and the band
        landmarks = model_landmarks(model, read)
        if landmarks[0] is None:
            raise ModelError(f"{model}: the model has no intensity landmarks in its weights; retrain it or pass --standardise none")
    params.classes, class_landmarks = resolve_classes(params.classes, params.standardise, model, read)
    params.landmark_region, brain = resolve_region(params.landmark_region, params.standardise, model, read)
    if brain is not None:  # the landmarks measured in the learned mask replace the blind region's
        landmarks = (brain[1], landmarks[1])
        class_landmarks = brain[2] if class_landmarks is not None else None
    params.detail, band, detail_voxel = resolve_detail(params.detail, params.standardise, model, read)
    params.denoiser = resolve_denoiser(params.denoiser, params.detail, config, model)
    params.field = resolve_field(params.field, params.detail, config, model)
    params = params.to_dict()
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["harmonized", "info", "trace", "histograms"]), name="outputnode")
    slices_wf = init_slices_wf(
        space=Space.of_model(config),
        omp_nthreads=omp_nthreads,
        landmarks=landmarks,
        class_landmarks=class_landmarks,
        detail_band=band,
        detail_voxel=detail_voxel,
        detail_model=model if params["denoiser"] == "learned" else None,
        field_model=model if params["field"] == "n4-typical" else None,
        brain_model=model if params["landmark_region"] == "brain" else None,
    )
    harmonize = pe.Node(
        Harmonize(model=str(model), params=params, device=device, num_threads=omp_nthreads),
        name="harmonize",
        n_procs=omp_nthreads,
        mem_gb=harmonize_mem_gb(config, params["batch_size"]),
    )
    reassemble = pe.Node(Reassemble(output_space=output_space), name="reassemble", mem_gb=1.5)
    wf.connect([
        (inputnode, slices_wf, [("t1w", "inputnode.t1w")]),
        (inputnode, reassemble, [("t1w", "in_file")]),
        (slices_wf, harmonize, [("outputnode.slices", "slices"), ("outputnode.record", "record")]),
        (slices_wf, reassemble, [("outputnode.record", "record"), ("outputnode.resampled", "resampled")]),
        (harmonize, reassemble, [("slices", "slices")]),
        (reassemble, outputnode, [("out_file", "harmonized")]),
        (harmonize, outputnode, [("info", "info"), ("trace", "trace"), ("histograms", "histograms")]),
    ])  # fmt: skip
    if params["standardise"] == "landmarks":
        wf.connect([
            (slices_wf, harmonize, [("outputnode.standardisation", "standardisation"), ("outputnode.unstandardised", "unstandardised")]),
            (slices_wf, reassemble, [("outputnode.standardisation", "standardisation")]),
        ])  # fmt: skip
    if params["detail"] == "match" or params["field"] == "n4-typical":
        wf.connect([(slices_wf, reassemble, [("outputnode.native", "native")])])
    return wf
