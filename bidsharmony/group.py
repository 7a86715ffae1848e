"""The group level: one row per harmonized run, read from the sidecars in OUT_DIR, a per-scanner
summary, plots, ``group.tsv`` and ``group.html``. Needs only OUT_DIR: it runs after any number of
participant runs, including ones done on different machines."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np

from bidsharmony.bids import stem_of
from bidsharmony.errors import NoFilesError
from bidsharmony.outputs import atomic_save, atomic_write_text
from bidsharmony.provenance import Provenance
from bidsharmony.reports.sidecar import SUMMARY_METRICS, read_sidecar

COLUMNS = ("file", "scanner", "manufacturer", "model_name", "field_strength", "site", "model", "model_sha256", "device",
           "slices_harmonized", "fallback_slices", "seconds", "similarity_to_input", "histogram_distance_before",
           "histogram_distance_after", "slice_step_ratio")  # fmt: skip
LOG = logging.getLogger("bidsharmony")


def scanner_label(scanner: dict) -> str:
    """'Siemens TrioTim 3T (site)' from a run's SourceScanner fields; 'unknown scanner' without."""
    parts = [scanner.get("Manufacturer"), scanner.get("ManufacturersModelName")]
    if scanner.get("MagneticFieldStrength") is not None:
        parts.append(f"{scanner['MagneticFieldStrength']}T")
    label = " ".join(str(p) for p in parts if p)
    site = scanner.get("InstitutionName") or scanner.get("StationName")
    if site:
        label = f"{label} ({site})" if label else str(site)
    return label or "unknown scanner"


def collect_rows(out_dir, skipped: list | None = None, metas: list | None = None) -> list[dict]:
    """One row per readable sidecar; a broken one is logged and appended to ``skipped`` as
    (relative path, cause); ``metas`` gets each row's whole sidecar."""
    out_dir = Path(out_dir)
    rows = []
    for sidecar in sorted(out_dir.glob("sub-*/**/anat/*_desc-harmonized_T1w.json")):
        try:
            meta = read_sidecar(sidecar)
        except ValueError as e:
            LOG.warning("%s: skipped: %s", sidecar, e)
            if skipped is not None:
                skipped.append((sidecar.relative_to(out_dir).as_posix(), str(e)))
            continue
        if metas is not None:
            metas.append(meta)
        prov = Provenance.from_sidecar(meta)
        model, quality, scanner = prov.model or {}, prov.quality or {}, prov.source_scanner or {}
        rows.append({
            "file": sidecar.relative_to(out_dir).as_posix().replace(".json", ".nii.gz"),
            "scanner": scanner_label(scanner),
            "manufacturer": scanner.get("Manufacturer"),
            "model_name": scanner.get("ManufacturersModelName"),
            "field_strength": scanner.get("MagneticFieldStrength"),
            "site": scanner.get("InstitutionName") or scanner.get("StationName"),
            "model": model.get("Name"),
            "model_sha256": model.get("Sha256"),
            "device": prov.device,
            "slices_harmonized": prov.slices_harmonized,
            "fallback_slices": prov.fallback_slices,
            "seconds": prov.harmonization_seconds,
            "similarity_to_input": quality.get("SimilarityToInput"),
            "histogram_distance_before": quality.get("HistogramDistanceBefore"),
            "histogram_distance_after": quality.get("HistogramDistanceAfter"),
            "slice_step_ratio": quality.get("SliceStepRatio"),
        })  # fmt: skip
    if not rows and skipped:
        raise NoFilesError(f"{out_dir}: no readable harmonized outputs ({len(skipped)} broken sidecar(s), e.g. {skipped[0][0]}: "
                           f"{skipped[0][1]})")
    if not rows:
        raise NoFilesError(f"{out_dir}: no harmonized outputs found; run the participant level first")
    return rows


def summarise(rows: list[dict]) -> dict:
    """{scanner label: {'runs': n, metric: mean over the group's runs}}."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["scanner"], []).append(r)
    out = {}
    for name, rs in sorted(groups.items()):
        stats = {"runs": len(rs)}
        for m in SUMMARY_METRICS:
            vals = [r[m] for r in rs if r.get(m) is not None]
            stats[m] = float(np.mean(vals)) if vals else None
        out[name] = stats
    return out


def plot_group(out_dir: Path, rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scanners = sorted({r["scanner"] for r in rows})
    colours = {s: plt.cm.tab10(i % 10) for i, s in enumerate(scanners)}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    for r in rows:
        if r["histogram_distance_before"] is not None:
            ax.plot([0, 1], [r["histogram_distance_before"], r["histogram_distance_after"]], "-o", color=colours[r["scanner"]], ms=4)
    ax.set_xticks([0, 1], ["input", "harmonized"])
    ax.set_title("histogram distance to the target domain", fontsize=9)
    for ax, key, title in ((axes[1], "slice_step_ratio", "slice-to-slice steps (× input)"),
                           (axes[2], "similarity_to_input", "similarity to the input")):  # fmt: skip
        vals = [r[key] if r[key] is not None else np.nan for r in rows]
        ax.bar(range(len(rows)), vals, color=[colours[r["scanner"]] for r in rows])
        ax.set_xticks(range(len(rows)), [stem_of(r["file"]) for r in rows], rotation=60, ha="right", fontsize=6)
        ax.set_title(title, fontsize=9)
    handles = [plt.Line2D([], [], color=colours[s], marker="o", ls="", label=s) for s in scanners]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(scanners), 4), frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    path = out_dir / "figures" / "group_metrics.png"
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), root=out_dir)
    plt.close(fig)
    return [path]


def write_group_summary(out_dir) -> Path:
    """group.tsv and group.html in OUT_DIR; returns the TSV's path."""
    from bidsharmony.reports.html import write_group_report

    out_dir = Path(out_dir)
    skipped: list[tuple[str, str]] = []
    metas: list[dict] = []
    rows = collect_rows(out_dir, skipped, metas)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: ("n/a" if v is None else v) for k, v in r.items()} for r in rows])
    path = out_dir / "group.tsv"
    atomic_write_text(path, buf.getvalue(), root=out_dir)
    write_group_report(out_dir, rows, summarise(rows), plot_group(out_dir, rows), skipped=skipped, metas=metas)
    return path
