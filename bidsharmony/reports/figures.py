"""The report's figures: mosaics of several cuts per orientation, the before/after flip view
(one SVG holding both mosaics as layers), the difference mosaic, histograms and convergence.

A mosaic is composed here pixel by pixel (no plotting library), so the "before" and "after" layers
of the flip view are the same grid, cut for cut, and only the image changes when the view flips.
The cut labels are SVG text on top of the pictures.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np

from bidsharmony.metrics import HISTOGRAM_BINS

CUTS = 7  # per orientation
ORIENTATIONS = ("sagittal", "coronal", "axial")
_AXIS_NAME = ("x", "y", "z")
_GAP = 4  # pixels between tiles
_ROW_GAP = 10  # between orientations
MOSAIC_WIDTH = 1100  # display pixels of the widest row
# (desc, extension, caption) of each run's figures in sub-X/figures, in the order the report shows them.
RUN_FIGURES = (
    ("beforeafter", "svg",
     "Before and after: hover over the view or click it to flip between the input and the harmonized image"),
    ("difference", "svg", "Difference, after − before, at the same cuts"),
    ("histogram", "png", "Intensity histograms: input, output and the target domain"),
    ("convergence", "png", "The loop's objective terms per iteration"),
)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Atomic: a figure appears whole or not at all."""
    from bidsharmony.outputs import atomic_save

    try:
        atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        _plt().close(fig)


# -- mosaics ------------------------------------------------------------------------------------


@dataclass
class MosaicLayout:
    """Where the cuts of a RAS volume go: crop box (voxels), cut indices per axis, their world
    coordinates (mm), the display pixel size (mm), and each tile's place in the picture."""

    box: tuple  # ((lo, hi) per axis), hi exclusive
    cuts: list  # per axis: voxel indices
    coords: list  # per axis: mm
    pixel_mm: float
    zooms: tuple
    tiles: list = field(default_factory=list)  # (orientation row, x, y, width, height, label)
    width: int = 0
    height: int = 0


def _bounding_box(mask: np.ndarray, margin: int = 3) -> tuple:
    box = []
    for ax in range(3):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))
        if idx.size == 0:
            box.append((0, mask.shape[ax]))
        else:
            box.append((max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[ax])))
    return tuple(box)


def mosaic_layout(reference: np.ndarray, affine: np.ndarray, n: int = CUTS) -> MosaicLayout:
    """Cuts evenly spaced through the head of ``reference`` (a RAS array), ``n`` per orientation,
    leaving out the head's outermost eighths, where a cut holds only scalp."""
    from bidsharmony.image.slices import head_mask

    finite = np.nan_to_num(reference)
    box = _bounding_box(head_mask(finite) if finite.max() > finite.min() else np.ones(finite.shape, bool))
    cuts = []
    for lo, hi in box:
        pos = np.linspace(lo, hi - 1, n + 2)[1:-1] if hi - lo > n + 1 else np.linspace(lo, hi - 1, n)
        cuts.append([int(round(p)) for p in pos])
    zooms = tuple(float(z) for z in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))
    # Display pixels: the widest row of tiles spans about MOSAIC_WIDTH pixels, whatever the voxel
    # size (a coarse scan is interpolated up, a fine one down: the figures stay a few hundred kB).
    ext = [(hi - lo) * z for (lo, hi), z in zip(box, zooms)]
    widest_mm = max(len(cuts[row]) * ext[[a for a in range(3) if a != row][0]] for row in range(3))
    pixel_mm = widest_mm / MOSAIC_WIDTH
    centre = [(lo + hi) // 2 for lo, hi in box]
    coords = []
    for ax in range(3):
        vox = np.array([centre] * len(cuts[ax]), dtype=float)
        vox[:, ax] = cuts[ax]
        world = np.c_[vox, np.ones(len(vox))] @ np.asarray(affine, float).T
        coords.append([float(w[ax]) for w in world])
    layout = MosaicLayout(box=box, cuts=cuts, coords=coords, pixel_mm=pixel_mm, zooms=zooms)
    _place_tiles(layout)
    return layout


def _tile_shape(layout: MosaicLayout, row: int) -> tuple[int, int]:
    """(height, width) in display pixels of a tile of orientation ``row`` (after rot90)."""
    ext = [(hi - lo) * z / layout.pixel_mm for (lo, hi), z in zip(layout.box, layout.zooms)]
    inplane = [a for a in range(3) if a != row]  # (j, k), (i, k), (i, j)
    return max(int(round(ext[inplane[1]])), 1), max(int(round(ext[inplane[0]])), 1)


def _place_tiles(layout: MosaicLayout) -> None:
    rows = []
    for row in range(3):
        h, w = _tile_shape(layout, row)
        rows.append((h, w, len(layout.cuts[row])))
    width = max(n * w + (n - 1) * _GAP for h, w, n in rows)
    y = 0
    for row, (h, w, n) in enumerate(rows):
        x0 = (width - (n * w + (n - 1) * _GAP)) // 2
        for c in range(n):
            label = f"{_AXIS_NAME[row]} = {layout.coords[row][c]:.0f} mm"
            layout.tiles.append((row, x0 + c * (w + _GAP), y, w, h, label))
        y += h + _ROW_GAP
    layout.width, layout.height = width, y - _ROW_GAP


def _cut(vol: np.ndarray, layout: MosaicLayout, row: int, index: int) -> np.ndarray:
    """One cut, cropped to the box, rotated (superior or anterior up, the subject's right on the
    right) and resampled to square display pixels."""
    from scipy.ndimage import zoom

    sl = [slice(lo, hi) for lo, hi in layout.box]
    sl[row] = index
    plane = np.rot90(np.asarray(vol[tuple(sl)], dtype=np.float32))
    h, w = _tile_shape(layout, row)
    if plane.shape != (h, w):
        plane = zoom(plane, (h / plane.shape[0], w / plane.shape[1]), order=1, grid_mode=True, mode="nearest")
        plane = plane[:h, :w]
        if plane.shape != (h, w):
            plane = np.pad(plane, ((0, h - plane.shape[0]), (0, w - plane.shape[1])), mode="edge")
    return plane


def mosaic(vol: np.ndarray, layout: MosaicLayout, background: float = 0.0) -> np.ndarray:
    """The cuts of ``vol`` composed into one float picture (layout.height × layout.width)."""
    out = np.full((layout.height, layout.width), background, dtype=np.float32)
    for (row, x, y, w, h, _), index in zip(layout.tiles, [i for r in range(3) for i in layout.cuts[r]]):
        out[y:y + h, x:x + w] = _cut(vol, layout, row, index)
    return out


def grey(picture: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((np.nan_to_num(picture) - lo) / max(hi - lo, 1e-12), 0, 1) * 255).round().astype(np.uint8)


def diverging(picture: np.ndarray, limit: float) -> np.ndarray:
    """RGB: blue where the harmonized image is darker, red where brighter, white for no change."""
    from matplotlib import colormaps

    rgba = colormaps["RdBu_r"]((np.nan_to_num(picture) / max(limit, 1e-12) + 1) / 2)
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# -- SVG ----------------------------------------------------------------------------------------

# The flip view: the "after" layer is hidden until the pointer is over the view; a click (or Enter,
# or Space) swaps which layer is shown at rest, so each hover and each click flips what is seen.
_FLIP_STYLE = """
svg.flip .layer-after, svg.flip:hover .layer-before, svg.flip.swapped .layer-before { opacity: 0; }
svg.flip:hover .layer-after, svg.flip.swapped .layer-after, svg.flip.swapped:hover .layer-before { opacity: 1; }
svg.flip.swapped:hover .layer-after { opacity: 0; }
svg.flip { cursor: pointer; }
svg.flip:focus:not(:focus-visible) { outline: none; }
text { font: 15px sans-serif; fill: #fff; stroke: #000; stroke-width: 3px; paint-order: stroke; }
text.layer-name { font-size: 18px; font-weight: bold; }
"""

_FLIP_SCRIPT = """
(function () {
  var script = document.currentScript;
  var svg = (script && script.ownerSVGElement) || document.documentElement;
  function flip(e) { svg.classList.toggle('swapped'); if (e) { e.preventDefault(); } }
  svg.addEventListener('click', flip);
  svg.addEventListener('keydown', function (e) { if (e.key === 'Enter' || e.key === ' ') { flip(e); } });
})();
"""


def _svg(layout: MosaicLayout, layers: list[tuple[str, str, bytes]], title: str, flip: bool, legend: str = "") -> str:
    """An SVG with ``layers`` (css class, name shown in the corner, PNG) stacked, and the cut
    labels on top."""
    w, h = layout.width, layout.height
    kind = 'class="flip" tabindex="0"' if flip else 'class="mosaic"'
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'viewBox="0 0 {w} {h}" width="{w}" height="{h}" {kind} role="img">',
        f"<title>{escape(title)}</title>",
        f"<style>{_FLIP_STYLE}</style>",
        f'<rect width="{w}" height="{h}" fill="#000"/>',
    ]
    for css, name, png in layers:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<g class="layer {css}"><image x="0" y="0" width="{w}" height="{h}" '
                     f'href="data:image/png;base64,{data}" xlink:href="data:image/png;base64,{data}"/>'
                     f'<text class="layer-name" x="8" y="{h - 10}">{escape(name)}</text></g>')
    parts.append('<g class="labels">')
    for row, x, y, tw, th, label in layout.tiles:
        parts.append(f'<text x="{x + 4}" y="{y + 17}">{escape(label)}</text>')
    parts.append("</g>")
    if legend:
        parts.append(f'<text x="{w - 8}" y="{h - 10}" text-anchor="end">{escape(legend)}</text>')
    if flip:
        parts.append(f"<script><![CDATA[{_FLIP_SCRIPT}]]></script>")  # CDATA: the script's && is not XML
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _write_text(path: Path, text: str) -> None:
    from bidsharmony.outputs import atomic_write_text

    atomic_write_text(path, text)


def _display_range(before: np.ndarray, after: np.ndarray) -> tuple[float, float, np.ndarray]:
    from bidsharmony.image.slices import head_mask

    mask = head_mask(before)
    if not mask.any():
        mask = np.ones(before.shape, bool)
    lo, hi = np.percentile(np.concatenate([before[mask], after[mask]]), [0.5, 99.5])
    return float(lo), float(hi), mask


def in_output_units(before: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, bool]:
    """The input put in the output's units by the least-squares line a·before + b inside the head,
    where the two are on other scales (a standardised output): a change of units alone is then no
    change in the figures, a change of contrast still is. (input, False) where the units agree."""
    from bidsharmony.image.slices import head_mask

    mask = head_mask(before)
    if not mask.any():
        return before, False
    x, y = before[mask].astype(np.float64), after[mask].astype(np.float64)
    if abs(np.percentile(y, 99) / max(np.percentile(x, 99), 1e-12) - 1) < 0.05:
        return before, False
    a, b = np.polyfit(x, y, 1)
    return (a * before + b).astype(np.float32), True


UNITS_NOTE = " (input linearly rescaled to the output's units)"


def before_after(before: np.ndarray, after: np.ndarray, affine: np.ndarray, path: Path, title: str,
                 n: int = CUTS) -> MosaicLayout:
    """The flip view (SVG): mosaics of ``n`` sagittal, coronal and axial cuts of the input and of
    the harmonized image, on one grey scale (a change of contrast shows as such), as two layers;
    hovering or clicking flips between them."""
    before, after = np.nan_to_num(before), np.nan_to_num(after)
    layout = mosaic_layout(before, affine, n)
    before, rescaled = in_output_units(before, after)
    lo, hi, _ = _display_range(before, after)
    layers = [("layer-before", "before: input" + UNITS_NOTE * rescaled, png_bytes(grey(mosaic(before, layout), lo, hi))),
              ("layer-after", "after: harmonized", png_bytes(grey(mosaic(after, layout), lo, hi)))]
    _write_text(path, _svg(layout, layers, f"{title}: before (input) and after (harmonized); hover or click to flip", flip=True))
    return layout


def difference(before: np.ndarray, after: np.ndarray, affine: np.ndarray, path: Path, title: str, n: int = CUTS) -> None:
    """The same cuts of after − before (SVG): red where harmonization brightened, blue where it
    darkened; the colour limit is the 99.5th percentile of the change inside the head."""
    before, after = np.nan_to_num(before), np.nan_to_num(after)
    layout = mosaic_layout(before, affine, n)
    before, rescaled = in_output_units(before, after)
    _, _, mask = _display_range(before, after)
    diff = after - before
    limit = float(np.percentile(np.abs(diff[mask]), 99.5)) or 1.0
    layers = [("layer-difference", "after − before", png_bytes(diverging(mosaic(diff, layout), limit)))]
    legend = f"red: brighter after, blue: darker; full colour at ±{limit:.3g}" + UNITS_NOTE * rescaled
    _write_text(path, _svg(layout, layers, f"{title}: after − before", flip=False, legend=legend))


# -- plots --------------------------------------------------------------------------------------


def histograms(before: np.ndarray, after: np.ndarray, target: np.ndarray | None, path: Path, title: str) -> None:
    """Densities of the normalised slice intensities the flow sees: input, output, target domain."""
    plt = _plt()
    x = (np.arange(HISTOGRAM_BINS) + 0.5) / HISTOGRAM_BINS
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(x, before, label="input", color="tab:orange")
    ax.plot(x, after, label="harmonized", color="tab:blue")
    if target is not None:
        ax.fill_between(x, target, color="0.6", alpha=0.4, label="target domain (model)")
    ax.set_xlabel("normalised intensity (per-slice min–max)")
    ax.set_ylabel("density")
    ax.legend(frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def convergence(trace: dict, path: Path, title: str) -> None:
    """The loop's objective terms per iteration (means over slices)."""
    plt = _plt()
    keys = [k for k in ("similarity", "gradient_l1", "z_norm") if trace.get(k)]
    labels = {"similarity": "similarity to the input", "gradient_l1": "masked edge term |M G x|₁", "z_norm": "latent norm |z|"}
    if not keys:  # bhdiff: the correlation with the source through the refinement
        keys = [k for k, v in trace.items() if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v)][:3]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(3.3 * max(len(keys), 1), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.plot(range(1, len(trace[k]) + 1), trace[k], marker="o", ms=3)
        ax.set_title(labels.get(k, k.replace("_", " ")), fontsize=9)
        ax.set_xlabel("iteration")
    if not keys:
        axes[0, 0].text(0.5, 0.5, "no trace recorded", ha="center", va="center")
        axes[0, 0].set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
