"""Choosing the torch device from the --device option."""

from __future__ import annotations

import logging

from bidsharmony.errors import BidsHarmonyError

LOG = logging.getLogger("bidsharmony")


def resolve_device(name: str = "auto") -> str:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a device string that exists on this machine."""
    import torch

    if name == "cpu":
        return "cpu"
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        LOG.warning("no CUDA GPU found: running on the CPU (pass --device cpu to silence this)")
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise BidsHarmonyError(f"--device {name}: no CUDA GPU is available (use --device auto or cpu)")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise BidsHarmonyError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) present")
        return f"cuda:{index}"
    raise BidsHarmonyError(f"--device {name}: expected auto, cpu, cuda or cuda:N")


def device_label(device: str) -> str:
    """The device as a sidecar records it: ``cpu``, or ``cuda:0 (NVIDIA H100 …)``."""
    if not device.startswith("cuda"):
        return device
    import torch

    return f"{device} ({torch.cuda.get_device_name(device)})"
