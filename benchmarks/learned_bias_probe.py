"""Can a field learned from the target's own images undo a scanner's smooth bias field?

``monotone_ceiling.py`` found that no volume-wide intensity map, even one fitted on the truth, gains
more than +0.9 dB on the benchmark's bias scanner: the +2 dB goal there needs a correction that
varies in space. This probe trains, on the target's TRAIN images alone (held-out TRAIN subjects and
all TEST subjects excluded), a small network that predicts a smooth multiplicative field. The input
is a target volume times a random smooth field exp(g) (``simulation.smooth_field``, amplitude drawn
in [1, ``--max-amplitude``], 1 included: the network must leave a target image alone), standardised
as the pipeline does; the reference is the clean volume put through the biased volume's map (the
denoiser probe's recipe: the pair differs by the field alone). IXI-HH's own images carry a field
too, which the reference keeps: the network learns a target image given a more biased one, not a
field-free image (N4, which removes every field, moved images 20 dB away from the target).

The network sees the volume averaged to 8 mm (4³ voxels), where a few dilated convolutions span the
whole head; it outputs a log-field there, upsampled (trilinear) and applied as u = v · exp(ĝ): smooth
by construction, so it cannot invent anatomy. L2 in the head at the native grid. Whole volumes per
step, so a step is cheap on a CPU.

Scored like ``learned_denoise_probe.py``: held-out TRAIN heads under the benchmark's simulated
scanners, volume PSNR in the brain against the truth, gains over the standardised volume. The bias
scanner belongs to the family training draws (other random fields); every other scanner is a family
it never saw, and a correction that is not gated must not cost there.

    python benchmarks/learned_bias_probe.py [--train-subjects 40] [--steps 1500] [--quick]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import common
import nibabel as nb
import numpy as np
import torch
from torch import nn

from benchmarks.quality import run, scores
from bidsharmony.flow.checkpoint import model_landmarks, read_folder
from bidsharmony.image.slices import head_mask
from bidsharmony.image.standardise import grid_landmarks, standardise
from bidsharmony.simulation import simulate, smooth_field, unit

DATA = common.REPO.parent / "shared" / "data" / "ixi-hh"
MODEL = common.REPO / "bidsharmony" / "data" / "models" / "ixi-hh-fast"
SCALE = 100.0
POOL = 4  # 2 mm voxels averaged to 8 mm
SCANNERS = ("bias", "truth", "gamma0p7", "noise", "blur", "contrast")


class FieldNet(nn.Module):
    """Average-pool by ``POOL``; dilated 3³ convolutions (1, 2, 4, 8, 4, 2, 1: a receptive field of
    45 coarse voxels, 360 mm); a 1³ convolution to a log-field, zero at initialisation (the identity)."""

    def __init__(self, c: int = 24):
        super().__init__()
        layers, i = [], 2  # the volume and the head mask
        for d in (1, 2, 4, 8, 4, 2, 1):
            layers += [nn.Conv3d(i, c, 3, padding=d, dilation=d), nn.LeakyReLU(0.1)]
            i = c
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv3d(c, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, head):
        coarse = nn.functional.avg_pool3d(torch.cat([x, head], 1), POOL, ceil_mode=True)
        g = self.out(self.body(coarse))
        g = nn.functional.interpolate(g, scale_factor=POOL, mode="trilinear", align_corners=False)
        return g[..., : x.shape[2], : x.shape[3], : x.shape[4]]


def corrected(net, v: np.ndarray, head: np.ndarray) -> np.ndarray:
    """v · exp(ĝ) in the head; outside it the field is unconstrained by training (the loss is taken
    in the head), so the background is left as it is."""
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(v, np.float32) / SCALE)[None, None]
        m = torch.from_numpy(head.astype(np.float32))[None, None]
        return (v * np.exp(net(x, m)[0, 0].numpy() * head)).astype(np.float32)


def training_pairs(subjects, landmarks, draws, max_amplitude, rng):
    pairs = []
    for sub in subjects:
        path = run.t1w_path(DATA, sub)
        affine = nb.as_closest_canonical(nb.load(str(path))).affine
        v = unit(run.load_canonical(path))
        for _ in range(draws):
            biased = v * smooth_field(v.shape, rng, amplitude=float(rng.uniform(1.0, max_amplitude)))
            at = grid_landmarks(biased, affine)[0]
            # both through the biased volume's map: the pair differs by the field alone
            pairs.append((standardise(biased, landmarks, source_landmarks=at) / SCALE,
                          standardise(v, landmarks, source_landmarks=at) / SCALE, head_mask(biased)))
    return pairs


def clean_volumes(subjects, landmarks):
    """[(clean volume standardised on its own landmarks / SCALE, head)]: fields are drawn afresh each step."""
    out = []
    for sub in subjects:
        path = run.t1w_path(DATA, sub)
        affine = nb.as_closest_canonical(nb.load(str(path))).affine
        v = unit(run.load_canonical(path))
        out.append((standardise(v, landmarks, source_landmarks=grid_landmarks(v, affine)[0]) / SCALE, head_mask(v)))
    return out


def fresh_batch(clean, size, max_amplitude, rng, identity_share: float = 0.0):
    """``size`` volumes, each times a new random field and mirrored left-right with probability ½:
    (biased, clean, head) tensors. The field multiplies the standardised volume (no second map).
    With probability ``identity_share`` a volume gets no field: the network must then answer 0."""
    xs, ys, ms = [], [], []
    for i in rng.integers(len(clean), size=size):
        y, head = clean[i]
        if rng.random() < 0.5:
            y, head = y[::-1], head[::-1]
        if identity_share and rng.random() < identity_share:
            xs.append(y)
        else:
            xs.append(y * smooth_field(y.shape, rng, amplitude=float(rng.uniform(1.0, max_amplitude))))
        ys.append(y)
        ms.append(head)
    return tuple(torch.from_numpy(np.ascontiguousarray(np.stack(a)[:, None], dtype=np.float32)) for a in (xs, ys, ms))


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--train-subjects", type=int, default=40)
    p.add_argument("--draws", type=int, default=3, help="biased copies of each training volume")
    p.add_argument("--max-amplitude", type=float, default=1.6, help="the strongest field drawn (the bias scanner's: 1.4)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=2, help="whole volumes per step")
    p.add_argument("--channels", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-subjects", type=int, default=2, help="held-out TRAIN subjects (the last ones)")
    p.add_argument("--name", default="learned_bias_probe")
    p.add_argument("--fields", choices=("fresh", "fixed"), default="fresh",
                   help="fresh: a new field every step on each clean volume (the default); fixed: --draws fields per volume, "
                        "each through its own standardisation (the first run: the network memorised its 40 subjects)")
    p.add_argument("--identity-share", type=float, default=0.0,
                   help="fresh fields: the share of training volumes given no field at all (the network must leave them alone)")
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
    landmarks, _ = model_landmarks(MODEL, read_folder(MODEL))
    pairs = (training_pairs(fit, landmarks, args.draws, args.max_amplitude, rng) if args.fields == "fixed"
             else clean_volumes(fit, landmarks))
    t_data = time.perf_counter() - t0
    net = FieldNet(args.channels)
    opt = torch.optim.Adam(net.parameters(), args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=max(0.05, 2 / args.steps))
    curve = []
    for step in range(args.steps):
        if args.fields == "fixed":
            picks = [pairs[i] for i in rng.integers(len(pairs), size=args.batch)]
            x, y, m = (torch.from_numpy(np.stack([q[k] for q in picks])[:, None].astype(np.float32)) for k in range(3))
        else:
            x, y, m = fresh_batch(pairs, args.batch, args.max_amplitude, rng, args.identity_share)
        loss = ((x * torch.exp(net(x, m)) - y) ** 2 * m).sum() / m.sum()
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
                  metadata={"arch": "fieldnet", "channels": str(args.channels), "steps": str(args.steps)})
    gains: dict[tuple[str, str], list] = {}
    for sub in held_out:
        truth, mask, tissue = run.load_subject(DATA, sub)
        affine = nb.as_closest_canonical(nb.load(str(run.t1w_path(DATA, sub)))).affine
        for scanner in SCANNERS:
            src = truth if scanner == "truth" else simulate(scanner, truth, tissue, nb.affines.voxel_sizes(affine), run.case_seed(0, sub, scanner))
            at, _ = grid_landmarks(src, affine)
            std = standardise(src, landmarks, source_landmarks=at)

            def psnr(x, truth=truth, mask=mask):
                return min(scores.score_volume(x, truth, mask)["psnr_vol"], 99.0)

            base = psnr(std)
            out = corrected(net, std, head_mask(unit(src)))
            # the corrected volume through the standardisation again: the field moved its landmarks
            restd = standardise(out, landmarks, source_landmarks=grid_landmarks(out, affine)[0])
            row = {"standardised (dB)": base, "field applied": psnr(out) - base, "field, then standardised again": psnr(restd) - base}
            for k, val in row.items():
                gains.setdefault((scanner, k), []).append(val)
            print(sub, scanner, "; ".join(f"{k} {val:+.2f}" for k, val in row.items()), flush=True)
    cols = ["standardised (dB)", "field applied", "field, then standardised again"]
    rows = [[s + (" (family trained on)" if s == "bias" else ""), *[f"{np.mean(gains[(s, c)]):+.2f}" if c != cols[0]
                                                                   else f"{np.mean(gains[(s, c)]):.2f}" for c in cols]] for s in SCANNERS]
    nparams = sum(q.numel() for q in net.parameters())
    recipe = (f"{args.draws} biased copies (smooth fields, amplitude ~ U(1, {args.max_amplitude})); L2 in the head to the clean "
              "volume put through the biased one's standardisation" if args.fields == "fixed" else
              f"a new smooth field each step (amplitude ~ U(1, {args.max_amplitude}); none for a share {args.identity_share:g}) on the standardised clean volume, mirrored "
              "left-right half the time; L2 in the head to the clean volume")
    common.write_results(
        args, "cpu", args.name, "Probe: a smooth field learned from the target's own images, on the bias scanner",
        common.table(["scanner", *cols], rows),
        [(f"Held-out TRAIN subjects: {', '.join(held_out)}; gains in volume PSNR (dB) over the standardised volume, in the brain "
          "(the first column: the standardised volume's own PSNR; 'truth': the target's own image, capped at 99 dB)."),
         (f"Network: dilated 3D convolutions at {2 * POOL} mm ({args.channels} channels), a log-field upsampled and multiplied, "
          f"{nparams} parameters; trained {args.steps} steps × {args.batch} whole volumes on {len(fit)} IXI-HH TRAIN subjects × "
          + recipe + f"; data {t_data:.0f} s, training {t_train:.0f} s; last 100 steps' loss {np.mean(curve[-100:]):.3g}."),
         f"Whole run {time.perf_counter() - t0:.0f} s."],
        {"gains": {f"{s}|{c}": v for (s, c), v in gains.items()}, "curve": curve[::10]})


if __name__ == "__main__":
    main()
