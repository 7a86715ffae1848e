"""Flow throughput per preset: forward and inverse passes, and training steps, in slices/s.

Measured for each preset (paper, fast, tiny) on one device, with a randomly initialised flow
(ActNorm initialised from one batch; speed does not depend on the weights):
- forward  ``flow(x)`` and inverse ``flow.inverse(z)`` in eval mode under no-grad, at a few batch sizes;
- training: forward + backward + Adam step on the bits/dim loss, at one batch size;
- parameter count.
Each number is the median of --repeats timed runs after one warm-up (time.perf_counter; CUDA is
synchronised). Ratios compare presets and batch sizes within the same run.

    python benchmarks/flow_throughput.py                  # all presets, full sizes
    python benchmarks/flow_throughput.py --quick          # smoke run, < 2 min on 2 CPU cores
    python benchmarks/flow_throughput.py --presets fast,tiny --batch-sizes 1,16 --device cuda

--quick: 2 repeats, batch sizes 1 and 4, training batch 2; `paper` is measured with 1 repeat and at
forward/inverse batch 1 only (a paper training step takes about a second per slice on 2 CPU cores).
Results: <out>/flow_throughput[-quick]-<cpu|cuda>.{json,md}.
"""

from __future__ import annotations

import common
import torch

from bidsharmony.flow.model import PRESETS, build_flow
from bidsharmony.flow.scaling import bits_per_dim, to_flow


def make_flow(preset: str, device, shape) -> torch.nn.Module:
    flow = build_flow(preset).to(device)
    flow.train()
    with torch.no_grad():  # ActNorm data-dependent initialisation
        flow(to_flow(torch.rand(4, 1, *shape, device=device)))
    return flow


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--presets", default="paper,fast,tiny", help="comma-separated, from: " + ", ".join(PRESETS))
    p.add_argument("--batch-sizes", type=common.int_list, default=None, help="forward/inverse batches (default 1,8 on CPU, 1,64 on CUDA)")
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default 8 on CPU, 32 on CUDA)")
    args = p.parse_args()
    device = common.setup(args)
    cuda = device.type == "cuda"
    presets = [s for s in args.presets.split(",") if s]
    batches = args.batch_sizes or ([1, 4] if args.quick else [1, 64] if cuda else [1, 8])
    train_batch = args.train_batch or (2 if args.quick else 32 if cuda else 8)
    repeats = args.repeats or (2 if args.quick else 5)
    shape = PRESETS[presets[0]].slice_shape
    dims = shape[0] * shape[1]

    rows = []  # dicts, one per (preset, pass, batch)
    for preset in presets:
        flow = make_flow(preset, device, shape)
        n_params = sum(q.numel() for q in flow.parameters())
        small = args.quick and preset == "paper"
        reps = 1 if small else repeats
        flow.eval()
        for b in [1] if small else batches:
            x = to_flow(torch.rand(b, 1, *shape, device=device))
            with torch.no_grad():
                z, _ = flow(x)
            for name, fn in [("forward", lambda: flow(x)), ("inverse", lambda: flow.inverse(z))]:
                common.reset_peak(device)
                with torch.no_grad():
                    t, times = common.median_time(fn, reps, device)
                rows.append(dict(preset=preset, params=n_params, pass_=name, batch=b, seconds=t, times=times,
                                 slices_per_s=b / t, peak_mib=common.peak_mib(device)))
        # training step: bits/dim loss, backward, Adam
        b = train_batch
        flow.train()
        opt = torch.optim.Adam(flow.parameters(), lr=1e-4)
        x01 = torch.rand(b, 1, *shape, device=device)

        def step():
            loss = bits_per_dim(flow.log_prob(to_flow(x01, torch.rand_like(x01))), dims).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        common.reset_peak(device)
        t, times = common.median_time(step, reps, device)
        rows.append(dict(preset=preset, params=n_params, pass_="train step", batch=b, seconds=t, times=times,
                         slices_per_s=b / t, peak_mib=common.peak_mib(device)))
        del flow, opt
        if cuda:
            torch.cuda.empty_cache()

    def rate(preset, pass_, batch):
        return next((r["slices_per_s"] for r in rows if (r["preset"], r["pass_"], r["batch"]) == (preset, pass_, batch)), None)

    headers = ["preset", "params", "pass", "batch", "s / batch (median)", "slices/s", "× batch 1", "× paper",
               common.mem_header(device)]
    out = []
    for r in rows:
        one, paper = rate(r["preset"], r["pass_"], 1), rate("paper", r["pass_"], r["batch"])
        r["vs_batch1"] = r["slices_per_s"] / one if one and r["pass_"] != "train step" else None
        r["vs_paper"] = r["slices_per_s"] / paper if paper else None
        out.append([r["preset"], f"{r['params']:,}", r["pass_"], r["batch"], r["seconds"], r["slices_per_s"],
                    r["vs_batch1"], r["vs_paper"], r["peak_mib"]])
    md = common.table(headers, out)
    notes = [
        f"Median of {repeats} timed runs after one warm-up" + (" (paper: 1 run, forward/inverse at batch 1 only, --quick)" if args.quick and "paper" in presets else "") + ".",
        "Forward/inverse: eval mode, no-grad. Train step: forward + backward + Adam on the bits/dim loss (train mode).",
        "× batch 1: throughput relative to batch 1 of the same preset and pass. × paper: relative to `paper` at the same pass and batch.",
    ]
    if not cuda:
        notes.append("¹ " + common.RSS_NOTE)
    results = [{("pass" if k == "pass_" else k): v for k, v in r.items()} for r in rows]
    common.write_results(args, device, "flow_throughput", "Flow throughput", md, notes,
                         {"shape": list(shape), "repeats": repeats, "rows": results})


if __name__ == "__main__":
    main()
