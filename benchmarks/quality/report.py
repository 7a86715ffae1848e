"""The benchmark's results: a markdown table, the JSON of every score, and two plots."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.quality.machine import machine_info, versions
from benchmarks.quality.peers import make_peers
from benchmarks.quality.plan import ABLATIONS, BHDIFF, METHOD, METRICS
from bidsharmony.simulation import SCANNERS

HIGHER_IS_BETTER = {"psnr_slice": True, "ssim_slice": True, "psnr_vol": True, "ssim_vol": True,
                    "ncc_vol": True, "dice": True, "jump_ratio": None, "profile_rmse": False}
HEADERS = {"psnr_slice": "PSNR slice (dB)", "ssim_slice": "SSIM slice", "psnr_vol": "PSNR vol (dB)",
           "ssim_vol": "SSIM vol", "ncc_vol": "NCC vol", "dice": "Dice CSF/GM/WM", "jump_ratio": "slice steps ×truth",
           "profile_rmse": "slice-profile RMSE", "seconds": "s / volume"}


def _mean(rows, key) -> float:
    vals = [r[key] for r in rows if np.isfinite(r[key])]
    return float(np.mean(vals)) if vals else float("nan")


def _fmt(v, key=None) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if key in ("psnr_slice", "psnr_vol"):
        return f"{v:.2f}"
    if key == "seconds":
        return f"{v:.1f}"
    return f"{v:.3f}"


def _best(values: dict, key) -> set:
    direction = HIGHER_IS_BETTER.get(key)
    finite = {m: v for m, v in values.items() if np.isfinite(v)}
    if not finite:
        return set()
    if direction is None:  # closest to 1
        target = min(abs(v - 1) for v in finite.values())
        return {m for m, v in finite.items() if abs(v - 1) == target}
    best = max(finite.values()) if direction else min(finite.values())
    return {m for m, v in finite.items() if v == best}


def method_table(rows, methods, metrics, labels) -> str:
    by = defaultdict(list)
    for r in rows:
        by[r["method"]].append(r)
    means = {k: {m: _mean(by[m], k) for m in methods if by[m]} for k in metrics}
    lines = ["| method | " + " | ".join(HEADERS[k] for k in metrics) + " | n |", "|---" * (len(metrics) + 2) + "|"]
    for m in methods:
        if not by[m]:
            continue
        cells = [(f"**{_fmt(means[k][m], k)}**" if m in _best(means[k], k) and k != "seconds" else _fmt(means[k][m], k)) for k in metrics]
        lines.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + f" | {len(by[m])} |")
    return "\n".join(lines)


def scanner_table(rows, methods, key, labels) -> str:
    by = defaultdict(list)
    for r in rows:
        by[(r["scanner"], r["method"])].append(r)
    scanners = list(dict.fromkeys(r["scanner"] for r in rows))
    lines = ["| scanner | " + " | ".join(labels.get(m, m) for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for s in scanners:
        vals = {m: _mean(by[(s, m)], key) for m in methods if by[(s, m)]}
        best = _best(vals, key)
        lines.append(f"| {s} ({SCANNERS[s].kind}) | " + " | ".join(
            (f"**{_fmt(vals[m], key)}**" if m in best else _fmt(vals[m], key)) if m in vals else "–" for m in methods) + " |")
    return "\n".join(lines)


BIOLOGY_TOLERANCE = 0.05  # the bound on |Δr|


def biology_section(rows, methods, biology: dict, labels) -> list[str]:
    """Per scanner and method: Pearson r of the grey-matter fraction (k-means) with age over the
    TEST subjects, minus the truth's r. Harmonization that keeps biology leaves r where it was."""
    from benchmarks.quality.scores import correlation

    subjects = [s for s, b in biology.items() if b.get("age") is not None]
    truth_r = correlation([biology[s]["gm_fraction_truth"] for s in subjects], [biology[s]["age"] for s in subjects])
    scanners = list(dict.fromkeys(r["scanner"] for r in rows))
    by = {(r["method"], r["scanner"], r["subject"]): r.get("gm_fraction") for r in rows}
    lines = ["## Biology kept: grey-matter fraction vs age", "",
             (f"Pearson r of the k-means grey-matter fraction of the brain with age over the {len(subjects)} TEST subject(s) with an "
              f"age; the truth's r = {_fmt(truth_r)}. Cells: the output's r − the truth's (|Δr| ≤ {BIOLOGY_TOLERANCE} keeps the "
              "biology; with few subjects r itself is noisy, the difference less so)."), "",
             "| scanner | " + " | ".join(labels.get(m, m) for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for name in scanners:
        cells = []
        for m in methods:
            pairs = [(by.get((m, name, s)), biology[s]["age"]) for s in subjects if by.get((m, name, s)) is not None]
            r = correlation([g for g, _ in pairs], [a for _, a in pairs]) if len(pairs) == len(subjects) else float("nan")
            d = r - truth_r
            cells.append("–" if not np.isfinite(d) else f"{d:+.3f}" + ("" if abs(d) <= BIOLOGY_TOLERANCE else " ✗"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def seen_section(rows, peers, seen: list[str]) -> list[str]:
    """Volume PSNR on the distortion families the model's training drew (``seen``, ``Scanner.kind``)
    and on those it never saw, bidsharmony against the best peer on the same volumes: a method that
    only learned the simulator would win the first row and not the second."""
    groups = {"seen in training": [k for k in seen], "never seen in training": [k for k in dict.fromkeys(
        SCANNERS[r["scanner"]].kind for r in rows) if k not in seen]}
    lines = ["## Distortions seen and never seen in training", "",
             "The model's training drew synthetic distortions of these families: " + (", ".join(seen) or "none") +
             " (the learned denoiser: Rician noise of random strength). Volume PSNR (dB), mean over the scanners of each group:", "",
             "| group | families | scanners | bidsharmony | best peer | bidsharmony − best peer |", "|---|---|---|---|---|---|"]
    for name, kinds in groups.items():
        sel = [r for r in rows if SCANNERS[r["scanner"]].kind in kinds]
        if not sel:
            continue
        ours = _mean([r for r in sel if r["method"] == METHOD], "psnr_vol")
        peer = max(peers, key=lambda m: _mean([r for r in sel if r["method"] == m], "psnr_vol"))
        best = _mean([r for r in sel if r["method"] == peer], "psnr_vol")
        scanners = sorted({r["scanner"] for r in sel})
        lines.append(f"| {name} | {', '.join(kinds)} | {len(scanners)} | {ours:.2f} | {best:.2f} ({peer}) | {ours - best:+.2f} |")
    return [*lines, ""]


def write_report(args, rows, unseen, examples, *, model, target_gm_wm, target_gm_wm_range=None, bhdiff_model=None, walls, seconds_total,
                 train, test, biology=None, seen=()) -> None:
    peers = [p.name for p in make_peers()]
    labels = {METHOD: "**bidsharmony**", BHDIFF: "bidsharmony --method bhdiff (3D)",
              **{k: f"bidsharmony, {v[0]}" for k, v in ABLATIONS.items()}}
    main_methods = [*peers, METHOD]
    main_rows = [r for r in rows if r["method"] in main_methods]
    abl_keys = [k for k in ABLATIONS if any(r["method"] == k for r in rows)]
    abl_cases = {(r["subject"], r["scanner"]) for r in rows if r["method"] in abl_keys}
    abl_rows = [r for r in rows if (r["subject"], r["scanner"]) in abl_cases and r["method"] in ("none", "histmatch", METHOD, *abl_keys)]
    bh_cases = {(r["subject"], r["scanner"]) for r in rows if r["method"] == BHDIFF}
    bh_methods = [*peers, METHOD, BHDIFF]
    bh_rows = [r for r in rows if (r["subject"], r["scanner"]) in bh_cases and r["method"] in bh_methods]
    n_vol = defaultdict(int)
    for r in rows:
        n_vol[r["method"]] += 1

    command = shlex.join(["python", "-m", "benchmarks.quality", *sys.argv[1:]])
    meta = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine_info(),
            "versions": versions(), "model": model, "bhdiff_model": bhdiff_model, "test_subjects": test, "train_subjects_for_peers": len(train),
            "scanners": {s: SCANNERS[s].description for s in args.scanners},
            "cli_wall_seconds": {k: None if v is None else round(v, 1) for k, v in walls.items()},
            "cli_wall_seconds_per_volume": {k: None if v is None else round(v / max(n_vol[k], 1), 1) for k, v in walls.items()},
            "benchmark_seconds": round(seconds_total, 1), "target_gm_wm_ratio": target_gm_wm,
            "target_gm_wm_range": list(target_gm_wm_range) if target_gm_wm_range else None, "distortions_seen_in_training": list(seen)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / args.name
    Path(f"{stem}.json").write_text(json.dumps({**meta, "rows": rows, "unseen": unseen, "biology": biology or {}}, indent=1,
                                               default=float) + "\n")

    m = meta["machine"]
    md = [
        f"# Quality benchmark{' (--quick)' if args.quick else ''}",
        "",
        f"Command: `{command}`  ",
        f"Date: {meta['date']}; whole run {seconds_total / 60:.0f} min  ",
        f"Machine: {m['platform']}; CPU {m['cpu']}, {m['cpu_count']} cores; device {args.device}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "  ",
        f"Model: `{model['Name'] if model else '?'}` ({model['Preset'] if model else '?'}), sha256 `{model['Sha256'] if model else '?'}`  ",
        (f"Data: {len(test)} IXI-HH TEST subject(s) × {len(args.scanners)} simulated scanner(s); peers' population fits on "
        f"{len(train)} TRAIN subject(s). What the columns mean: `docs/benchmarks/README.md`."),
        "",
        "## All simulated scanners (mean over subjects and scanners)",
        "",
        method_table(main_rows, main_methods, [*METRICS, "seconds"], labels),
        "",
        "s / volume: the harmonization itself (bidsharmony: the loop, from the sidecar); the whole CLI run per volume, "
        "with resampling and I/O: " + ", ".join(f"{labels.get(k, k).strip('*')} " + ("reused from an earlier run" if v is None else f"{v} s")
                                           for k, v in meta["cli_wall_seconds_per_volume"].items()) + ".",
        "",
    ]
    for key in ("psnr_vol", "ssim_slice", "dice", "jump_ratio"):
        md += [f"## {HEADERS[key]} per scanner", "", scanner_table(main_rows, main_methods, key, labels), ""]
    md += seen_section(main_rows, peers, list(seen))
    if biology:
        md += biology_section(main_rows, main_methods, biology, labels)
    if abl_keys:
        md += ["## Ablations: the stages and the loop's parameters (same cases for every row)", "",
               f"{len(abl_cases)} case(s): " + ", ".join(sorted(f"{s}/{c}" for s, c in abl_cases)), "",
               method_table(abl_rows, ["none", "histmatch", METHOD, *abl_keys], METRICS, labels), ""]
    if bh_cases:
        md += ["## The 3D method beside the 2D one (same cases for every row)", "",
               f"{len(bh_cases)} case(s): " + ", ".join(sorted(f"{s}/{c}" for s, c in bh_cases)) + "; bhdiff model: "
               + (f"`{bhdiff_model['Name']}` ({bhdiff_model['Preset']}), sha256 `{bhdiff_model['Sha256']}`" if bhdiff_model else "?"), "",
               method_table(bh_rows, bh_methods, [*METRICS, "seconds"], labels), ""]
        for key in ("psnr_vol", "ssim_vol", "jump_ratio"):
            md += [f"{HEADERS[key]} per scanner:", "", scanner_table(bh_rows, bh_methods, key, labels), ""]
    if unseen:
        md += ["## Unseen real scanners (no truth: distribution-level scores)", "",
               (f"Brain masks propagated from an IXI TRAIN subject by ANTs affine registration, one mask per scan for every method of the run (the registration is not repeatable across runs: compare within a run). Target domain: "
               f"GM/WM ratio {target_gm_wm:.3f} (mean over the TRAIN subjects"
               + (f"; their range {target_gm_wm_range[0]:.3f}–{target_gm_wm_range[1]:.3f}, the goal for a harmonized scan"
                  if target_gm_wm_range else "") + "); histogram distance is Wasserstein-1 "
               "to the TRAIN subjects' pooled robust-scaled brain intensities (0 = same distribution)."), "",
               "| scan | method | histogram distance | GM/WM ratio | \\|ratio − target\\| | in the target's range | brain mask (ml) |",
               "|---|---|---|---|---|---|---|"]
        for r in unseen:
            md.append(f"| {r['subject']} | {labels.get(r['method'], r['method'])} | {r['histogram_distance']:.4f} | "
                      f"{r['gm_wm_ratio']:.3f} | {abs(r['gm_wm_ratio'] - target_gm_wm):.3f} | "
                      + ("?" if not target_gm_wm_range else "yes" if target_gm_wm_range[0] <= r["gm_wm_ratio"] <= target_gm_wm_range[1] else "no")
                      + f" | {r['brain_ml']:.0f} |")
        md.append("")
    md += [f"![examples]({args.name}-examples.png)", "", f"![distributions]({args.name}-distributions.png)", ""]
    Path(f"{stem}.md").write_text("\n".join(md))
    plot_examples(examples, Path(f"{stem}-examples.png"), [*main_methods, *([BHDIFF] if bh_cases else [])])
    plot_distributions(main_rows, Path(f"{stem}-distributions.png"), main_methods)
    print("\n".join(md))
    print(f"\nwrote {stem}.md, .json and plots")


def plot_examples(examples: dict, path: Path, methods) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not examples:
        return
    cols = ["truth", *[m for m in methods if any(m in ims for ims in examples.values())]]
    fig, axes = plt.subplots(len(examples), len(cols), figsize=(1.6 * len(cols), 1.8 * len(examples)), squeeze=False)
    for i, (scanner, ims) in enumerate(examples.items()):
        for j, c in enumerate(cols):
            if c not in ims:  # a method scored on fewer scanners (the 3D one)
                axes[i, j].axis("off")
                continue
            im = np.rot90(ims[c])
            lo, hi = np.percentile(im, [1, 99.5])
            axes[i, j].imshow(im, cmap="gray", vmin=lo, vmax=hi)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title("source" if c == "none" else c, fontsize=8)
        axes[i, 0].set_ylabel(scanner, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_distributions(rows, path: Path, methods) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["psnr_vol", "ssim_slice", "dice", "jump_ratio"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6))
    for ax, k in zip(axes, keys):
        data = [[r[k] for r in rows if r["method"] == m and np.isfinite(r[k])] for m in methods]
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(methods) + 1), ["source" if m == "none" else m for m in methods], rotation=45, ha="right", fontsize=8)
        ax.set_title(HEADERS[k], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
