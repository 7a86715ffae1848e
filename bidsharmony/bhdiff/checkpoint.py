"""The 3D method's model folders: a ``VelocityUNet`` saved and loaded through the one model-folder
format (``bidsharmony.modelfolder``), the weights' hash checked, nothing unpickled."""

from __future__ import annotations

from pathlib import Path

from bidsharmony.modelfolder import CONFIG, check_shapes, read_folder, write_folder

FORMAT = "bidsharmony-bhdiff"
FORMAT_VERSION = 1


def save_bhdiff_model(folder, unet, meta: dict) -> Path:
    """model.safetensors + config.json, written as every model folder is (``bidsharmony.modelfolder``)."""
    tensors = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    return write_folder(folder, tensors, {**meta, "format": FORMAT, "format_version": FORMAT_VERSION, "architecture": unet.cfg.to_dict()})


def load_bhdiff_model(folder, device="cpu"):
    """(unet, config) from a bhdiff model folder; the weights' hash is checked, nothing unpickled."""
    from bidsharmony.bhdiff.unet import UNetConfig, VelocityUNet, state_shapes
    from bidsharmony.errors import ModelError

    cfg, tensors = read_folder(folder, fmt=FORMAT, version=FORMAT_VERSION)
    try:
        arch = UNetConfig(**{**cfg["architecture"], "mults": tuple(cfg["architecture"]["mults"])})
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{Path(folder) / CONFIG}: invalid architecture ({e})") from None
    check_shapes(tensors, "unet.", state_shapes(arch), folder)
    try:
        unet = VelocityUNet(arch)
        unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")}, strict=True)
    except (KeyError, TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise ModelError(f"{Path(folder) / CONFIG}: weights do not fit its architecture ({str(e)[:200]})") from None
    return unet.to(device).eval(), cfg
