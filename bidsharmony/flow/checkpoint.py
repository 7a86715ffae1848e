"""The model folder: ``model.safetensors`` + ``config.json`` (+ ``MODEL_CARD.md``).

The one definition of the format. Weights are read with safetensors only (no pickle, ever);
``config.json`` records the architecture, the preprocessing the model expects, training facts and
the sha256 of the weights, which loading checks, so a truncated or swapped file is caught by name.
Tensors that the harmonization loop needs from training data (the mean target slice per slice
position, the target intensity histogram) live in the same safetensors file under ``extra.``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from bidsharmony import __version__
from bidsharmony.errors import ModelError

FORMAT = "bidsharmony-flow"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "MODEL_CARD.md"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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


def write_folder(folder, tensors: dict, config: dict) -> Path:
    """Write weights, then the config that names their hash: a reader never sees a config pointing
    at unfinished weights. ``config['format']`` says which model kind the folder holds."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": config["format"]})
    os.replace(tmp, folder / WEIGHTS)
    cfg = {**config, "weights_sha256": sha256_file(folder / WEIGHTS)}
    cfg.setdefault("software_version", __version__)
    tmp = folder / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / CONFIG)
    return folder


def save_model(folder, flow, config: dict, extras: dict | None = None, half: bool = False) -> Path:
    import torch

    tensors = {}
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


def read_config(folder, fmt: str = FORMAT, version: int = FORMAT_VERSION) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: model folder not found")
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise ModelError(f"{cfg_path}: missing (a model folder holds {WEIGHTS} and {CONFIG})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != fmt:
        raise ModelError(f"{cfg_path}: not a bidsharmony {fmt.split('-')[-1]} config (format != {fmt!r})")
    if cfg.get("format_version", 0) > version:
        raise ModelError(f"{cfg_path}: format version {cfg['format_version']} is newer than this bidsharmony reads")
    return cfg


def read_weights(folder, cfg: dict, verify_hash: bool = True) -> dict:
    """The folder's tensors (CPU), after checking them against the config's sha256."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = Path(folder) / WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{weights}: missing")
    if verify_hash and sha256_file(weights) != cfg.get("weights_sha256"):
        raise ModelError(f"{weights}: sha256 does not match {CONFIG} (truncated, corrupted or replaced)")
    try:
        return load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{weights}: not a readable safetensors file ({e})") from None


def load_model(folder, device="cpu", verify_hash: bool = True) -> LoadedModel:
    """Load a model folder for inference (eval mode, float32, on ``device``)."""
    from bidsharmony.flow.model import FlowConfig, SliceFlow

    folder = Path(folder)
    cfg = read_config(folder)
    weights = folder / WEIGHTS
    tensors = read_weights(folder, cfg, verify_hash)
    try:
        flow = SliceFlow(FlowConfig.from_dict(cfg["architecture"]))
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
