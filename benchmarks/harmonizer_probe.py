"""Stage-2 candidate: a restoration network trained on the target's images alone, under random
scanner distortions, applied after the blind standardisation.

The issue on harmonization that wins asks for a second stage that corrects what a volume-wide
intensity map cannot (bias field, noise, blur, tissue contrast), still blind: trained on the target
scanner's images only. This probe measures the simplest such stage before it is built into the
pipeline (the idea of Beizaee et al.'s harmonizer, "Harmonizing Flows", 2024, here with spatial
distortions too and without their test-time adaptation by the flow):

- training data: IXI-HH TRAIN subjects only. Each volume is distorted on its native grid by a
  random draw of four families (a monotone map, a smooth multiplicative field, Rician noise,
  blur), then both it and the clean volume go the pipeline's way: resampled to the 1.2 mm
  canonical grid and standardised blind onto the shipped model's landmarks;
- the network: a small 2.5D U-Net (three neighbouring axial slices in, the middle slice's
  correction out, residual), trained with an L1 loss in the head on random crops;
- applied as the pipeline would apply it: on the standardised 1.2 mm volume, the change resampled
  back onto the native grid and added to the standardised native voxels;
- scored with the quality benchmark's functions on its simulated scanners (made from TEST subjects
  exactly as the benchmark makes them), beside the standardisation alone and the peers.

The benchmark's tissue-contrast scanner belongs to a family that training never draws: its row is
the "unseen distortion". The other scanners' families are drawn in training, with other and random
strengths: a win there may be fitting the simulator, and the tables say so.

    python benchmarks/harmonizer_probe.py [--train-subjects 24] [--steps 2000] [--subjects 4] [--quick]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import common
import nibabel as nb
import numpy as np
import torch
from scipy import ndimage
from torch import nn

from benchmarks.quality import run, scores
from benchmarks.quality.peers import make_peers
from bidsharmony.flow.checkpoint import model_landmarks
from bidsharmony.image.resample import resample_isotropic, resample_onto
from bidsharmony.image.slices import head_mask
from bidsharmony.image.standardise import SCALE, standardise, volume_landmarks
from bidsharmony.models import default_model
from bidsharmony.simulation import QUICK_SCANNERS, SCANNERS, simulate, smooth_field, unit

DATA = common.REPO.parent / "shared" / "data"
VOXEL = 1.2
CROP = 96
METHODS = ["none", "histmatch", "nyul", "standardise", "standardise + network"]
METRICS = ["psnr_vol", "ssim_vol", "dice", "jump_ratio"]
HEADS = {"psnr_vol": "PSNR vol (dB)", "ssim_vol": "SSIM vol", "dice": "Dice CSF/GM/WM", "jump_ratio": "slice steps ×truth"}
TRAINED_FAMILIES = "monotone (γ 0.6–1.6), smooth field (×1/1.6…×1.6), Rician noise (σ 0–6 %), blur (FWHM 0–5 mm in-plane, 0–7 mm across)"


# -- distortions (training only) ------------------------------------------------------------------
FAMILIES = ("gamma", "field", "fwhm", "noise")


def distort(v: np.ndarray, zooms, rng: np.random.Generator, single: bool = False) -> tuple[np.ndarray, dict]:
    """A random scanner in arbitrary units: each family applied with probability 1/2, or (``single``)
    exactly one family, drawn uniformly."""
    u, drawn = unit(v), {}
    pick = FAMILIES[int(rng.integers(len(FAMILIES)))] if single else None

    def draw(family):
        return family == pick if single else rng.random() < 0.5

    if draw("gamma"):
        drawn["gamma"] = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
        u = u ** drawn["gamma"]
    if draw("field"):
        drawn["field"] = float(rng.uniform(1.05, 1.6))
        u = u * smooth_field(u.shape, rng, amplitude=drawn["field"], control=int(rng.integers(3, 6)))
    if draw("fwhm"):
        drawn["fwhm"] = [float(rng.uniform(0, 5)), float(rng.uniform(0, 7))]
        fw = (drawn["fwhm"][0], drawn["fwhm"][0], drawn["fwhm"][1])
        u = ndimage.gaussian_filter(u, [f / 2.3548 / z for f, z in zip(fw, zooms)])
    if draw("noise"):
        drawn["noise"] = float(rng.uniform(0, 0.06))
        s = drawn["noise"] * float(np.percentile(u[head_mask(u)], 99))
        n1, n2 = (s * rng.standard_normal(u.shape, dtype=np.float32) for _ in range(2))
        u = np.sqrt((u + n1) ** 2 + n2**2)
    return (float(rng.uniform(500, 3000)) * unit(u)).astype(np.float32), drawn


def to_pipeline(v: np.ndarray, affine: np.ndarray, standard: np.ndarray):
    """What the pipeline makes of a native volume: (standardised 1.2 mm volume, its affine, the
    standardised native volume)."""
    v12, a12 = resample_isotropic(v, affine, VOXEL)
    marks = volume_landmarks(v12)
    return standardise(v12, standard, source_landmarks=marks), a12, standardise(v, standard, source_landmarks=marks)


# -- the network -----------------------------------------------------------------------------------
def block(i, o):
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU(), nn.Conv2d(o, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU())


class Restorer(nn.Module):
    """2.5D U-Net: (B, 3, H, W) neighbouring slices on the standard scale / SCALE -> the middle
    slice's correction. H and W divisible by 4."""

    def __init__(self, base: int = 24):
        super().__init__()
        self.e1, self.e2, self.e3 = block(3, base), block(base, 2 * base), block(2 * base, 4 * base)
        self.u2, self.d2 = nn.ConvTranspose2d(4 * base, 2 * base, 2, stride=2), block(4 * base, 2 * base)
        self.u1, self.d1 = nn.ConvTranspose2d(2 * base, base, 2, stride=2), block(2 * base, base)
        self.out = nn.Conv2d(base, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)  # starts as the identity

    def forward(self, x):
        e1 = self.e1(x)
        e2 = self.e2(nn.functional.avg_pool2d(e1, 2))
        e3 = self.e3(nn.functional.avg_pool2d(e2, 2))
        d2 = self.d2(torch.cat([self.u2(e3), e2], 1))
        d1 = self.d1(torch.cat([self.u1(d2), e1], 1))
        return x[:, 1:2] + self.out(d1)


def stack3(vol: np.ndarray) -> np.ndarray:
    """(X, Y, Z) -> (Z, 3, X, Y): each axial slice with its neighbours (edge slices repeated)."""
    z = np.arange(vol.shape[2])
    idx = np.stack([np.clip(z - 1, 0, z[-1]), z, np.clip(z + 1, 0, z[-1])], 1)
    return np.moveaxis(vol, 2, 0)[idx]


@torch.no_grad()
def restore(net: Restorer, vol12: np.ndarray, batch: int = 16) -> np.ndarray:
    """The network over every axial slice of a standardised 1.2 mm volume (padded to a multiple of 4)."""
    x = stack3(vol12 / SCALE)
    ph, pw = (-x.shape[2]) % 4, (-x.shape[3]) % 4
    x = np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="edge")
    out = np.concatenate([net(torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))).numpy() for i in range(0, len(x), batch)])
    out = out[:, 0, : vol12.shape[0], : vol12.shape[1]]
    return np.moveaxis(out, 0, 2).astype(np.float32) * SCALE


def train(pairs, steps: int, batch: int, seed: int, log_every: int, loss_kind: str = "l1") -> tuple[Restorer, list[float]]:
    """pairs: [(distorted 1.2 mm, clean 1.2 mm, head mask)] standardised. L1 (or L2) in the head,
    random crops of axial slices that hold head."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = Restorer()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    heads = [np.flatnonzero(m.sum((0, 1)) > 500) for _, _, m in pairs]
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        xs, ys, ms = [], [], []
        for _ in range(batch):
            i = int(rng.integers(len(pairs)))
            d, c, m = pairs[i]
            k = int(rng.choice(heads[i]))
            ks = np.clip([k - 1, k, k + 1], 0, d.shape[2] - 1)
            h0 = int(rng.integers(0, max(d.shape[0] - CROP, 0) + 1))
            w0 = int(rng.integers(0, max(d.shape[1] - CROP, 0) + 1))
            sl = (slice(h0, h0 + CROP), slice(w0, w0 + CROP))
            x = np.moveaxis(d[sl[0], sl[1]][..., ks], 2, 0)
            if rng.random() < 0.5:  # left-right flip
                x = x[:, ::-1]
                y, mm = c[sl[0], sl[1], k][::-1], m[sl[0], sl[1], k][::-1]
            else:
                y, mm = c[sl[0], sl[1], k], m[sl[0], sl[1], k]
            xs.append(x)
            ys.append(y[None])
            ms.append(mm[None])
        x = torch.from_numpy(np.ascontiguousarray(np.stack(xs)) / SCALE).float()
        y = torch.from_numpy(np.ascontiguousarray(np.stack(ys)) / SCALE).float()
        m = torch.from_numpy(np.ascontiguousarray(np.stack(ms))).float()
        err = net(x) - y
        loss = ((err.abs() if loss_kind == "l1" else err**2) * m).sum() / m.sum().clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps}: {loss_kind.upper()} {np.mean(losses[-log_every:]):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    net.eval()
    return net, losses


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--data", type=Path, default=DATA / "ixi-hh")
    p.add_argument("--unseen", default=str(DATA / "unseen-scanners"), help="real scanners without truth ('none' to skip)")
    p.add_argument("--train-subjects", type=int, default=None, help="TRAIN subjects for the network (default 24; --quick 2)")
    p.add_argument("--distortions", type=int, default=3, help="random scanners per training subject (plus the clean volume)")
    p.add_argument("--peer-subjects", type=int, default=12, help="TRAIN subjects the peers' fits use")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 2000; --quick 20)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--subjects", type=int, default=None, help="TEST subjects (default 4; --quick 1)")
    p.add_argument("--scanners", help=f"comma-separated (default: all; --quick: {','.join(QUICK_SCANNERS)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", choices=("l1", "l2"), default="l1", help="training loss in the head")
    p.add_argument("--single-family", action="store_true", help="each training distortion is one family, not a random mix")
    p.add_argument("--name", default="harmonizer_probe", help="stem of the result files")
    args = p.parse_args()
    device = common.setup(args)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_start = time.perf_counter()
    args.train_subjects = args.train_subjects or (2 if args.quick else 24)
    args.steps = args.steps or (20 if args.quick else 2000)
    args.subjects = args.subjects or (1 if args.quick else 4)
    if args.quick:
        args.unseen, args.peer_subjects = "none", 2
    scanners = args.scanners.split(",") if args.scanners else list(QUICK_SCANNERS if args.quick else SCANNERS)
    splits = json.loads((args.data / "splits.json").read_text())
    # TRAIN only; the shipped model's landmarks were fit on its own TRAIN subjects.
    train_subjects, test = splits["train"][: args.train_subjects], splits["test"][: args.subjects]
    standard, _ = model_landmarks(default_model())
    standard = np.asarray(standard, np.float64)

    # -- training pairs ---------------------------------------------------------------------------
    pairs, drawn, t0 = [], [], time.perf_counter()
    for i, sub in enumerate(train_subjects):
        path = run.t1w_path(args.data, sub)
        img = nb.as_closest_canonical(nb.load(str(path)))
        v, affine, zooms = np.asarray(img.dataobj, np.float32), img.affine, img.header.get_zooms()[:3]
        clean12, _, _ = to_pipeline(v, affine, standard)
        mask = head_mask(clean12)
        rng = np.random.default_rng(run.case_seed(args.seed, "harmonizer-train", sub))
        pairs.append((clean12, clean12, mask))  # the target's own images stay as they are
        for _ in range(args.distortions):
            d, what = distort(v, zooms, rng, single=args.single_family)
            pairs.append((to_pipeline(d, affine, standard)[0], clean12, mask))
            drawn.append(what)
        print(f"training data {i + 1}/{len(train_subjects)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    data_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    net, losses = train(pairs, args.steps, args.batch, args.seed, log_every=max(args.steps // 20, 1), loss_kind=args.loss)
    train_seconds = time.perf_counter() - t0
    del pairs
    n_params = sum(p.numel() for p in net.parameters())

    # -- peers, fit on TRAIN ------------------------------------------------------------------------
    peer_train = [run.load_subject(args.data, s, tissue=False)[:2] for s in splits["train"][: args.peer_subjects]]
    peers = [pr.fit([v for v, _ in peer_train], [m for _, m in peer_train]) if pr.population else pr
             for pr in make_peers() if pr.name in ("none", "histmatch", "nyul")]
    reference = np.concatenate([scores.brain_sample(v, m, n=5000, seed=i) for i, (v, m) in enumerate(peer_train)])
    target_gm_wm = float(np.mean([scores.gm_wm_ratio(v, m) for v, m in peer_train]))
    del peer_train

    def ours(src, affine):
        std12, a12, std_native = to_pipeline(src, affine, standard)
        t = time.perf_counter()
        change = restore(net, std12) - std12
        seconds = time.perf_counter() - t
        return std_native, std_native + resample_onto(change, a12, src.shape, affine), seconds

    # -- simulated scanners (TEST subjects) ---------------------------------------------------------
    rows, net_seconds = [], []
    for sub in test:
        truth, mask, tissue = run.load_subject(args.data, sub)
        img = nb.as_closest_canonical(nb.load(str(run.t1w_path(args.data, sub))))
        affine, zooms = img.affine, img.header.get_zooms()[:3]
        truth_seg = scores.segment(truth, mask)
        for name in scanners:
            src = simulate(name, truth, tissue, zooms, run.case_seed(args.seed, sub, name))
            outs = {pr.name: pr.apply(src, mask) for pr in peers}
            outs["standardise"], outs["standardise + network"], s = ours(src, affine)
            net_seconds.append(s)
            for method, vol in outs.items():
                rows.append({"subject": sub, "scanner": name, "kind": SCANNERS[name].kind, "method": method,
                             **scores.score_volume(vol, truth, mask, truth_seg),
                             "corr_source": float(np.corrcoef(vol[mask], src[mask])[0, 1])})
            print(f"{sub} {name}: " + ", ".join(f"{r['method']} {r['psnr_vol']:.2f}" for r in rows[-len(outs):]), flush=True)

    # -- unseen real scanners -------------------------------------------------------------------------
    unseen = []
    if args.unseen != "none" and Path(args.unseen).is_dir():
        atlas = splits["train"][0]
        for path in sorted(Path(args.unseen).glob("sub-*/anat/*_T1w.nii.gz")):
            sub = path.name.split("_")[0]
            mask = run.propagated_brain_mask(path, run.t1w_path(args.data, atlas), run.labels_path(args.data, atlas), args.seed)
            source = run.load_canonical(path)
            outs = {pr.name: pr.apply(source, mask) for pr in peers}
            affine = nb.as_closest_canonical(nb.load(str(path))).affine
            outs["standardise"], outs["standardise + network"], _ = ours(source, affine)
            for method, vol in outs.items():
                unseen.append({"subject": sub, "method": method, "histogram_distance": scores.histogram_distance(vol, mask, reference),
                               "gm_wm_ratio": scores.gm_wm_ratio(vol, mask)})
            print(f"unseen {sub}: " + ", ".join(f"{u['method']} {u['histogram_distance']:.4f}" for u in unseen[-len(outs):]), flush=True)

    # -- tables ---------------------------------------------------------------------------------------
    by = {(r["subject"], r["scanner"], r["method"]): r for r in rows}

    def delta(metric, **where):
        d = [r[metric] - by[(r["subject"], r["scanner"], "standardise")][metric] for r in rows
             if r["method"] == "standardise + network" and all(r[k] == w for k, w in where.items())]
        return float(np.mean(d)) if d else None

    out_md = ["## Mean over subjects and scanners", "",
              common.table(["method", *[HEADS[k] for k in METRICS], "corr. with source", "n"],
                           [[m, *[common.mean_by(rows, m, k)[0] for k in METRICS], common.mean_by(rows, m, "corr_source")[0], common.mean_by(rows, m, "psnr_vol")[1]]
                            for m in METHODS])]
    for metric in ("psnr_vol", "dice"):
        body = []
        for name in scanners:
            vals = [common.mean_by(rows, m, metric, scanner=name)[0] for m in METHODS]
            best_peer = max(v for m, v in zip(METHODS, vals) if m in ("none", "histmatch", "nyul"))
            tag = " — unseen distortion" if SCANNERS[name].kind == "contrast" else ""
            body.append([f"{name} ({SCANNERS[name].kind}){tag}", *vals, vals[-1] - best_peer, delta(metric, scanner=name)])
        out_md += ["", f"## {HEADS[metric]} per scanner", "",
                   common.table(["scanner", *METHODS, "network − best peer", "network − standardise"], body)]
    if unseen:
        out_md += ["", "## Unseen real scanners (no truth)", "",
                   common.table(["scan", "method", "histogram distance", "GM/WM ratio", "|ratio − target|"],
                                [[u["subject"], u["method"], u["histogram_distance"], u["gm_wm_ratio"], abs(u["gm_wm_ratio"] - target_gm_wm)]
                                 for u in unseen])]
    notes = [
        f"Network: 2.5D U-Net, {n_params / 1e6:.2f} M parameters, trained {args.steps} steps × {args.batch} crops of {CROP}² on "
        f"{len(train_subjects)} IXI-HH TRAIN subjects (each clean and under {args.distortions} random distortions: {TRAINED_FAMILIES}; "
        f"{'one family per distortion' if args.single_family else 'each family drawn with probability 1/2'}); {args.loss.upper()} in the head; {train_seconds:.0f} s of training, {data_seconds:.0f} s of data. "
        f"Last 100 steps' {args.loss.upper()}: {np.mean(losses[-100:]):.4f} (standard scale / {SCALE:g}).",
        f"Scored: {len(test)} TEST subject(s) ({', '.join(test)}) × {len(scanners)} simulated scanner(s), made as the quality benchmark "
        f"makes them (seed {args.seed}); the benchmark's scores against the truth in the brain. The peers are fit on "
        f"{args.peer_subjects} TRAIN subjects and get the brain mask; the standardisation (the shipped model's landmarks) and the "
        "network get none.",
        "The tissue-contrast scanner is the unseen distortion: training never draws per-tissue gains. Bias, noise, blur and the "
        "monotone maps are families training draws (at other, random strengths): wins there can be fitting the simulator.",
        f"Network time per volume (the 1.2 mm volume, {torch.get_num_threads()} threads): median {np.median(net_seconds):.1f} s.",
        f"Whole run {time.perf_counter() - t_start:.0f} s.",
    ]
    results = {"rows": rows, "unseen": unseen, "train": train_subjects, "test": test, "scanners": scanners, "losses": losses[::10],
               "drawn": drawn, "params": n_params, "train_seconds": train_seconds, "net_seconds": net_seconds, "target_gm_wm": target_gm_wm}
    common.write_results(args, device, args.name, "Probe: a restoration network trained on the target alone, after the standardisation",
                         "\n".join(out_md), notes, results)


if __name__ == "__main__":
    main()
