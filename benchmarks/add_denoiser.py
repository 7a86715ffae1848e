"""Add a learned denoiser (trained by benchmarks/learned_denoise_probe.py --save) to a model folder.

The network's tensors go into the folder's weights file under ``denoiser.``, its architecture into
``config.json`` (``preprocessing.detail.learned_denoiser``); the folder is rewritten through the one
model-folder writer (its sha256 changes). Work in progress: for benchmarking the learned denoiser
before the `train` level fits it itself.

    python benchmarks/add_denoiser.py MODEL_FOLDER NET.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import common  # noqa: F401  (the repository on the path)

from bidsharmony.flow.checkpoint import read_folder
from bidsharmony.image.denoiser import PREFIX, from_tensors
from bidsharmony.modelfolder import CARD, DESCRIBED, write_folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("net", type=Path)
    args = p.parse_args()
    from safetensors import safe_open

    with safe_open(str(args.net), "pt") as f:
        meta = f.metadata() or {}
        net = {PREFIX + k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    if meta.get("arch") != "unet":
        raise SystemExit(f"{args.net}: architecture {meta.get('arch')!r}, not the probe's unet")
    channels = int(meta["channels"])
    from_tensors(net, channels, args.net)  # refuses a file whose shapes do not fit the architecture
    cfg, tensors = read_folder(args.model)
    kept = {n: (args.model / n).read_bytes() for n in DESCRIBED if (args.model / n).is_file() and n != CARD}
    cfg = {k: v for k, v in cfg.items() if k != "weights_sha256"}
    cfg["preprocessing"]["detail"]["learned_denoiser"] = {"architecture": "unet3d", "channels": channels,
                                                          "trained_steps": int(meta.get("steps", 0)), "from": args.net.name}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(PREFIX)} | net
    write_folder(args.model, tensors, cfg)
    for name, data in kept.items():
        (args.model / name).write_bytes(data)
    print(f"written {args.model}")


if __name__ == "__main__":
    main()
