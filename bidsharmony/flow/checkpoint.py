"""The 2D flow's model folders: saving and loading a ``SliceFlow`` with its extras (the mean target
slice per position, the target histogram, the intensity landmarks) through the one model-folder
format (``bidsharmony.modelfolder``), and the preprocessing such a model must have been trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bidsharmony import modelfolder
from bidsharmony.errors import ModelError
from bidsharmony.modelfolder import CONFIG, WEIGHTS, check_shapes, write_folder

FORMAT = "bidsharmony-flow"
FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    flow: "object"  # SliceFlow
    config: dict
    extras: dict = field(default_factory=dict)  # name -> tensor
    path: Path | None = None

    @property
    def sha256(self) -> str:
        return self.config["weights_sha256"]

    @property
    def name(self) -> str:
        return self.config.get("name", self.path.name if self.path else "unnamed")


def save_model(folder, flow, config: dict, extras: dict | None = None, half: bool = False, tensors: dict | None = None) -> Path:
    """Write a model folder: the flow's weights, ``extras`` (arrays, stored as ``extra.NAME``) and
    ``tensors`` stored under their own names (a learned denoiser's ``denoiser.*``)."""
    import torch

    tensors = dict(tensors or {})
    for k, v in flow.state_dict().items():
        v = v.detach().cpu().contiguous()
        if half and v.is_floating_point():
            v = v.half()
        tensors[f"flow.{k}"] = v
    for k, v in (extras or {}).items():
        tensors[f"extra.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    cfg = {**config, "format": FORMAT, "format_version": FORMAT_VERSION, "architecture": flow.cfg.to_dict(),
           "storage_dtype": "float16" if half else "float32"}  # fmt: skip
    return write_folder(folder, tensors, cfg)


# What harmonization does to a volume before the flow sees it (methods/blindharmony.py writes these
# into each model's config.json): a model trained on other inputs would be fed what it never saw.
PREPROCESSING = {"orientation": "RAS", "normalisation": "per-slice min-max to [0, 1] inside the grid", "quantisation_bits": 12}


def check_preprocessing(cfg: dict, path) -> None:
    """Refuse a 2D model whose recorded preprocessing differs from what inference does (a field the
    config leaves out is not checked: hand-made and older folders)."""
    prep = cfg.get("preprocessing") or {}
    if not isinstance(prep, dict):
        raise ModelError(f"{path}: preprocessing is {type(prep).__name__}, not an object")
    for key, want in PREPROCESSING.items():
        if key in prep and prep[key] != want:
            raise ModelError(f"{path}: the model was trained with {key} {prep[key]!r}; bidsharmony harmonizes with {want!r}")
    arch = (cfg.get("architecture") or {}).get("slice_shape")
    if "slice_shape" in prep and arch is not None and list(prep["slice_shape"]) != list(arch):
        raise ModelError(f"{path}: preprocessing.slice_shape {prep['slice_shape']} differs from the architecture's {arch}")


def read_config(folder) -> dict:
    """A 2D flow model's config, its recorded preprocessing checked."""
    return modelfolder.read_config(folder, FORMAT, FORMAT_VERSION, check_preprocessing)


def read_folder(folder, verify_hash: bool = True) -> tuple[dict, dict]:
    return modelfolder.read_folder(folder, FORMAT, FORMAT_VERSION, verify_hash, check_preprocessing)


def load_model(folder, device="cpu", verify_hash: bool = True) -> LoadedModel:
    """Load a model folder for inference (eval mode, float32, on ``device``)."""
    from bidsharmony.flow.model import FlowConfig, SliceFlow, state_shapes

    folder = Path(folder)
    cfg, tensors = read_folder(folder, verify_hash=verify_hash)
    weights = folder / WEIGHTS
    try:
        arch = FlowConfig.from_dict(cfg["architecture"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelError(f"{folder / CONFIG}: invalid architecture ({e})") from None
    check_shapes(tensors, "flow.", state_shapes(arch), folder)
    try:
        flow = SliceFlow(arch)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{folder / CONFIG}: invalid architecture ({e})") from None
    state = {k[5:]: v.float() if v.is_floating_point() else v for k, v in tensors.items() if k.startswith("flow.")}
    try:
        flow.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ModelError(f"{weights}: weights do not match the architecture in {CONFIG} ({' '.join(first[:2])[:300]})") from None
    extras = {k[6:]: v.float() if v.is_floating_point() else v for k, v in tensors.items() if k.startswith("extra.")}
    flow.eval().to(device)
    for p in flow.parameters():
        p.requires_grad_(False)
    return LoadedModel(flow=flow, config=cfg, extras=extras, path=folder)


def model_landmarks(folder, read: tuple | None = None) -> tuple:
    """(standard landmarks, percentiles) of a model folder's intensity standardisation, or
    ``(None, None)`` where the model has none (trained before standardisation existed). ``read``:
    the folder's ``read_folder`` already, so that a caller wanting several extras reads and hashes
    the weights once."""
    from bidsharmony.image.standardise import LANDMARKS

    cfg, tensors = read or read_folder(folder)
    entry = (cfg.get("preprocessing") or {}).get("standardisation")
    landmarks = tensors.get(f"extra.{LANDMARKS}")
    if not entry or landmarks is None:
        return None, None
    percentiles = [float(p) for p in entry.get("percentiles", [])]
    if landmarks.ndim != 1 or landmarks.numel() != len(percentiles) + 1:
        raise ModelError(f"{Path(folder) / WEIGHTS}: extra.{LANDMARKS} holds {landmarks.numel()} landmarks for "
                         f"{len(percentiles)} percentiles in {CONFIG}")
    return landmarks.double().numpy(), percentiles


def model_class_landmarks(folder, read: tuple | None = None):
    """The class pass's target landmarks of a model folder (``image.standardise.class_landmarks``), or None
    where the model has none (fitted before the class pass existed). ``read``: as ``model_landmarks``."""
    from bidsharmony.image.standardise import CLASS_LANDMARKS, CLASS_POINTS

    found = (read or read_folder(folder))[1].get(f"extra.{CLASS_LANDMARKS}")
    if found is None:
        return None
    size = 1 + sum(len(q) for q in CLASS_POINTS)
    if found.ndim != 1 or found.numel() != size:
        raise ModelError(f"{Path(folder) / WEIGHTS}: extra.{CLASS_LANDMARKS} holds {found.numel()} values, not {size}")
    return found.double().numpy()


def model_detail_band(folder, read: tuple | None = None):
    """The (min, mean, max) detail band of a model folder (``bidsharmony.image.detail``), or None
    where the model has none (fitted before detail matching existed). ``read``: as ``model_landmarks``."""
    from bidsharmony.image.detail import BAND

    band = (read or read_folder(folder))[1].get(f"extra.{BAND}")
    if band is None:
        return None
    if band.ndim != 1 or band.numel() != 3:
        raise ModelError(f"{Path(folder) / WEIGHTS}: extra.{BAND} holds {band.numel()} values, not (min, mean, max)")
    return band.double().numpy()


def model_detail_voxel(folder, read: tuple | None = None):
    """The target's acquired voxel size (RAS axes, mm) detail levels are measured at, or None where the
    model has none (fitted before the levels were: then they are measured as they are). ``read``: as
    ``model_landmarks``."""
    from bidsharmony.image.detail import VOXEL

    voxel = (read or read_folder(folder))[1].get(f"extra.{VOXEL}")
    if voxel is None:
        return None
    if voxel.ndim != 1 or voxel.numel() != 3 or not bool((voxel > 0).all()):
        raise ModelError(f"{Path(folder) / WEIGHTS}: extra.{VOXEL} is not three positive voxel sizes")
    return voxel.double().numpy()


def model_denoiser(folder, read: tuple | None = None):
    """The learned denoiser a model folder holds (``bidsharmony.image.denoiser``; its tensors under
    ``denoiser.``, its architecture in ``preprocessing.detail.learned_denoiser``), or None."""
    from bidsharmony.image.denoiser import from_tensors

    cfg, tensors = read or read_folder(folder)
    entry = ((cfg.get("preprocessing") or {}).get("detail") or {}).get("learned_denoiser")
    if not entry:
        return None
    if entry.get("architecture") != "unet3d":
        raise ModelError(f"{Path(folder) / CONFIG}: learned denoiser architecture {entry.get('architecture')!r} is not unet3d")
    return from_tensors(tensors, int(entry.get("channels", 16)), folder)


def model_brainmask(folder, read: tuple | None = None):
    """(network, standard landmarks, class landmarks) of the learned brain mask a model folder holds
    (``bidsharmony.image.brainmask``: tensors under ``brainmask.``, the landmarks measured in it as
    ``extra.brain_landmarks`` and ``extra.brain_class_landmarks``, its entry in
    ``preprocessing.standardisation.brain_mask``), or None where it holds none."""
    from bidsharmony.image import brainmask as bm
    from bidsharmony.image.standardise import CLASS_POINTS

    cfg, tensors = read or read_folder(folder)
    entry = ((cfg.get("preprocessing") or {}).get("standardisation") or {}).get("brain_mask")
    if not entry:
        return None
    if entry.get("architecture") != "unet3d":
        raise ModelError(f"{Path(folder) / CONFIG}: brain mask architecture {entry.get('architecture')!r} is not unet3d")
    percentiles = cfg["preprocessing"]["standardisation"].get("percentiles", [])
    found = []
    for name, size in ((bm.LANDMARKS, len(percentiles) + 1), (bm.CLASS_LANDMARKS, 1 + sum(len(q) for q in CLASS_POINTS))):
        t = tensors.get(f"extra.{name}")
        if t is None or t.ndim != 1 or t.numel() != size:
            raise ModelError(f"{Path(folder) / WEIGHTS}: extra.{name} missing or not {size} values, though {CONFIG} has a brain mask")
        found.append(t.double().numpy())
    return bm.from_tensors(tensors, int(entry.get("channels", 8)), folder), found[0], found[1]


def model_field(folder, read: tuple | None = None):
    """The target's typical field a model folder holds (``bidsharmony.image.field.TypicalField``; its
    tensors ``field_*``, its entry ``preprocessing.field``), or None."""
    from bidsharmony.image.field import EXTRAS, TypicalField

    cfg, tensors = read or read_folder(folder)
    entry = (cfg.get("preprocessing") or {}).get("field")
    if not entry:
        return None
    if entry.get("method") != "n4-typical" or any(f"extra.{k}" not in tensors for k in EXTRAS):
        raise ModelError(f"{Path(folder) / CONFIG}: its field entry (method {entry.get('method')!r}) does not match its weights "
                         f"(needs extra.{', extra.'.join(EXTRAS)})")
    return TypicalField.from_model(tensors, entry)


def has_field(cfg: dict) -> bool:
    """Whether a model's config says it holds the target's typical field (read without the weights)."""
    return bool((cfg.get("preprocessing") or {}).get("field"))


def has_landmarks(cfg: dict) -> bool:
    """Whether a model's config says it standardises intensities (read without the weights)."""
    return bool((cfg.get("preprocessing") or {}).get("standardisation"))


def has_denoiser(cfg: dict) -> bool:
    """Whether a model's config says it holds a learned denoiser (read without the weights)."""
    return bool(((cfg.get("preprocessing") or {}).get("detail") or {}).get("learned_denoiser"))
