"""Harmonize the slices of one volume with a loaded model: picks the start images, runs the solver."""

from __future__ import annotations

import numpy as np

from bidsharmony.harmonize.solvers import HarmonizeParams, Trace, harmonize_slices
from bidsharmony.image.slices import SliceRecord

START_IMAGES = "start_images"  # extra tensor of a model folder: (POSITION_BINS, H, W) mean target slices


def check_grid(model, record: SliceRecord, source: str = "") -> None:
    from bidsharmony.errors import ModelError

    expected = tuple(int(v) for v in model.flow.cfg.slice_shape)
    got = tuple(int(v) for v in record.grid_shape)
    if got != expected:
        raise ModelError(f"{source or 'model'}: trained for {expected} slices, input cut to {got}")


def harmonize_volume(slices: np.ndarray, record: SliceRecord, model, params: HarmonizeParams, device="cpu", trace: Trace | None = None) -> np.ndarray:
    """slices (Z, H, W) in [0, 1] -> harmonized (Z, H, W); slices without head are returned as given."""
    import torch

    out = np.array(slices, dtype=np.float32, copy=True)
    idx = np.flatnonzero(record.harmonize)
    if idx.size == 0:
        return out
    start = None
    if params.start == "mean":
        if START_IMAGES not in model.extras:
            from bidsharmony.errors import ModelError

            raise ModelError(f"{model.path}: has no mean start images; use start 'source'")
        start = model.extras[START_IMAGES][torch.as_tensor(record.position_bin[idx])]
    result = harmonize_slices(model.flow, torch.from_numpy(out[idx]), params, start=start, device=device, trace=trace)
    out[idx] = result.numpy()
    return out
