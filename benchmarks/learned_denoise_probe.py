"""Can a denoiser learned from the target's own images take the noise scanner where classical ones cannot?

``denoise_probe.py`` found that no classical denoiser gains more than +1.0 dB over the standardised
volume on the benchmark's noise scanner, even with an oracle choosing the blend. This probe trains a
small 3D convolutional network on the target's TRAIN images alone (held-out TRAIN subjects and all
TEST subjects excluded), Noise2Noise-style: the input is a target volume with Rician noise of a random
strength added (σ uniform in [0, 8 %] of the head's 99th percentile, 0 included: the network must
leave a clean target image alone), standardised as the pipeline does; the reference is the same
volume, clean, put through the noisy volume's map (so the pair differs by noise alone, and the
network learns to denoise, not to re-standardise). The loss is L2 in the head: outside it the
Rician floor, stretched by the map's lowest segment, dominates. The reference carries the target's
own noise, so the network learns the expectation of a target image given the noisier one: it
removes the added noise, not the target's. The network: the pipeline's small 3D U-Net (``bidsharmony.image.denoiser.build``).

Scored like ``denoise_probe.py``: held-out TRAIN heads under the benchmark's simulated scanners,
volume PSNR in the brain against the truth, gains over the standardised volume; the network applied
in full, through the shipped detail stage's gate and bisection (its direction in place of non-local
means), and at an oracle's best blend. The noise scanner belongs to the family training draws (at
other, random strengths); every other scanner is a family it never saw.

    python benchmarks/learned_denoise_probe.py [--train-subjects 40] [--steps 2500] [--save net.safetensors] [--quick]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import common
import nibabel as nb
import numpy as np
import torch

from benchmarks.quality import run, scores
from bidsharmony.flow.checkpoint import model_detail_band, model_detail_voxel, model_landmarks, read_folder
from bidsharmony.image import detail
from bidsharmony.image.denoiser import SCALE, build
from bidsharmony.image.slices import head_mask
from bidsharmony.image.standardise import grid_landmarks, standardise
from bidsharmony.simulation import rician, simulate, unit

DATA = common.REPO.parent / "shared" / "data" / "ixi-hh"
MODEL = common.REPO / "bidsharmony" / "data" / "models" / "ixi-hh-fast"
SCANNERS = ("noise", "truth", "gamma0p7", "bias", "blur", "contrast")


def residual(net, v: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(v, np.float32) / SCALE)[None, None]
        return v + SCALE * net(x)[0, 0].numpy()


def training_pairs(subjects, landmarks, draws, rng):
    pairs = []
    for sub in subjects:
        path = run.t1w_path(DATA, sub)
        affine = nb.as_closest_canonical(nb.load(str(path))).affine
        v = unit(run.load_canonical(path))
        head = head_mask(v)
        p99 = float(np.percentile(v[head], 99))
        for _ in range(draws):
            noisy = rician(v, rng, rng.uniform(0.0, 0.08) * p99)
            # both through the noisy volume's map: the network learns to denoise, not to re-standardise
            at = grid_landmarks(noisy, affine)[0]
            pairs.append((standardise(noisy, landmarks, source_landmarks=at) / SCALE,
                          standardise(v, landmarks, source_landmarks=at) / SCALE, head))
    return pairs


def batches(pairs, size, patch, rng):
    xs, ys, ms = [], [], []
    for _ in range(size):
        x, y, head = pairs[rng.integers(len(pairs))]
        idx = np.argwhere(head[tuple(slice(0, s - patch) for s in head.shape)])
        c = idx[rng.integers(len(idx))]
        sl = tuple(slice(int(a), int(a) + patch) for a in c)
        xs.append(x[sl])
        ys.append(y[sl])
        ms.append(head[sl])
    return tuple(torch.from_numpy(np.stack(a)[:, None].astype(np.float32)) for a in (xs, ys, ms))


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--train-subjects", type=int, default=40)
    p.add_argument("--draws", type=int, default=3, help="noisy copies of each training volume")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-subjects", type=int, default=2, help="held-out TRAIN subjects (the last ones)")
    p.add_argument("--name", default="learned_denoise_probe")
    p.add_argument("--save", type=Path, default=None, help="write the trained network's weights here (safetensors)")
    args = p.parse_args()
    common.setup(args)
    if args.quick:
        args.train_subjects, args.steps, args.draws = 3, 20, 1
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    train = sorted(json.loads((DATA / "splits.json").read_text())["train"])
    held_out = train[-args.eval_subjects:]
    fit = train[: args.train_subjects]
    assert not set(fit) & set(held_out)
    read = read_folder(MODEL)
    (landmarks, _), band, voxel = model_landmarks(MODEL, read), model_detail_band(MODEL, read), model_detail_voxel(MODEL, read)
    pairs = training_pairs(fit, landmarks, args.draws, rng)
    t_data = time.perf_counter() - t0
    net = build(args.channels)
    opt = torch.optim.Adam(net.parameters(), args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=max(0.05, 2 / args.steps))
    curve = []
    for step in range(args.steps):
        x, y, m = batches(pairs, args.batch, args.patch, rng)
        # in the head only: the background's Rician floor, stretched by the standardisation's lowest
        # segment, would otherwise dominate the loss (and the brain is what is scored)
        loss = ((x + net(x) - y) ** 2 * m).sum() / m.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        curve.append(float(loss.detach()))
        if step % 100 == 0 or step == args.steps - 1:
            base = float(((x - y) ** 2 * m).sum() / m.sum())
            print(f"step {step} loss {np.mean(curve[-100:]):.3g} (this batch untreated {base:.3g}) {time.perf_counter() - t0:.0f}s", flush=True)
    t_train = time.perf_counter() - t0 - t_data
    net.eval()
    if args.save:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.save),
                  metadata={"arch": "unet", "channels": str(args.channels), "steps": str(args.steps)})
    gains: dict[tuple[str, str], list] = {}
    seconds = []
    shipped_denoise = detail.denoise
    for sub in held_out:
        truth, mask, tissue = run.load_subject(DATA, sub)
        affine = nb.as_closest_canonical(nb.load(str(run.t1w_path(DATA, sub)))).affine
        for scanner in SCANNERS:
            src = truth if scanner == "truth" else simulate(scanner, truth, tissue, nb.affines.voxel_sizes(affine), run.case_seed(0, sub, scanner))
            at, grid = grid_landmarks(src, affine)
            std = standardise(src, landmarks, source_landmarks=at)

            def psnr(x, truth=truth, mask=mask):
                return min(scores.score_volume(x, truth, mask)["psnr_vol"], 99.0)

            base = psnr(std)
            t1 = time.perf_counter()
            full = residual(net, std)
            seconds.append(time.perf_counter() - t1)
            blends = {w: psnr(std + w * (full - std)) - base for w in (0.25, 0.5, 0.75, 1.0)}
            best = max(blends, key=blends.get)
            shipped, rec = detail.match_detail(std, affine, band, grid, voxel)
            detail.denoise = lambda v, a: residual(net, v)  # the network in place of non-local means
            try:
                gated, grec = detail.match_detail(std, affine, band, grid, voxel)
            finally:
                detail.denoise = shipped_denoise
            row = {"standardised (dB)": base, "detail stage, non-local means": psnr(shipped) - base, "network, full": blends[1.0],
                   "network through the detail stage": psnr(gated) - base, "network, oracle blend": blends[best]}
            for k, val in row.items():
                gains.setdefault((scanner, k), []).append(val)
            print(sub, scanner, "; ".join(f"{k} {val:+.2f}" for k, val in row.items()), f"(stage {rec['Action']} w={rec['Weight']:.2f}; "
                  f"network stage {grec['Action']} w={grec['Weight']:.2f}; oracle w={best})", flush=True)
    cols = ["standardised (dB)", "detail stage, non-local means", "network, full", "network through the detail stage", "network, oracle blend"]
    rows = [[s + (" (family trained on)" if s == "noise" else ""), *[f"{np.mean(gains[(s, c)]):+.2f}" if c != cols[0]
                                                                    else f"{np.mean(gains[(s, c)]):.2f}" for c in cols]] for s in SCANNERS]
    nparams = sum(q.numel() for q in net.parameters())
    common.write_results(
        args, "cpu", args.name, "Probe: a denoiser learned from the target's own images, on the noise scanner",
        common.table(["scanner", *cols], rows),
        [(f"Held-out TRAIN subjects: {', '.join(held_out)}; gains in volume PSNR (dB) over the standardised volume, in the brain "
         "(the first column: the standardised volume's own PSNR; 'truth': the target's own image, capped at 99 dB)."),
         (f"Network: a 3D U-Net ({args.channels}, {2 * args.channels}, {4 * args.channels} channels), residual, {nparams} parameters; trained {args.steps} "
         f"steps × {args.batch} patches of {args.patch}³ on {len(fit)} IXI-HH TRAIN subjects × {args.draws} noisy copies "
         f"(Rician, σ ~ U(0, 8 %) of the head's 99th percentile); L2 in the head to the clean volume put through the noisy one's standardisation; data {t_data:.0f} s, "
         f"training {t_train:.0f} s; last 100 steps' loss {np.mean(curve[-100:]):.3g}."),
         f"Network time per volume (native 2 mm, {torch.get_num_threads()} threads): median {np.median(seconds):.1f} s.",
         f"Whole run {time.perf_counter() - t0:.0f} s."],
        {"gains": {f"{s}|{c}": v for (s, c), v in gains.items()}, "curve": curve[::10]})


if __name__ == "__main__":
    main()
