"""Seconds per 1.2 mm volume for the harmonization loop, against a plain per-slice loop.

Measured for the `paper` and `fast` presets (randomly initialised flows; speed does not depend on
the weights), 10 iterations of the alternating loop with the default parameters:
- ours: ``harmonize_slices`` (torch, all slices in batches) at several batch sizes;
- plain: the same arithmetic the way the published code runs it, written here from the algorithm:
  one slice at a time (batch 1), the image step in numpy/scipy (scipy.ndimage Sobel and its
  adjoint, numpy cosine-similarity gradient and 30th-percentile non-edge mask), a torch tensor
  made for every flow forward/inverse and converted back to numpy every iteration.
A volume is --slices slices of 144x176: real head slices of the first IXI-HH subject when
../shared/data/ixi-hh exists next to the repository (1.2 mm resampling, bidsharmony's slice cut),
otherwise smooth random images in [0, 1]. Each time is the median of --repeats runs after one
warm-up; slow cases are timed on a subset of the slices and scaled to the volume (column
"timed slices"). The plain loop is checked against ours on its subset, with the same noise: on
smooth synthetic slices they agree to 1 code in 12 bits; on real slices sign(G x) differs where
G x is zero up to rounding (scipy's separable Sobel vs torch's 3x3 convolution), and those
±beta_grad steps make a few pixels drift by more.

    python benchmarks/loop_speed.py                 # paper + fast, batch 1..32, 160 slices
    python benchmarks/loop_speed.py --quick         # fast only, 8 slices: < 2 min on 2 CPU cores
    python benchmarks/loop_speed.py --device cuda --batch-sizes 1,16,64,160 --paper-slices 0

Results: <out>/loop_speed[-quick]-<cpu|cuda>.{json,md}.
"""

from __future__ import annotations

import glob

import common
import numpy as np
import torch
from scipy import ndimage

from bidsharmony.flow.model import PRESETS, build_flow
from bidsharmony.flow.scaling import from_flow, to_flow
from bidsharmony.harmonize.objective import EDGE_QUANTILE, EPS, FOREGROUND
from bidsharmony.harmonize.solvers import HarmonizeParams, _noise, harmonize_slices

DATA = common.REPO.parent / "shared" / "data" / "ixi-hh"
SOBEL_W = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], np.float32)  # d/dW; d/dH is its transpose


def volume_slices(n: int, shape, synthetic: bool) -> tuple[np.ndarray, str]:
    """(n, H, W) float32 slices in [0, 1] and where they came from."""
    files = sorted(glob.glob(str(DATA / "sub-*" / "anat" / "*_T1w.nii*")))
    if files and not synthetic:
        from bidsharmony.image.io import load_t1w
        from bidsharmony.image.resample import canonical, resample_isotropic
        from bidsharmony.image.slices import cut

        img, data = load_t1w(files[0])
        data, affine = canonical(data, img.affine)
        data, _ = resample_isotropic(data, affine, 1.2)
        slices, record = cut(data, shape)
        s = slices[record.harmonize]
        first = max(0, (len(s) - n) // 2)  # centred n slices, repeated if the head has fewer
        idx = (first + np.arange(n)) % len(s)
        return s[idx], f"{files[0].split('/')[-1]} ({len(s)} head slices at 1.2 mm; {n} used)"
    rng = np.random.default_rng(0)
    img = ndimage.gaussian_filter(rng.random((n, *shape), np.float32), sigma=(0, 6, 6))
    yy, xx = np.mgrid[-1 : 1 : shape[0] * 1j, -1 : 1 : shape[1] * 1j]
    head = ((yy / 0.9) ** 2 + (xx / 0.8) ** 2 < 1).astype(np.float32)
    img = img * head
    img -= img.min(axis=(1, 2), keepdims=True)
    img /= img.max(axis=(1, 2), keepdims=True)
    return img.astype(np.float32), f"synthetic smooth random slices ({n})"


# ---- plain loop: numpy/scipy image step, one slice at a time --------------------------------

def sobel_np(x: np.ndarray) -> np.ndarray:
    """G x: (H, W) -> (2, H, W) [d/dW, d/dH], zero padding."""
    return np.stack([ndimage.sobel(x, axis=1, mode="constant"), ndimage.sobel(x, axis=0, mode="constant")])


def sobel_adjoint_np(v: np.ndarray) -> np.ndarray:
    """G^T v: correlation with the 180°-rotated kernels, zero padding."""
    return sum(ndimage.correlate(v[i], k[::-1, ::-1], mode="constant") for i, k in enumerate([SOBEL_W, SOBEL_W.T]))


def non_edge_mask_np(s: np.ndarray) -> np.ndarray:
    g = np.abs(sobel_np(s))
    thr = np.percentile(g.reshape(2, -1), EDGE_QUANTILE * 100, axis=1)[:, None, None]
    return (g < thr) & (s > FOREGROUND)


def cosine_grad_np(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    nx, ns = max(np.linalg.norm(x), EPS), max(np.linalg.norm(s), EPS)
    sim = float((x * s).sum()) / (nx * ns)
    return s / (nx * ns) - sim * x / nx**2


@torch.no_grad()
def plain_loop(flow, src: np.ndarray, noise: np.ndarray, p: HarmonizeParams, device) -> np.ndarray:
    """src (N, H, W) in [0, 1]; noise (iterations, N, H, W) dequantisation noise."""
    out = np.empty_like(src)
    for k, s in enumerate(src):
        x, mask = s.copy(), non_edge_mask_np(s)
        for it in range(p.iterations):
            g_l1 = sobel_adjoint_np(mask * np.sign(sobel_np(x)))
            x_t = (x - (p.beta_fidelity * -cosine_grad_np(x, s) + p.beta_gradient * g_l1)).astype(np.float32)
            xin = torch.from_numpy(x_t)[None, None].to(device)
            z, _ = flow(to_flow(xin, torch.from_numpy(noise[it, k])[None, None].to(device)))
            y = flow.inverse((1.0 - p.alpha) * z).cpu().numpy()[0, 0]
            bad = not np.isfinite(y).all() or not (y + 0.5).any() or (np.abs(y + 0.5) > 100).any()
            x = np.clip(x_t, 0.0, 1.0) if bad else from_flow(torch.from_numpy(y)).numpy()
        out[k] = x
    return out


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--presets", default=None, help="comma-separated (default paper,fast; --quick: fast)")
    p.add_argument("--slices", type=int, default=None, help="slices per volume (default 160; --quick: 8)")
    p.add_argument("--batch-sizes", type=common.int_list, default=None, help="default 1,4,8,16,32 (CUDA 1,16,64,160; --quick 1,4)")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--plain-slices", type=int, default=None, help="slices timed for the plain loop (default 16; --quick 2)")
    p.add_argument("--paper-slices", type=int, default=None,
                   help="slices timed for `paper` (at least one batch; 0 = all); default 16 on CPU, all on CUDA")
    p.add_argument("--synthetic", action="store_true", help="use synthetic slices even if real data exists")
    args = p.parse_args()
    device = common.setup(args)
    cuda = device.type == "cuda"
    q = args.quick
    presets = (args.presets or ("fast" if q else "paper,fast")).split(",")
    n = args.slices or (8 if q else 160)
    batches = args.batch_sizes or ([1, 4] if q else [1, 16, 64, 160] if cuda else [1, 4, 8, 16, 32])
    n_plain = min(n, args.plain_slices or (2 if q else 16))
    paper_limit = args.paper_slices if args.paper_slices is not None else (0 if cuda else 16)
    repeats = args.repeats or (1 if q else 3)
    shape = PRESETS[presets[0]].slice_shape
    params = HarmonizeParams(iterations=args.iterations)
    src, source_desc = volume_slices(n, shape, args.synthetic)
    src_t = torch.from_numpy(src)

    rows, checks = [], {}
    for preset in presets:
        flow = build_flow(preset).to(device)
        flow.train()
        with torch.no_grad():  # ActNorm initialisation from a few slices
            flow(to_flow(src_t[:8, None].to(device)))
        flow.eval()

        # plain loop on n_plain slices, noise identical to what ours draws for the same slices
        noise = torch.stack([_noise((n_plain, 1, *shape), params.seed, it, device)[:, 0] for it in range(params.iterations)]).cpu().numpy()
        plain_loop(flow, src[:1], noise[:1, :1], HarmonizeParams(iterations=1), device)  # warm-up
        common.reset_peak(device)
        holder = {}
        t, times = common.median_time(lambda: holder.update(out=plain_loop(flow, src[:n_plain], noise, params, device)),
                                      repeats, device, warmup=False)
        rows.append(dict(preset=preset, loop="plain (numpy/scipy, per slice)", batch=1, timed_slices=n_plain, seconds=t,
                         times=times, s_per_volume=t * n / n_plain, peak_mib=common.peak_mib(device)))
        ours_same = harmonize_slices(flow, src_t[:n_plain], HarmonizeParams(iterations=args.iterations, batch_size=n_plain), device=device)
        diff = np.abs(holder["out"] - ours_same.numpy()) * 4095
        checks[preset] = {"slices": n_plain, "max_abs_diff_codes": float(diff.max()), "mean_abs_diff_codes": float(diff.mean()),
                          "pixels_differing": float((diff > 0.5).mean())}  # see the module docstring

        for b in batches:
            limit = paper_limit if preset == "paper" else 0
            k = n if not limit else min(n, max(limit, b))
            hp = HarmonizeParams(iterations=args.iterations, batch_size=b)
            harmonize_slices(flow, src_t[:b], HarmonizeParams(iterations=1, batch_size=b), device=device)  # warm-up
            common.reset_peak(device)
            t, times = common.median_time(lambda: harmonize_slices(flow, src_t[:k], hp, device=device), repeats, device, warmup=False)
            rows.append(dict(preset=preset, loop="ours (harmonize_slices)", batch=b, timed_slices=k, seconds=t, times=times,
                             s_per_volume=t * n / k, peak_mib=common.peak_mib(device)))
        del flow
        if cuda:
            torch.cuda.empty_cache()

    headers = ["preset", "loop", "batch", "timed slices", "s / volume (median)", "slices/s", "plain / this", common.mem_header(device)]
    out = []
    for r in rows:
        plain = next(x["s_per_volume"] for x in rows if x["preset"] == r["preset"] and x["loop"].startswith("plain"))
        r["slices_per_s"] = n / r["s_per_volume"]
        r["plain_over_this"] = plain / r["s_per_volume"]
        timed = str(r["timed_slices"]) + ("" if r["timed_slices"] == n else "†")
        out.append([r["preset"], r["loop"], r["batch"], timed, r["s_per_volume"], r["slices_per_s"], r["plain_over_this"], r["peak_mib"]])
    md = common.table(headers, out)
    notes = [
        f"Volume: {n} slices of {shape[0]}x{shape[1]}, {source_desc}; {args.iterations} iterations, "
        f"alpha {params.alpha}, beta_fid {params.beta_fidelity}, beta_grad {params.beta_gradient}; median of {repeats} run(s) after one warm-up.",
        f"† timed on that many slices and scaled linearly to {n} slices per volume.",
        "plain / this: how many times faster this row is than the plain per-slice numpy/scipy loop of the same preset, in this run.",
        "Check, plain vs ours on the plain loop's slices with the same noise (12-bit codes): "
        + "; ".join(f"{k}: max |Δ| {c['max_abs_diff_codes']:.0f}, mean {c['mean_abs_diff_codes']:.3g}, "
                    f"{100 * c['pixels_differing']:.2g}% of pixels differ" for k, c in checks.items())
        + " (rounding: sign(G x) at G x ≈ 0 differs between scipy and torch Sobel; see benchmarks/loop_speed.py).",
    ]
    if not cuda:
        notes.append("¹ " + common.RSS_NOTE)
    common.write_results(args, device, "loop_speed", "Harmonization loop: seconds per volume", md, notes,
                         {"slices": n, "source": source_desc, "params": params.to_dict(), "repeats": repeats,
                          "rows": rows, "check_plain_vs_ours": checks})


if __name__ == "__main__":
    main()
