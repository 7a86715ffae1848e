"""A GPU window in one command: CUDA tests, the loop's speed per preset, then training the `paper` prior.

Made for a GPU machine lent for minutes: torch, numpy, scipy and safetensors only (no nibabel,
pybids, nipype, antspyx; zuko and pytest come as wheels in the data folder), no network, and a
hard stop. Every stage checks the time left before it starts anything, and the script ends before
``--deadline`` seconds after it started. In order:

1. the CUDA tests (``tests/test_cuda.py``, pytest marker ``cuda``; as plain functions if pytest
   cannot be imported), pass/fail per test;
2. the harmonization loop on one real TEST head (pre-cut slices from the data file; speed only):
   every flow preset (`tiny`, `fast`, `paper`, randomly initialised: speed does not depend on the
   weights) and the default method (the shipped default model with the default parameters), in
   float32 and, on CUDA, with bfloat16 conditioners (the splines stay float32, as training's
   ``--amp`` does): seconds per volume, slices per second, peak GPU memory, and FLOPs per volume
   (``torch.utils.flop_counter.FlopCounterMode``) against the card's dense peak. `paper` also runs
   with the whole volume as one batch and with ``cudnn.benchmark``;
3. the rest of the time trains the `--preset` prior (default `paper`) on the data file's training
   slices, warm-started from the newest model folder of that preset among ``--warm-start`` (else
   from scratch), with a cosine schedule over the time left; the best-validation weights are written
   as a model folder with ``flow.checkpoint.save_model`` (half precision when float32 would exceed
   ``--max-model-mb``), loaded back with ``load_model`` and scored again;
4. ``<out>/gpu_window-<card>.{json,md}``: command, machine, versions, every figure.

    # here (CPU): python benchmarks/gpu_window_prepare.py    -> benchmarks/gpu_window_data/ (~32 MiB)
    # GPU machine, carrying benchmarks/gpu_window_data:
    python benchmarks/gpu_window.py --deadline 540 --out $OUT
    # a CPU dry run (the test suite runs one):
    python benchmarks/gpu_window.py --deadline 60 --preset tiny --device cpu --out /tmp/gw
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the deadline counts from here

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(HERE), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
# The GPU machine has none of these: run as a script, this makes sure nothing here needs them, on
# any machine (imported, e.g. by the tests, it leaves them alone).
FORBIDDEN = ("nibabel", "bids", "nipype", "ants")
if __name__ == "__main__":
    for _m in FORBIDDEN:
        sys.modules.setdefault(_m, None)

import gpu_window_io as gwio  # noqa: E402
import numpy as np  # noqa: E402

DATA = HERE / "gpu_window_data" / "gpu_window_data.npz"
MODELS = REPO / "bidsharmony" / "data" / "models"
MIB = 2**20
# Dense (no sparsity) peak TFLOP/s by card: (float32 without tensor cores, TF32 tensor cores, BF16
# tensor cores), from NVIDIA's data sheets. Convolutions in float32 run on TF32 tensor cores under
# torch's default (torch.backends.cudnn.allow_tf32), so float32 rows are compared with TF32.
PEAKS = {
    "H200 NVL": (60.0, 417.5, 835.5),
    "H200": (67.0, 494.7, 989.4),
    "H100 NVL": (60.0, 417.5, 835.5),
    "H100 PCIe": (51.0, 378.0, 756.0),
    "H100": (67.0, 494.7, 989.4),
    "A100": (19.5, 156.0, 312.0),
}


def left(deadline: float) -> float:
    return deadline - (time.monotonic() - T0)


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f} s] {msg}", flush=True)


def use_wheels(folder: Path) -> str | None:
    """Unpacks the wheels in ``folder`` into a temporary site folder appended to sys.path (packages
    the machine has keep priority). Returns the folder, for subprocesses."""
    wheels = sorted(Path(folder).glob("*.whl")) if folder else []
    if not wheels:
        return None
    site = tempfile.mkdtemp(prefix="gpu-window-site-")
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(site)
    sys.path.append(site)
    return site


# ---- 1. CUDA tests --------------------------------------------------------------------------

_PREAMBLE = ("import sys; sys.path.insert(0, {repo!r}); sys.path.insert(0, {here!r}); {append}"
             "[sys.modules.setdefault(m, None) for m in {forbidden!r}]; ")  # fmt: skip


def run_tests(budget: float, site: str | None, out: Path) -> dict:
    """pytest -m cuda on tests/test_cuda.py in a subprocess; plain functions if pytest is missing."""
    pre = _PREAMBLE.format(repo=str(REPO), here=str(HERE), append=f"sys.path.append({site!r}); " if site else "", forbidden=FORBIDDEN)
    xml = out / "cuda-tests.xml"
    args = ["-m", "cuda", "-q", "-rA", "-p", "no:cacheprovider", f"--junitxml={xml}", "tests/test_cuda.py"]
    code = pre + f"import pytest; sys.exit(pytest.main({args!r}))"
    t = time.monotonic()
    have = subprocess.run([sys.executable, "-c", pre + "import pytest"], cwd=REPO, capture_output=True).returncode == 0
    if not have:
        code = pre + "import gpu_window; gpu_window.plain_tests()"
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=max(budget, 1))
    except subprocess.TimeoutExpired as e:
        return {"runner": "pytest" if have else "plain", "status": f"timed out after {budget:.0f} s", "seconds": budget,
                "output_tail": (e.stdout or b"")[-2000:].decode(errors="replace") if isinstance(e.stdout, bytes) else str(e.stdout)[-2000:]}
    res = {"runner": "pytest" if have else "plain", "returncode": r.returncode, "seconds": round(time.monotonic() - t, 1),
           "output_tail": (r.stdout + r.stderr)[-3000:]}
    if have and xml.is_file():
        import xml.etree.ElementTree as ET

        tests = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            kids = {c.tag for c in case}
            outcome = "failed" if kids & {"failure", "error"} else "skipped" if "skipped" in kids else "passed"
            tests[case.get("name")] = outcome
        res["tests"] = tests
    elif not have:
        try:
            res["tests"] = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            res["tests"] = {}
    counts = {}
    for v in res.get("tests", {}).values():
        counts[v] = counts.get(v, 0) + 1
    res["counts"] = counts
    res["status"] = "failed" if counts.get("failed") or r.returncode not in (0, 5) else "passed" if counts.get("passed") else "skipped"
    return res


def plain_tests() -> None:
    """Runs tests/test_cuda.py's test functions without pytest (a stub stands in for it); prints JSON."""
    import importlib.util
    import types

    class Skipped(Exception):
        pass

    class _Mark:
        def __getattr__(self, name):
            def mark(*a, **k):
                return a[0] if len(a) == 1 and callable(a[0]) and not k else (lambda f: f)

            return mark

    stub = types.ModuleType("pytest")
    stub.mark = _Mark()
    stub.skip = lambda reason="": (_ for _ in ()).throw(Skipped(reason))
    sys.modules["pytest"] = stub
    spec = importlib.util.spec_from_file_location("test_cuda", REPO / "tests" / "test_cuda.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = {}
    for name in sorted(n for n in dir(mod) if n.startswith("test_")):
        try:
            if not __import__("torch").cuda.is_available():
                raise Skipped("needs a CUDA GPU")
            getattr(mod, name)()
            out[name] = "passed"
        except Skipped:
            out[name] = "skipped"
        except Exception:  # noqa: BLE001 - a test failure of any kind
            traceback.print_exc()
            out[name] = "failed"
    print(json.dumps(out))


# ---- 2. loop speed --------------------------------------------------------------------------

@contextlib.contextmanager
def conditioners_in(flow, dtype):
    """Runs every coupling's conditioner network under autocast to ``dtype`` (output back in
    float32), as training's ``--amp`` does; splines, 1x1 convolutions and ActNorm stay float32.
    ``None``: leaves the flow as it is."""
    import torch

    from bidsharmony.flow.coupling import Conditioner

    mods = [m for m in flow.modules() if isinstance(m, Conditioner)] if dtype is not None else []
    for m in mods:
        def forward(x, _f=type(m).forward, _m=m):
            with torch.autocast(x.device.type, dtype=dtype):
                y = _f(_m, x)
            return y.float()

        m.forward = forward
    try:
        yield
    finally:
        for m in mods:
            del m.forward


def flops_per_slice_iteration(cfg, params) -> float:
    """FLOPs of one loop iteration on one slice, counted by FlopCounterMode on the two smallest square
    slices the flow takes and extrapolated to the model's grid: convolutions count per output pixel,
    the 1x1 convolutions' weight products per call, so the count is affine in the pixels."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bidsharmony.flow.model import FlowConfig, SliceFlow
    from bidsharmony.harmonize.solvers import HarmonizeParams, harmonize_slices

    p = HarmonizeParams(**{**params.to_dict(), "iterations": 1, "batch_size": 1})
    counts = []
    for side in (2**cfg.levels, 2 ** (cfg.levels + 1)):
        flow = SliceFlow(FlowConfig(**{**cfg.to_dict(), "slice_shape": (side, side)})).eval()
        counter = FlopCounterMode(display=False)
        with counter:
            harmonize_slices(flow, torch.rand(1, side, side), p)
        counts.append((side * side, counter.get_total_flops()))
    (p1, f1), (p2, f2) = counts
    per_pixel = (f2 - f1) / (p2 - p1)  # the per-call part (weight products) is what stays
    h, w = cfg.slice_shape
    return f1 + per_pixel * (h * w - p1)


def card_peaks(device) -> tuple[str, tuple | None]:
    import torch

    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAKS.items():
        if key.lower() in name.lower():
            return name, peaks
    return name, None


def card_slug(name: str) -> str:
    s = name.lower().replace("nvidia", "").strip()
    s = "".join(c if c.isalnum() else "-" for c in s.split(" ")[0] if c) if s else "gpu"
    return s or "gpu"


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed_stage(args, device, data: dict, deadline: float, budget: float, test_bits: int = 12) -> dict:
    import torch

    from bidsharmony.flow.checkpoint import load_model, read_config
    from bidsharmony.flow.model import PRESETS, FlowConfig, build_flow
    from bidsharmony.harmonize.solvers import HarmonizeParams, harmonize_slices
    from bidsharmony.models import BUNDLED, DEFAULT_MODEL

    stage_end = min(left(deadline), budget) + (time.monotonic() - T0)  # absolute, in T0 seconds
    cuda = device.type == "cuda"
    src = torch.from_numpy(data["test"].astype(np.float32) / (2**test_bits - 1))  # the TEST head, speed only
    n = len(src)
    batch = args.loop_batch or (64 if cuda else 8)
    card, peaks = card_peaks(device)
    rows, outputs = [], {}
    rate = 5e12 if cuda else 2e9  # FLOP/s assumed before anything is measured

    default_path = args.default_model or BUNDLED / DEFAULT_MODEL

    def config_of(name):
        if name == "default":
            return FlowConfig.from_dict(read_config(default_path)["architecture"])
        return PRESETS[name]

    def flow_for(name):
        if name == "default":
            m = load_model(default_path, device=device)
            return m.flow, f"{m.name} (default model, trained)"
        # random weights, ActNorm not initialised: the cost of a pass does not depend on the weights
        return build_flow(name).to(device).eval(), f"`{name}` preset, random weights"

    plan = []
    full = cuda or args.all_rows
    for name in ["tiny", "fast", "default", "paper"]:
        for dt in (["fp32", "bf16"] if full else ["fp32"]):
            plan.append((name, dt, batch, False))
    if full:
        plan += [("paper", "bf16", n, False), ("paper", "fp32", batch, True), ("paper", "bf16", batch, True)]
    flops_cache, flows = {}, {}
    for i, (name, dt, b, bench) in enumerate(plan):
        row = {"model": name, "dtype": dt, "batch": min(b, n), "cudnn_benchmark": bench, "slices": n}
        rows.append(row)
        remaining = stage_end - (time.monotonic() - T0)
        share = remaining / max(1, len(plan) - i) * (2 if name == "paper" else 1)  # paper may use more
        try:
            cfg = config_of(name)
            params = HarmonizeParams(iterations=args.iterations, batch_size=min(b, n))
            if cfg not in flops_cache:
                flops_cache[cfg] = flops_per_slice_iteration(cfg, params)
            fpsi = flops_cache[cfg]
            row["gflop_per_volume"] = fpsi * n * args.iterations / 1e9
            wb = min(b, n)
            remaining = stage_end - (time.monotonic() - T0)
            if fpsi * wb / rate > min(share, remaining):
                row["status"] = f"skipped: one warm-up batch predicted at {fpsi * wb / rate:.0f} s, {max(0.0, min(share, remaining)):.0f} s left for it"
                log(f"speed {name} {dt}: {row['status']}")
                continue
            if name not in flows:
                for k in list(flows):  # one flow in memory at a time
                    del flows[k]
                if cuda:
                    torch.cuda.empty_cache()
                flows[name] = flow_for(name)
            flow, desc = flows[name]
            row["what"] = desc
            torch.backends.cudnn.benchmark = bench
            dtype = torch.bfloat16 if dt == "bf16" else None
            with conditioners_in(flow, dtype):
                _sync(device)
                t = time.perf_counter()
                harmonize_slices(flow, src[:wb], HarmonizeParams(iterations=1, batch_size=wb), device=device)
                _sync(device)
                warm = time.perf_counter() - t  # includes first-call overheads: a pessimistic rate
                per_slice_it = warm / wb
                room = min(share, stage_end - (time.monotonic() - T0))
                k = n if per_slice_it * n * args.iterations <= room else max(1, min(n, int(room / (per_slice_it * args.iterations))))
                if per_slice_it * k * args.iterations > room:
                    row["status"] = f"skipped: {per_slice_it * args.iterations:.1f} s per slice predicted, {room:.0f} s left"
                    log(f"speed {name} {dt}: {row['status']}")
                    continue
                times, peak = [], None
                while True:
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(device)
                    _sync(device)
                    t = time.perf_counter()
                    out = harmonize_slices(flow, src[:k], params, device=device)
                    _sync(device)
                    times.append(time.perf_counter() - t)
                    if cuda:
                        peak = torch.cuda.max_memory_allocated(device) / MIB
                    budget_left = stage_end - (time.monotonic() - T0)
                    if len(times) >= 3 or sum(times) > 2.0 or times[-1] * 2 > budget_left:
                        break
            torch.backends.cudnn.benchmark = False
            secs = statistics.median(times) * n / k
            row.update(status="measured", timed_slices=k, runs=len(times), times=[round(x, 4) for x in times], s_per_volume=secs,
                       slices_per_s=n / secs, peak_mib=peak, achieved_tflops=row["gflop_per_volume"] / 1e3 / secs)  # fmt: skip
            if peaks:
                peak_tf = peaks[2] if dt == "bf16" else peaks[1]
                row["bound_s"] = row["gflop_per_volume"] / 1e3 / peak_tf
                row["x_bound"] = secs / row["bound_s"]
                row["peak_tflops_used"] = peak_tf
            key = (name, k)
            if dt == "fp32" and not bench and b == batch:
                outputs[key] = out
            elif key in outputs:  # against float32 on the same slices, same noise
                d = (out - outputs[key]).abs() * 4095
                row["vs_fp32_codes"] = {"mean": float(d.mean()), "max": float(d.max()), "pixels_differing": float((d > 0.5).float().mean())}
            rate = max(row["gflop_per_volume"] * 1e9 / secs, 1.0)
            log(f"speed {name} {dt} batch {row['batch']}{' cudnn.benchmark' if bench else ''}: {secs:.3g} s/volume "
                f"({k}/{n} slices timed), {row['slices_per_s']:.3g} slices/s" + (f", peak {peak:.0f} MiB" if peak else ""))
        except Exception as e:  # noqa: BLE001 - one row's failure must not end the window
            torch.backends.cudnn.benchmark = False
            row["status"] = f"error: {type(e).__name__}: {e}"[:500]
            log(f"speed {name} {dt}: {row['status']}")
    flows.clear()
    if cuda:
        torch.cuda.empty_cache()
    paper = [r for r in rows if r["model"] == "paper" and r.get("status") == "measured"]
    best = min(paper, key=lambda r: r["s_per_volume"]) if paper else None
    return {"card": card, "peaks_tflops_fp32_tf32_bf16": peaks, "volume_slices": n, "iterations": args.iterations, "batch": batch,
            "rows": rows, "paper_best_s_per_volume": best["s_per_volume"] if best else None,
            "paper_goal_3s_met": (best["s_per_volume"] <= 3.0) if best else None}  # fmt: skip


# ---- 3. training ----------------------------------------------------------------------------

def pick_warm_start(paths, preset: str):
    """The newest model folder of ``preset`` among ``paths`` (folders, or folders of folders)."""
    best, when = None, -1.0
    for p in paths or []:
        p = Path(p)
        cands = [p] if (p / "config.json").is_file() else sorted(q for q in p.iterdir() if (q / "config.json").is_file()) if p.is_dir() else []
        for f in cands:
            try:
                cfg = json.loads((f / "config.json").read_text())
            except (OSError, ValueError):
                continue
            if cfg.get("format") != "bidsharmony-flow" or cfg.get("preset") != preset:
                continue
            t = cfg.get("training", {}).get("finished_unix") or (f / "config.json").stat().st_mtime
            if t > when:
                best, when = f, t
    return best


def train_stage(args, device, meta: dict, data: dict, deadline: float, reserve: float, rate: float | None = None) -> dict:
    """``rate``: FLOP/s the loop reached on this device (speed stage), to tell beforehand whether
    even a few steps of this preset fit the time left."""
    import torch

    from bidsharmony import __version__
    from bidsharmony.flow.checkpoint import load_model, save_model
    from bidsharmony.flow.coupling import SplineCoupling
    from bidsharmony.flow.model import build_flow
    from bidsharmony.flow.scaling import LEVELS, bits_per_dim
    from bidsharmony.harmonize.solvers import _is_oom
    from bidsharmony.train.loop import evaluate_bpd

    cuda = device.type == "cuda"
    train_end = T0 + deadline - reserve  # absolute monotonic time
    res: dict = {"preset": args.preset}
    if train_end - time.monotonic() < max(5.0, 0.05 * deadline):
        res["status"] = f"skipped: {max(0.0, train_end - time.monotonic()):.0f} s left"
        return res
    bits = meta["train"]["bits"]
    codes = torch.from_numpy(data["train"].astype(np.int16)).to(device)
    n, h, w = codes.shape
    val_codes = data["val"]
    grid = tuple(meta["preprocessing"]["slice_shape"])
    if set(meta["train"]["subjects"]) & set(meta["split"]["test_subjects"]):
        raise RuntimeError("the data file's training subjects include TEST subjects")

    from bidsharmony.flow.model import PRESETS
    from bidsharmony.harmonize.solvers import HarmonizeParams

    batch = args.train_batch or (64 if cuda else 16)
    # a training step costs about 1.5 loop iterations (forward, backward), the initialisation half of one
    fpsi = flops_per_slice_iteration(PRESETS[args.preset], HarmonizeParams())
    rate = rate or (5e12 if cuda else 2e9)
    step_s = 1.5 * fpsi * batch / rate
    avail = train_end - time.monotonic()
    if 0.5 * fpsi * batch / rate + 3 * step_s > 0.5 * avail:
        res["status"] = f"skipped: a step of `{args.preset}` at batch {batch} is predicted at {step_s:.0f} s here, {avail:.0f} s left"
        return res
    warm = pick_warm_start(args.warm_start, args.preset)
    if warm is not None:
        m = load_model(warm, device=device)
        flow = m.flow
        for p in flow.parameters():
            p.requires_grad_(True)
        prev_cfg = m.config
        res["warm_start"] = {"path": str(warm), "sha256": m.sha256, "validation_bpd_recorded": prev_cfg.get("validation_bpd")}
        log(f"train: warm start from {warm}")
    else:
        torch.manual_seed(args.seed)
        flow = build_flow(args.preset, slice_shape=grid, seed=args.seed).to(device)
        prev_cfg = {}
        res["warm_start"] = None
        log(f"train: `{args.preset}` from scratch")
    windows_before = int(prev_cfg.get("training", {}).get("windows", 0))
    gen = torch.Generator(device=device).manual_seed(args.seed + 1000 * windows_before)  # each window draws anew

    def make_batch(b):
        idx = torch.randint(n, (b,), generator=gen, device=device)
        c = codes[idx].float()[:, None]
        if bits < 12:  # dither inside the coarse bin (gpu_window_io.to_12bit), then 12-bit codes
            c = torch.round(((c + torch.rand(c.shape, generator=gen, device=device) - 0.5) / (2**bits - 1)).clamp(0, 1) * (LEVELS - 1))
        x = (c + torch.rand(c.shape, generator=gen, device=device)) / LEVELS - 0.5
        flip = torch.rand(b, generator=gen, device=device) < 0.5  # left-right, as the train level's --augment
        return torch.where(flip[:, None, None, None], x.flip(2), x)

    flow.train()
    if warm is None:
        with torch.no_grad():  # data-dependent ActNorm initialisation
            flow(make_batch(min(n, batch)))
    if cuda and not args.no_amp:
        for m_ in flow.modules():
            if isinstance(m_, SplineCoupling):
                m_.amp_dtype = torch.bfloat16
    torch.backends.cudnn.benchmark = cuda and not args.no_cudnn_benchmark

    def validate():
        return evaluate_bpd(flow, val_codes, device, batch_size=64)

    # validation slices: all of them, unless one pass would take over 4 % of the time left
    t = time.monotonic()
    evaluate_bpd(flow, val_codes[:2], device, batch_size=64)
    per_slice = (time.monotonic() - t) / len(val_codes[:2])
    n_val = len(val_codes)
    room = 0.04 * (train_end - time.monotonic())
    if per_slice * n_val > room:
        keep = np.unique(np.linspace(0, n_val - 1, max(8, int(room / per_slice))).round().astype(int))
        val_codes = val_codes[keep]
        log(f"train: validating on {len(val_codes)} of {n_val} validation slices (time)")
    res["validation_slices"] = [len(val_codes), n_val]
    t = time.monotonic()
    start_bpd = validate()
    val_cost = time.monotonic() - t  # grows to the slowest validation seen
    n_float = sum(v.numel() for v in flow.state_dict().values() if v.is_floating_point())
    extra_bytes = data["start_images"].size * 4 + data["target_histogram"].nbytes
    half = (n_float * 4 + extra_bytes) / 1e6 > args.max_model_mb  # stored in float16: scored again

    def after():  # seconds the end needs: the last validation, scoring the stored (float16) and the reloaded weights
        return (3 if half else 2) * val_cost
    res["start_validation_bpd"] = start_bpd
    best_bpd, best_state, best_step = start_bpd, ({k: v.detach().clone() for k, v in flow.state_dict().items()} if warm else None), 0
    if warm is None:
        best_bpd = math.inf
    log(f"train: start {start_bpd:.4f} bits/dim on {len(val_codes)} validation slices ({val_cost:.1f} s)")
    opt = torch.optim.Adam(flow.parameters(), lr=args.learning_rate)
    total = train_end - after() - time.monotonic()  # seconds for steps and validations
    if total < 5:
        raise RuntimeError(f"only {total:.0f} s left for training")
    val_every = max(args.val_every_s or total / 8, 3 * val_cost)
    history = {"step": [], "train_bpd": [], "val_step": [0], "val_bpd": [round(start_bpd, 5)], "val_seconds": [0.0]}
    step, seen, bad, step_times = 0, 0, 0, []
    t_loop = time.monotonic()
    next_val = t_loop + val_every
    losses = []
    while True:
        now = time.monotonic()
        frac = (now - t_loop) / total
        if frac >= 1 or now + (step_times[-1] if step_times else 0) * 1.5 + after() > train_end:
            break
        lr = args.learning_rate * (min(1.0, frac / 0.03) if frac < 0.03 else 0.5 * (1 + math.cos(math.pi * (frac - 0.03) / 0.97)))
        for g in opt.param_groups:
            g["lr"] = lr
        ts = time.monotonic()
        try:
            x = make_batch(batch)
            loss = bits_per_dim(flow.log_prob(x), flow.num_dims).mean()
            if not torch.isfinite(loss):
                bad += 1
                opt.zero_grad(set_to_none=True)
                if bad > 50:
                    log("train: 50 non-finite losses; stopping")
                    break
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), args.grad_clip)
            opt.step()
        except RuntimeError as e:
            if not _is_oom(e) or batch == 1:
                raise
            batch //= 2
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.empty_cache()
            log(f"train: out of memory; batch {batch}")
            continue
        step += 1
        seen += batch
        losses.append(loss.detach())
        if step % 25 == 0 or step <= 3:
            _sync(device)
        step_times.append(time.monotonic() - ts)
        if step % 25 == 0:
            history["step"].append(step)
            history["train_bpd"].append(round(float(torch.stack(losses).mean()), 5))
            losses = []
        if time.monotonic() >= next_val and time.monotonic() + val_cost + after() < train_end:
            t = time.monotonic()
            v = validate()
            val_cost = max(val_cost, time.monotonic() - t)
            history["val_step"].append(step)
            history["val_bpd"].append(round(v, 5))
            history["val_seconds"].append(round(time.monotonic() - t_loop, 1))
            log(f"train: step {step} (batch {batch}, lr {lr:.2e}): validation {v:.4f} bits/dim"
                + (f", train {history['train_bpd'][-1]:.4f}" if history["train_bpd"] else ""))
            if v < best_bpd:
                best_bpd, best_step = v, step
                best_state = {k: t_.detach().clone() for k, t_ in flow.state_dict().items()}
            next_val = time.monotonic() + val_every
    _sync(device)
    train_seconds = time.monotonic() - t_loop
    if history["val_step"][-1] != step and step > 0 and time.monotonic() + after() < train_end:
        v = validate()
        history["val_step"].append(step)
        history["val_bpd"].append(round(v, 5))
        history["val_seconds"].append(round(time.monotonic() - t_loop, 1))
        log(f"train: step {step}: validation {v:.4f} bits/dim")
        if v < best_bpd:
            best_bpd, best_step, best_state = v, step, {k: t_.detach().clone() for k, t_ in flow.state_dict().items()}
    torch.backends.cudnn.benchmark = False
    res.update(steps=step, batch=batch, slices_seen=seen, epochs=seen / n, seconds=round(train_seconds, 1),
               slices_per_s=seen / train_seconds if train_seconds else None, non_finite_steps=bad, learning_rate=args.learning_rate,
               amp=cuda and not args.no_amp, cudnn_benchmark=cuda and not args.no_cudnn_benchmark, history=history,
               best_step=best_step, best_validation_bpd_float32=best_bpd)  # fmt: skip
    improved = best_state is not None and (warm is None or best_step > 0)
    res["improved"] = improved
    if not improved:
        log("train: no model folder written: no validated weights better than the start")
        return res

    # the model folder: half precision when float32 would not fit --max-model-mb
    flow.load_state_dict(best_state)
    flow.eval()
    extras = {"start_images": data["start_images"].astype(np.float32) / 4095, "target_histogram": data["target_histogram"]}
    bpd = best_bpd  # float32: the stored weights are the validated ones
    if half and not all(torch.isfinite(v.half()).all() for v in flow.state_dict().values() if v.is_floating_point()):
        half = False  # a weight beyond float16's range: keep float32, over --max-model-mb or not
        log("train: weights overflow float16; stored in float32")
    if half:
        with torch.no_grad():
            for v in flow.state_dict().values():
                if v.is_floating_point():
                    v.copy_(v.half().float())  # the weights as stored, scored as they will load
        bpd = evaluate_bpd(flow, val_codes, device, batch_size=64)
    for m_ in flow.modules():
        if isinstance(m_, SplineCoupling):
            m_.amp_dtype = None
    subjects_now = meta["train"]["subjects"]
    windows = dict(prev_cfg.get("training_data", {}).get("subject_windows", {}))
    for s in subjects_now:
        windows[s] = windows.get(s, 0) + 1
    prev_tr = prev_cfg.get("training", {})
    card = torch.cuda.get_device_name(device) if cuda else "cpu"
    name = args.name or f"{meta['source'].get('tag', 'ixi-hh')}-{args.preset}"
    config = {
        "name": name,
        "preset": args.preset,
        "software_version": __version__,
        "licence": meta.get("licence") or prev_cfg.get("licence"),
        "preprocessing": meta["preprocessing"],
        "training_data": {
            "dataset": meta["source"].get("dataset"),
            "subjects_train": sorted(windows),
            "subjects_validation": meta["split"]["validation_subjects"],
            "subject_windows": windows,
            "slices_train": n,
            "slices_validation": len(val_codes),
            "this_window": {"subjects": subjects_now, "bits": bits, "slice_step": meta["train"]["slice_step"],
                            "data_file_created": meta.get("created")},  # fmt: skip
        },
        "training": {
            "preset": args.preset, "method": "benchmarks/gpu_window.py (a GPU window)", "steps": step, "batch_size": batch,
            "learning_rate": args.learning_rate, "schedule": "3% linear warm-up, cosine to 0 over the window's training time",
            "grad_clip": args.grad_clip, "augment": True, "amp": res["amp"], "seed": args.seed, "best_step": best_step,
            "seconds": round(train_seconds, 1), "device": card, "validation_bpd": round(bpd, 5),
            "warm_start": res["warm_start"], "windows": int(prev_tr.get("windows", 0)) + 1,
            "steps_total": int(prev_tr.get("steps_total", 0)) + step,
            "seconds_total": round(float(prev_tr.get("seconds_total", 0)) + train_seconds, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S %z"), "finished_unix": time.time(),
        },
        "validation_bpd": round(bpd, 5),
        "validation_note": (f"bits/dim on every {meta['val']['slice_step']}th slice of the validation subjects "
                            f"({len(val_codes)} slices" + (f" of {n_val}, for time)" if len(val_codes) < n_val else ")") + (f"; the reference {meta['reference']['name']} scores {meta['reference']['validation_bpd_here']} on "
                            + ("the same slices" if len(val_codes) == n_val else f"all {n_val}") if meta.get("reference") else "")),  # fmt: skip
    }
    folder = save_model(Path(args.out) / name, flow, config, extras=extras, half=half)
    loaded = load_model(folder, device=device)  # the project's loader: hash, architecture, weights
    reloaded = evaluate_bpd(loaded.flow, val_codes, device, batch_size=64) if time.monotonic() + val_cost < T0 + deadline - 1 else None
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    res.update(model_folder=str(folder), model_name=name, storage_dtype="float16" if half else "float32", model_mb=size / 1e6,
               weights_sha256=loaded.sha256, validation_bpd=bpd, reloaded_validation_bpd=reloaded,
               reference=meta.get("reference"))  # fmt: skip
    log(f"train: wrote {folder} ({size / 1e6:.1f} MB, {res['storage_dtype']}): {bpd:.4f} bits/dim (reloaded {fmt(reloaded, 5)})")
    return res


# ---- 4. results -----------------------------------------------------------------------------

def fmt(v, nd=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_results(out: Path, slug: str, results: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"gpu_window-{slug}.json", out / f"gpu_window-{slug}.md"
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp, js)
    m, v = results["machine"], results["versions"]
    lines = [f"# GPU window: {results['card']}", "", f"Command: `{results['command']}`  ", f"Date: {results['date']}  ",
             f"Deadline {results['deadline_s']} s; finished after {fmt(results.get('wall_s'), 4)} s", "",
             f"Machine: {m.get('platform')}; CPU {m.get('cpu')}, {m.get('cpu_count')} cores; device {m.get('device')}"
             + (f" ({m['gpu']})" if m.get("gpu") else "") + (f"; CUDA {results.get('cuda')}, cuDNN {results.get('cudnn')}" if results.get("cuda") else ""),
             "", "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()), ""]  # fmt: skip
    t = results.get("tests") or {}
    lines += ["## 1. CUDA tests", "", f"{t.get('status', 'not run')} ({t.get('runner', '–')}, {fmt(t.get('seconds'))} s): "
              + ", ".join(f"{k} {c}" for k, c in (t.get("counts") or {}).items()), ""]
    for name, outcome in (t.get("tests") or {}).items():
        lines.append(f"- `{name}`: {outcome}")
    s = results.get("speed") or {}
    lines += ["", "## 2. Harmonization loop per volume", ""]
    if s.get("rows"):
        lines += [f"One TEST head ({s['volume_slices']} slices of 144x176), {s['iterations']} iterations, default parameters. "
                  "bf16: the conditioners under bfloat16 autocast, splines in float32. Bound: FLOPs per volume ÷ the card's dense "
                  "peak (TF32 for float32 convolutions, BF16 for bf16), a floor no run can beat.", "",
                  "| model | dtype | batch | options | s / volume | slices/s | peak GPU MiB | TFLOP / volume | bound (s) | × bound | TFLOP/s | vs fp32 (12-bit codes) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in s["rows"]:
            if r.get("status") != "measured":
                lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | | {r.get('status', '')} | | | "
                             f"{fmt((r.get('gflop_per_volume') or 0) / 1e3) if r.get('gflop_per_volume') else '–'} | | | | |")  # fmt: skip
                continue
            opts = ", ".join(o for o in ["cudnn.benchmark" if r["cudnn_benchmark"] else "",
                                         f"{r['timed_slices']} slices timed†" if r["timed_slices"] != r["slices"] else ""] if o)  # fmt: skip
            vs = r.get("vs_fp32_codes")
            vs_text = f"mean {vs['mean']:.2g}, max {vs['max']:.0f}" if vs else "–"
            lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {opts} | {fmt(r['s_per_volume'])} | {fmt(r['slices_per_s'])} | "
                         f"{fmt(r.get('peak_mib'), 4)} | {fmt(r['gflop_per_volume'] / 1e3)} | {fmt(r.get('bound_s'))} | {fmt(r.get('x_bound'))} | "
                         f"{fmt(r['achieved_tflops'])} | {vs_text} |")  # fmt: skip
        goal = {True: "met", False: "not met", None: "not measured"}[s.get("paper_goal_3s_met")]
        whats = {r["model"]: r["what"] for r in s["rows"] if r.get("what")}
        lines += ["", "Models: " + "; ".join(f"{k}: {v}" for k, v in whats.items()) + ".",
                  "vs fp32: the row's volume against the float32 row of the same model, same noise, in 12-bit codes.",
                  "† timed on that many slices and scaled to the volume.",
                  f"`paper`, best row: {fmt(s.get('paper_best_s_per_volume'))} s per volume; goal ≤ 3 s: {goal}.", ""]
    else:
        lines += [f"{s.get('status', 'not run')}", ""]
    tr = results.get("train") or {}
    lines += ["## 3. Training", ""]
    if tr.get("steps") is not None:
        ref = tr.get("reference") or {}
        ws = tr.get("warm_start")
        lines += [f"Preset `{tr['preset']}`, " + (f"warm start from `{ws['path']}`" if ws else "from scratch")
                  + f": {tr['steps']} steps of {tr['batch']} slices in {fmt(tr['seconds'])} s ({fmt(tr.get('slices_per_s'))} slices/s, "
                  f"{fmt(tr['epochs'])} epochs of {results['data']['train']['slices']} slices from {len(results['data']['train']['subjects'])} subjects), "
                  f"bf16 conditioners {tr.get('amp')}.", "",
                  "| | validation bits/dim |", "|---|---|",
                  f"| start | {fmt(tr.get('start_validation_bpd'), 5)} |",
                  f"| best (float32, step {tr.get('best_step')}) | {fmt(tr.get('best_validation_bpd_float32'), 5)} |",
                  f"| model folder as stored ({tr.get('storage_dtype', '–')}) | {fmt(tr.get('validation_bpd'), 5)} |",
                  f"| reloaded with load_model | {fmt(tr.get('reloaded_validation_bpd'), 5)} |",
                  f"| reference: {ref.get('name', '–')} (`{ref.get('preset', '–')}`) | {fmt(ref.get('validation_bpd_here'), 5)} |", "",
                  (f"Model folder: `{tr['model_folder']}` ({fmt(tr.get('model_mb'))} MB, sha256 `{tr.get('weights_sha256', '')[:16]}…`)."
                   if tr.get("model_folder") else "No model folder written: the warm start stayed best."),
                  "", "Validation curve (step: bits/dim): " + ", ".join(f"{a}: {b:.4f}" for a, b in zip(tr["history"]["val_step"], tr["history"]["val_bpd"])), ""]  # fmt: skip
    else:
        lines += [f"{tr.get('status', 'not run')}", ""]
    lines += ["## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    for st in results.get("stages", []):
        lines.append(f"| {st['stage']} | {st['status']} | {fmt(st['seconds'], 4)} |")
    lines.append("")
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, md)
    return js, md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("--deadline", type=float, default=540.0, help="seconds from the start to the end of everything (default 540)")
    p.add_argument("--out", type=Path, default=HERE / "gpu_window_out", help="results and the model folder")
    p.add_argument("--data", type=Path, default=DATA, help="the data file of benchmarks/gpu_window_prepare.py")
    p.add_argument("--wheels", type=Path, default=None, help="folder of wheels to use where packages are missing (default: DATA's folder/wheels)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--preset", default="paper", help="the prior to train (default paper)")
    p.add_argument("--warm-start", nargs="*", type=Path, default=[MODELS],
                   help="model folders, or folders of them; the newest of --preset is the start (default: the bundled models)")
    p.add_argument("--name", default=None, help="the model folder's name (default ixi-hh-<preset>)")
    p.add_argument("--default-model", type=Path, default=None, help="the default method's model (default: the bundled default)")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--loop-batch", type=int, default=None, help="slices per flow pass in the loop (default 64 CUDA, 8 CPU: the CLI's)")
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default 64 CUDA, 16 CPU)")
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--grad-clip", type=float, default=10.0)
    p.add_argument("--val-every-s", type=float, default=None, help="seconds between validations (default: an eighth of the training time)")
    p.add_argument("--max-model-mb", type=float, default=45.0, help="store half precision above this (default 45 MB)")
    p.add_argument("--no-amp", action="store_true", help="train without bfloat16 conditioners on CUDA")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="train without cudnn.benchmark on CUDA")
    p.add_argument("--all-rows", action="store_true", help="the speed rows a GPU gets (bf16, whole-volume batch, cudnn.benchmark) on any device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", "speed", "train"])
    args = p.parse_args(argv)
    deadline = args.deadline

    import torch

    from benchmarks.quality.machine import machine_info, versions

    if args.threads:
        torch.set_num_threads(args.threads)
    site = use_wheels(args.wheels or args.data.parent / "wheels")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    card, _ = card_peaks(device)
    slug = card_slug(card) if device.type == "cuda" else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "command": shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", "benchmarks/gpu_window.py", *argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "deadline_s": deadline,
        "card": card,
        "machine": machine_info(str(device)),
        "versions": versions(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "torch_flags": {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32, "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32},
        "wheels_site": site,
        "stages": [],
    }
    log(f"device {device} ({card}); deadline {deadline:.0f} s; out {args.out}")

    def stage(name, fn):
        t = time.monotonic()
        try:
            value, status = fn(), "done"
        except Exception as e:  # noqa: BLE001 - record and go on: later stages still use the time
            traceback.print_exc()
            value, status = {"status": f"error: {type(e).__name__}: {e}"[:500]}, "error"
        results["stages"].append({"stage": name, "status": status, "seconds": round(time.monotonic() - t, 1)})
        results["wall_s"] = round(time.monotonic() - T0, 1)
        write_results(args.out, slug, results)  # after every stage: a killed run still leaves results
        return value

    if "tests" not in args.skip:
        budget = min(0.2 * deadline, 120.0, left(deadline) - 10)
        log(f"stage 1: CUDA tests ({budget:.0f} s at most)")
        results["tests"] = stage("cuda tests", lambda: run_tests(budget, site, args.out))
        log(f"stage 1: {results['tests'].get('status')} {results['tests'].get('counts', '')}")

    if not args.data.is_file():
        raise SystemExit(f"{args.data}: no data file; run python benchmarks/gpu_window_prepare.py first (on a CPU)")
    meta, data = gwio.read(args.data)
    results["data"] = {"file": str(args.data), "bytes": args.data.stat().st_size, "created": meta.get("created"),
                       "train": meta["train"], "val": meta["val"], "test": meta["test"], "reference": meta.get("reference")}  # fmt: skip
    bad = set(meta["train"]["subjects"]) & set(meta["split"]["test_subjects"])
    if bad or meta["test"]["subject"] in meta["train"]["subjects"]:
        raise SystemExit(f"{args.data}: TEST subjects among the training slices: {sorted(bad)}")
    reserve = min(max(0.06 * deadline, 6.0), 40.0)
    if "speed" not in args.skip:
        budget = min(0.3 * deadline, left(deadline) - reserve - 0.2 * deadline)
        log(f"stage 2: loop speed ({budget:.0f} s at most)")
        results["speed"] = stage("loop speed", lambda: speed_stage(args, device, data, deadline, budget, meta["test"]["bits"]))
    if "train" not in args.skip:
        log(f"stage 3: training `{args.preset}` ({left(deadline) - reserve:.0f} s)")
        rates = [r["achieved_tflops"] * 1e12 for r in (results.get("speed") or {}).get("rows", []) if r.get("status") == "measured"]
        results["train"] = stage("training", lambda: train_stage(args, device, meta, data, deadline, reserve, max(rates, default=None)))
    results["wall_s"] = round(time.monotonic() - T0, 1)
    js, md = write_results(args.out, slug, results)
    log(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
