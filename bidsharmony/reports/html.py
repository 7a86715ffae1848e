"""``sub-X.html`` (one section per T1w run) and ``group.html``, from the sidecars and figures in OUT_DIR.

Plain HTML with relative links to PNGs next to it: copy the HTML with its figures folder and it
still works. Everything shown comes from files in OUT_DIR, so reports can be rebuilt at any time
(and the group level works after participant runs on different machines).
"""

from __future__ import annotations

import logging
import time
from html import escape
from pathlib import Path

from bidsharmony import __version__
from bidsharmony.outputs import atomic_write_text

LOG = logging.getLogger("bidsharmony")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } img { max-width: 100%; display: block; margin: 0.5em 0; }
.warn { background: #fff4e5; border-left: 4px solid #f0a020; padding: 0.4em 0.8em; margin: 0.3em 0; }
.ok { color: #2a7a2a; } code { font-size: 0.9em; }
"""


# Marks each figure once the browser has decoded it (the headless-browser test reads the marks).
_IMG_EVENTS = 'onload="this.dataset.loaded=1" onerror="this.dataset.failed=1"'


def _img(src: str, alt: str) -> str:
    return f'<img src="{escape(src)}" alt="{escape(alt)}" {_IMG_EVENTS}>'


def _page(title: str, body: list[str]) -> str:
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>", f"<h1>{escape(title)}</h1>",
        f"<p>bidsharmony {escape(__version__)} · written {escape(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>",
        *body, "</body></html>",
    ])  # fmt: skip


def _table(rows: list[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return "–" if v is None else str(v)


def run_warnings(meta: dict) -> list[str]:
    """Things a user should look at, from one run's sidecar."""
    q = meta.get("Quality", {})
    out = []
    if meta.get("FallbackSlices"):
        out.append(f"{meta['FallbackSlices']} slice(s) fell back to the image step (the flow gave NaN or absurd values there).")
    if q.get("SliceStepRatio", 1.0) > 2.0:
        out.append(f"Slice-to-slice intensity steps are {q['SliceStepRatio']:.1f}× the input's: check the sagittal and coronal views "
                   "(a 2D method can treat neighbouring slices differently; a source far from the target makes it worse).")
    if "HistogramDistanceAfter" in q and q["HistogramDistanceAfter"] > q.get("HistogramDistanceBefore", float("inf")):
        out.append("The intensity distribution moved away from the target domain.")
    if q.get("SimilarityToInput", 1.0) < 0.9:
        out.append(f"Large change: similarity to the input is {q['SimilarityToInput']:.3f}.")
    return out


def _run_section(out_dir: Path, sidecar: Path, meta: dict) -> list[str]:
    image = sidecar.with_name(sidecar.name.replace(".json", ".nii.gz"))
    stem = image.name.split("_desc-")[0]
    sub = stem.split("_")[0]
    model = meta.get("Model") or {}
    q = meta.get("Quality") or {}
    facts = [
        ("output", image.relative_to(out_dir).as_posix()),
        ("source", ", ".join(meta.get("Sources", []))),
        ("source scanner", meta.get("SourceScanner") or "not in the input's sidecar"),
        ("model", f"{model.get('Name')} ({model.get('Preset')}), sha256 {model.get('Sha256')}"),
        ("device", meta.get("Device")),
        ("harmonization time (s)", meta.get("HarmonizationSeconds")),
        ("slices harmonized / total", f"{meta.get('SlicesHarmonized')} / {meta.get('SlicesTotal')}"),
        ("fallback slices", meta.get("FallbackSlices")),
        ("similarity to the input", q.get("SimilarityToInput")),
        ("histogram distance to the target, before → after",
         f"{_fmt(q.get('HistogramDistanceBefore'))} → {_fmt(q.get('HistogramDistanceAfter'))}"),
        ("slice-to-slice steps (× the input's)", q.get("SliceStepRatio")),
        ("software", f"bidsharmony {meta.get('SoftwareVersion')}, torch {meta.get('TorchVersion')}"),
    ]
    params = sorted((meta.get("Parameters") or {}).items())
    warnings = run_warnings(meta)
    body = [f'<h2 id="{escape(stem)}">{escape(stem)}</h2>', _table(facts), "<h3>Warnings</h3>"]
    body += [f'<div class="warn">{escape(w)}</div>' for w in warnings] or ['<p class="ok">None.</p>']
    body += ["<h3>Parameters</h3>", _table(params)]
    for desc, caption in (("beforeafter", "Before, after and their difference"),
                          ("histogram", "Intensity histograms: input, output and the target domain"),
                          ("convergence", "The loop's objective terms per iteration")):  # fmt: skip
        fig = Path(sub) / "figures" / f"{stem}_desc-{desc}_T1w.png"
        if (out_dir / fig).is_file():
            body.append(f"<h3>{escape(caption)}</h3>" + _img(fig.as_posix(), caption))
        else:
            body.append(f'<div class="warn">Figure missing: {escape(fig.as_posix())}</div>')
    return body


def write_participant_report(out_dir, subject: str) -> Path:
    """OUT_DIR/sub-<subject>.html over every harmonized run of the subject in OUT_DIR."""
    out_dir = Path(out_dir)
    sidecars = sorted((out_dir / f"sub-{subject}").glob("**/anat/*_desc-harmonized_T1w.json"))
    body = [f"<p>{len(sidecars)} harmonized T1w run(s). Each section: the run's facts, warnings, parameters and figures "
            "(figures in <code>sub-" + escape(subject) + "/figures/</code>).</p>"]
    body += ["<ul>" + "".join(f'<li><a href="#{escape(s.name.split("_desc-")[0])}">{escape(s.name.split("_desc-")[0])}</a></li>'
                              for s in sidecars) + "</ul>"]
    from bidsharmony.group import read_sidecar

    for sidecar in sidecars:
        try:
            meta = read_sidecar(sidecar)
        except ValueError as e:  # another run's sidecar, damaged since: this run's report still goes out
            LOG.warning("%s: left out of the report: %s", sidecar, e)
            body.append(f'<div class="warn">{escape(sidecar.relative_to(out_dir).as_posix())}: left out, {escape(str(e))}</div>')
            continue
        body += _run_section(out_dir, sidecar, meta)
    path = out_dir / f"sub-{subject}.html"
    atomic_write_text(path, _page(f"bidsharmony: sub-{subject}", body), root=out_dir)
    return path


def write_group_report(out_dir, rows: list[dict], groups: dict, figures: list[Path], skipped=()) -> Path:
    """OUT_DIR/group.html: per-scanner summary, plots and one row per run (as group.tsv); ``skipped``:
    (sidecar, cause) of broken sidecars, shown as warnings."""
    out_dir = Path(out_dir)
    from bidsharmony.group import COLUMNS, SUMMARY_METRICS

    body = [(f"<p>{len(rows)} harmonized run(s) in {len(groups)} scanner group(s). The same rows are in "
            '<a href="group.tsv">group.tsv</a>; each run links to its participant report.</p>'), "<h2>By scanner</h2>"]
    body[1:1] = [f'<div class="warn">{escape(path)}: left out, {escape(cause)}</div>' for path, cause in skipped]
    head = "".join(f"<th>{escape(c)}</th>" for c in ["scanner", "runs", *SUMMARY_METRICS])
    lines = [f"<tr>{head}</tr>"]
    for name, stats in groups.items():
        lines.append("<tr>" + f"<td>{escape(name)}</td><td>{stats['runs']}</td>"
                     + "".join(f"<td>{escape(_fmt(stats[m]))}</td>" for m in SUMMARY_METRICS) + "</tr>")
    body.append("<table>" + "".join(lines) + "</table>")
    for fig in figures:
        body.append(_img(fig.relative_to(out_dir).as_posix(), fig.stem))
    body.append("<h2>Runs</h2>")
    head = "".join(f"<th>{escape(c)}</th>" for c in COLUMNS)
    lines = [f"<tr>{head}</tr>"]
    for r in rows:
        sub = r["file"].split("/")[0]
        cells = []
        for c in COLUMNS:
            v = escape(_fmt(r.get(c)))
            cells.append(f'<td><a href="{escape(sub)}.html">{v}</a></td>' if c == "file" else f"<td>{v}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    body.append("<table>" + "".join(lines) + "</table>")
    path = out_dir / "group.html"
    atomic_write_text(path, _page("bidsharmony: group report", body), root=out_dir)
    return path
