"""Machine and version facts that every benchmark result records (timings mean little without)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "numpy", "scipy", "nibabel", "nipype", "pybids", "antspyx", "zuko",
            "scikit-image", "intensity-normalization")


def machine_info(device: str = "cpu") -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if str(device).startswith("cuda") else None,
        "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()],  # other work skews timings
    }


def versions() -> dict:
    import bidsharmony

    out = {"python": platform.python_version(), "bidsharmony": bidsharmony.__version__}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
