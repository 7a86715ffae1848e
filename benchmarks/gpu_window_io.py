"""The GPU window's data file: pre-cut training, validation and speed slices in one small file.

Written on a CPU by ``benchmarks/gpu_window_prepare.py`` (which has nibabel and antspyx), read on a GPU
machine by ``benchmarks/gpu_window.py`` (which has neither): this module needs only numpy and the
standard library.

Layout: a numpy ``.npz`` container (stored, not deflated) holding
- ``meta``: UTF-8 JSON (format version, subjects of every set, bit depths, shapes, provenance);
- per set (``train``, ``val``, ``test``, ``start_images``): ``<set>_blob`` (uint8: xz chunks one
  after another), ``<set>_chunks`` (int64 rows of (byte offset, byte length, slices)) and, for
  ``train``/``val``, ``<set>_subject`` (uint16 index into the set's subject list) and
  ``<set>_position_bin`` (uint8);
- ``target_histogram`` (float32).

Codes are integers on a ``bits``-bit grid of the [0, 1] slices (12 bits is the flow's own grid).
Each chunk stores the plane-predictor residual x - left - up + up_left, zigzag-mapped to uint16
and xz-compressed: about 10 % smaller than xz on the codes themselves, and decoded exactly by two
cumulative sums.
"""

from __future__ import annotations

import io
import json
import lzma
import os

import numpy as np

FORMAT = "bidsharmony-gpu-window-data"
VERSION = 1
SETS = ("train", "val", "test", "start_images")


def encode(codes: np.ndarray, preset: int = 6) -> bytes:
    """(N, H, W) integer codes below 2**14 -> xz bytes (lossless)."""
    c = np.asarray(codes).astype(np.int32)
    if c.ndim != 3 or (c.size and (c.min() < 0 or c.max() >= 2**14)):
        raise ValueError("expected (N, H, W) codes in [0, 2**14)")
    r = np.diff(np.diff(c, axis=2, prepend=0), axis=1, prepend=0)
    z = np.where(r >= 0, 2 * r, -2 * r - 1).astype("<u2")
    return lzma.compress(z.tobytes(), preset=preset)


def decode(blob: bytes, shape) -> np.ndarray:
    """The inverse of ``encode``: (N, H, W) uint16 codes."""
    z = np.frombuffer(lzma.decompress(blob), "<u2").reshape(shape).astype(np.int32)
    r = np.where(z & 1, -((z + 1) // 2), z // 2)
    return np.cumsum(np.cumsum(r, axis=1), axis=2).astype(np.uint16)


def to_codes(slices01: np.ndarray, bits: int) -> np.ndarray:
    """[0, 1] slices -> integer codes on a ``bits``-bit grid (12 bits: ``flow.scaling.quantise``)."""
    return np.round(np.clip(slices01, 0.0, 1.0) * (2**bits - 1)).astype(np.uint16)


def to_12bit(codes: np.ndarray, bits: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Codes on a ``bits``-bit grid -> the flow's 12-bit codes. Below 12 bits the value inside its
    coarse bin is drawn uniformly (dithering) when ``rng`` is given: without it the flow would see
    only every 2**(12-bits)-th code and learn a comb."""
    if bits == 12:
        return codes.astype(np.uint16)
    x = codes.astype(np.float32)
    if rng is not None:
        x += rng.random(codes.shape, dtype=np.float32) - 0.5
    return np.round(np.clip(x / (2**bits - 1), 0.0, 1.0) * 4095).astype(np.uint16)


class Writer:
    """Collects sets chunk by chunk (so a caller can stop at a size budget), then writes the file."""

    def __init__(self, meta: dict):
        self.meta = meta  # the caller may still add to it before write()
        self.arrays: dict[str, np.ndarray] = {}
        self._chunks: dict[str, list] = {}

    def add(self, name: str, codes: np.ndarray, subject: np.ndarray | None = None, position_bin: np.ndarray | None = None,
            blob: bytes | None = None) -> int:
        """Appends one chunk of (N, H, W) codes to set ``name``; returns its compressed size."""
        blob = encode(codes) if blob is None else blob
        st = self._chunks.setdefault(name, [[], [], [], []])
        st[0].append(blob)
        st[1].append(len(codes))
        if subject is not None:
            st[2].append(np.asarray(subject, np.uint16))
        if position_bin is not None:
            st[3].append(np.asarray(position_bin, np.uint8))
        self.meta.setdefault("shapes", {})[name] = [int(sum(st[1])), *map(int, codes.shape[1:])]
        return len(blob)

    def nbytes(self) -> int:
        return sum(len(b) for st in self._chunks.values() for b in st[0]) + sum(a.nbytes for a in self.arrays.values())

    def write(self, path) -> None:
        out = dict(self.arrays)
        for name, (blobs, counts, subjects, bins) in self._chunks.items():
            offsets = np.cumsum([0, *map(len, blobs)])[:-1]
            out[f"{name}_blob"] = np.frombuffer(b"".join(blobs), np.uint8)
            out[f"{name}_chunks"] = np.array([[o, len(b), n] for o, b, n in zip(offsets, blobs, counts)], np.int64).reshape(-1, 3)
            if subjects:
                out[f"{name}_subject"] = np.concatenate(subjects)
            if bins:
                out[f"{name}_position_bin"] = np.concatenate(bins)
        meta = {"format": FORMAT, "version": VERSION, **self.meta}
        out["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **out)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)


def read(path) -> tuple[dict, dict]:
    """(meta, arrays): arrays hold ``<set>`` (uint16 codes on the set's grid), ``<set>_subject``,
    ``<set>_position_bin`` and ``target_histogram``, decoded."""
    with np.load(path, allow_pickle=False) as z:
        files = {k: z[k] for k in z.files}
    meta = json.loads(files.pop("meta").tobytes().decode())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a GPU window data file")
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"{path}: data file version {meta['version']} is newer than this script reads ({VERSION})")
    arrays = {}
    for name in SETS:
        if f"{name}_blob" not in files:
            continue
        blob, h, w = files.pop(f"{name}_blob").tobytes(), *meta["shapes"][name][1:]
        parts = [decode(blob[o : o + n], (k, h, w)) for o, n, k in files.pop(f"{name}_chunks")]
        arrays[name] = np.concatenate(parts) if parts else np.zeros((0, h, w), np.uint16)
    arrays.update(files)
    return meta, arrays
