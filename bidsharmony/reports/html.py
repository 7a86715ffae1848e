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
from bidsharmony.bids import stem_of
from bidsharmony.outputs import atomic_write_text
from bidsharmony.provenance import Provenance

LOG = logging.getLogger("bidsharmony")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; overflow-wrap: anywhere; }
th { background: #f4f4f4; } img { max-width: 100%; display: block; margin: 0.5em 0; }
object.flip { display: block; width: 100%; height: auto; margin: 0.5em 0; }
.scroll { max-width: 100%; overflow-x: auto; }
.scroll table { margin: 0; }
table.runs td, table.runs th { padding: 2px 6px; overflow-wrap: normal; }
table.runs td.run { white-space: nowrap; }
table.runs td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.warn { background: #fff4e5; border-left: 4px solid #f0a020; padding: 0.4em 0.8em; margin: 0.3em 0; }
.ok { color: #2a7a2a; } code { font-size: 0.9em; }
.boilerplate blockquote { background: #f7f7f7; border-left: 4px solid #888; margin: 0.5em 0; padding: 0.6em 1em; }
.boilerplate ol { font-size: 0.85em; } .boilerplate pre { font-size: 0.8em; white-space: pre-wrap; }
:target { scroll-margin-top: 0.5em; }
"""

# Marks each figure once the browser has decoded it (the headless-browser test reads the marks).
_IMG_EVENTS = 'onload="this.dataset.loaded=1" onerror="this.dataset.failed=1"'


def _img(src: str, alt: str) -> str:
    return f'<img src="{escape(src)}" alt="{escape(alt)}" {_IMG_EVENTS}>'


def _flip(src: str, alt: str) -> str:
    """The before/after SVG as a document of its own (an <object>), so its hover and click work."""
    return (f'<object class="flip" type="image/svg+xml" data="{escape(src)}" aria-label="{escape(alt)}" {_IMG_EVENTS}>'
            f'<a href="{escape(src)}">{escape(alt)}</a></object>')


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


# Thresholds of the warnings (README, "Reports").
STEP_RATIO_WARN = 2.0  # slice-to-slice steps, × the input's
LARGE_CHANGE_SIMILARITY = 0.9  # similarity to the input below this: a large change
UNCHANGED_SIMILARITY = 0.999  # at or above this, and the histogram distance barely moved: (almost) no change
UNCHANGED_HISTOGRAM = 0.1  # "barely moved": by less than this fraction of the distance before (or 0.002)
WEAK_MODEL_BPD = 8.0  # validation bits/dim above this: a weak prior (shipped ixi-hh-fast: 6.59; a uniform guess: 12)
SMOKE_PRESETS = ("tiny",)


def run_warnings(meta: dict) -> list[str]:
    """Things a user should look at, from one run's sidecar."""
    prov = Provenance.from_sidecar(meta)
    q, model = prov.quality or {}, prov.model or {}
    out = []
    if prov.fallback_slices:
        out.append(f"{prov.fallback_slices} slice(s) fell back to the image step (the flow gave NaN or absurd values there).")
    ratio = q.get("SliceStepRatio")
    if isinstance(ratio, (int, float)) and ratio > STEP_RATIO_WARN:
        out.append(f"Slice-to-slice intensity steps are {ratio:.1f}× the input's: check the sagittal and coronal views "
                   "(a 2D method can treat neighbouring slices differently; a source far from the target makes it worse).")
    before, after = q.get("HistogramDistanceBefore"), q.get("HistogramDistanceAfter")
    have_hist = isinstance(before, (int, float)) and isinstance(after, (int, float))
    if have_hist and after > before:
        out.append(f"The intensity distribution moved away from the target domain: its histogram distance to the target went "
                   f"from {before:.3g} to {after:.3g} (0 is the target's distribution).")
    similarity = q.get("SimilarityToInput")
    if isinstance(similarity, (int, float)) and similarity < LARGE_CHANGE_SIMILARITY:
        out.append(f"Large change: similarity to the input is {similarity:.3f}.")
    barely = not have_hist or abs(before - after) < max(UNCHANGED_HISTOGRAM * before, 0.002)
    loop_off = prov.intensity_scale == "standard" and (prov.parameters or {}).get("iterations") == 0
    if isinstance(similarity, (int, float)) and similarity >= UNCHANGED_SIMILARITY and barely and not loop_off:
        moved = f"; the histogram distance to the target barely moved ({before:.3g} → {after:.3g})" if have_hist else ""
        what = ("Beyond the intensity standardisation (which these slice-wise figures do not see), the flow changed (almost) "
                "nothing" if prov.intensity_scale == "standard" else "Harmonization changed (almost) nothing")
        out.append(f"{what}: similarity to the input {similarity:.4f}{moved}. Check that the "
                   "model's target domain suits this image and the parameters (--iterations, --beta-fidelity).")
    reasons = []
    smoke = model.get("Preset") in SMOKE_PRESETS or bool(model.get("SmokeTest"))
    if model.get("Preset") in SMOKE_PRESETS:
        reasons.append(f"its preset is {model['Preset']!r}, for smoke tests")
    if model.get("SmokeTest"):
        reasons.append("its model card calls it a smoke-test model")
    bpd = model.get("ValidationBitsPerDim")
    if isinstance(bpd, (int, float)) and bpd > WEAK_MODEL_BPD:
        reasons.append(f"its validation loss is {bpd:.2f} bits/dim, above {WEAK_MODEL_BPD:g} (the shipped ixi-hh-fast: 6.59)")
    if reasons:
        advice = ("These outputs prove the pipeline runs; do not analyse them." if smoke else
                  "Check the outputs closely, or train a stronger model of the target (--preset paper, more --steps).")
        verdict = "is no useful prior" if smoke else "is a weak prior"
        out.append(f"Weak model: {model.get('Name') or 'the model'} {verdict} ({'; '.join(reasons)}). {advice}")
    return out


def _run_section(out_dir: Path, sidecar: Path, meta: dict) -> list[str]:
    image = sidecar.with_name(sidecar.name.replace(".json", ".nii.gz"))
    stem = stem_of(image.name)
    sub = stem.split("_")[0]
    prov = Provenance.from_sidecar(meta)
    model, q = prov.model or {}, prov.quality or {}
    facts = [
        ("output", image.relative_to(out_dir).as_posix()),
        ("source", ", ".join(meta.get("Sources", []))),
        ("source scanner", prov.source_scanner or "not in the input's sidecar"),
        ("model", f"{model.get('Name')} ({model.get('Preset')}), sha256 {model.get('Sha256')}"),
        ("model's validation bits/dim", model.get("ValidationBitsPerDim", "not recorded")),
        ("device", prov.device),
        ("harmonization time (s)", prov.harmonization_seconds),
        ("slices harmonized / total", f"{prov.slices_harmonized} / {prov.slices_total}"),
        *([("fallback slices", prov.fallback_slices)] if prov.fallback_slices is not None else []),
        ("similarity to the input", q.get("SimilarityToInput")),
        ("histogram distance to the target, before → after",
         f"{_fmt(q.get('HistogramDistanceBefore'))} → {_fmt(q.get('HistogramDistanceAfter'))}"),
        ("slice-to-slice steps (× the input's)", q.get("SliceStepRatio")),
        ("software", f"bidsharmony {meta.get('SoftwareVersion')}, torch {prov.torch_version}"),
    ]
    params = sorted((prov.parameters or {}).items())
    warnings = run_warnings(meta)
    body = [f'<h2 id="{escape(stem)}">{escape(stem)}</h2>', _table(facts), "<h3>Warnings</h3>"]
    body += [f'<div class="warn">{escape(w)}</div>' for w in warnings] or ['<p class="ok">None.</p>']
    body += ["<h3>Parameters</h3>", _table(params)]
    from bidsharmony.reports.figures import RUN_FIGURES

    for desc, ext, caption in RUN_FIGURES:
        fig = Path(sub) / "figures" / f"{stem}_desc-{desc}_T1w.{ext}"
        if (out_dir / fig).is_file():
            view = _flip(fig.as_posix(), caption) if desc == "beforeafter" else _img(fig.as_posix(), caption)
            body.append(f"<h3>{escape(caption)}</h3>" + view)
        else:
            body.append(f'<div class="warn">Figure missing: {escape(fig.as_posix())} (see the run\'s log)</div>')
    return body


def _methods(metas: list[dict], runs: list[list[str]]) -> list[str]:
    from bidsharmony.reports import boilerplate

    if not metas:
        return []
    return ['<h2 id="methods">Methods</h2>',
            "<p>A methods paragraph written from the runs' sidecars (their method, model, parameters and software "
            "versions), with its references: paste it into a paper. Runs of different settings get a paragraph each.</p>",
            boilerplate.html(metas, runs)]  # fmt: skip


def write_participant_report(out_dir, subject: str) -> Path:
    """OUT_DIR/sub-<subject>.html over every harmonized run of the subject in OUT_DIR."""
    out_dir = Path(out_dir)
    sidecars = sorted((out_dir / f"sub-{subject}").glob("**/anat/*_desc-harmonized_T1w.json"))
    body = [f"<p>{len(sidecars)} harmonized T1w run(s). Each section: the run's facts, warnings, parameters and figures "
            "(figures in <code>sub-" + escape(subject) + "/figures/</code>).</p>"]
    body += ["<ul>" + "".join(f'<li><a href="#{escape(stem_of(s.name))}">{escape(stem_of(s.name))}</a></li>'
                              for s in sidecars) + '<li><a href="#methods">Methods</a></li></ul>']
    from bidsharmony.reports.sidecar import read_sidecar

    metas, names = [], []
    for sidecar in sidecars:
        try:
            meta = read_sidecar(sidecar)
        except ValueError as e:  # another run's sidecar, damaged since: this run's report still goes out
            LOG.warning("%s: left out of the report: %s", sidecar, e)
            body.append(f'<div class="warn">{escape(sidecar.relative_to(out_dir).as_posix())}: left out, {escape(str(e))}</div>')
            continue
        body += _run_section(out_dir, sidecar, meta)
        metas.append(meta)
        names.append([stem_of(sidecar.name)])
    body += _methods(metas, names)
    path = out_dir / f"sub-{subject}.html"
    atomic_write_text(path, _page(f"bidsharmony: sub-{subject}", body), root=out_dir)
    return path


def _num(v, digits: int) -> str:
    return "–" if not isinstance(v, (int, float)) or isinstance(v, bool) else f"{v:.{digits}f}"


def _run_table(rows: list[dict], warnings: list[list[str]]) -> str:
    """One compact row per run; its name links to its section in the participant report."""
    head = ("run", "scanner", "model", "slices", "fallback", "seconds", "similarity", "histogram distance before → after",
            "slice steps ×", "warnings")  # fmt: skip
    lines = ["<tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for r, warns in zip(rows, warnings):
        sub = r["file"].split("/")[0]
        stem = stem_of(r["file"])
        sha = str(r.get("model_sha256") or "")
        cells = [
            f'<td class="run"><a href="{escape(sub)}.html#{escape(stem)}">{escape(stem)}</a></td>',
            f"<td>{escape(_fmt(r.get('scanner')))}</td>",
            f'<td title="sha256 {escape(sha)}">{escape(_fmt(r.get("model")))} <code>{escape(sha[:8])}</code></td>',
            f'<td class="num">{escape(_fmt(r.get("slices_harmonized")))}</td>',
            f'<td class="num">{escape(_fmt(r.get("fallback_slices")))}</td>',
            f'<td class="num">{_num(r.get("seconds"), 1)}</td>',
            f'<td class="num">{_num(r.get("similarity_to_input"), 4)}</td>',
            f'<td class="num">{_num(r.get("histogram_distance_before"), 3)} → {_num(r.get("histogram_distance_after"), 3)}</td>',
            f'<td class="num">{_num(r.get("slice_step_ratio"), 2)}</td>',
            (f'<td class="num"><a href="{escape(sub)}.html#{escape(stem)}" title="{escape(" ".join(warns))}">{len(warns)}</a></td>'
             if warns else '<td class="num">0</td>'),
        ]  # fmt: skip
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return '<div class="scroll"><table class="runs">' + "".join(lines) + "</table></div>"


def write_group_report(out_dir, rows: list[dict], groups: dict, figures: list[Path], skipped=(), metas=None) -> Path:
    """OUT_DIR/group.html: per-scanner summary, plots, runs that need a look, one row per run (as
    group.tsv, compact), and the methods paragraph; ``skipped``: (sidecar, cause) of broken
    sidecars, shown as warnings; ``metas``: the rows' sidecars (for warnings and methods)."""
    out_dir = Path(out_dir)
    from bidsharmony.reports.sidecar import SUMMARY_METRICS

    metas = list(metas) if metas is not None else [{} for _ in rows]
    warnings = [run_warnings(m) for m in metas]
    body = [(f"<p>{len(rows)} harmonized run(s) in {len(groups)} scanner group(s). All columns are in "
            '<a href="group.tsv">group.tsv</a>; each run links to its section in its participant report.</p>'),
            '<ul><li><a href="#scanners">By scanner</a></li><li><a href="#check">Runs to check</a></li>'
            '<li><a href="#runs">Runs</a></li><li><a href="#methods">Methods</a></li></ul>',
            '<h2 id="scanners">By scanner</h2>']  # fmt: skip
    body[1:1] = [f'<div class="warn">{escape(path)}: left out, {escape(cause)}</div>' for path, cause in skipped]
    head = "".join(f"<th>{escape(c)}</th>" for c in ["scanner", "runs", *SUMMARY_METRICS])
    lines = [f"<tr>{head}</tr>"]
    for name, stats in groups.items():
        lines.append("<tr>" + f"<td>{escape(name)}</td><td>{stats['runs']}</td>"
                     + "".join(f"<td>{escape(_fmt(stats[m]))}</td>" for m in SUMMARY_METRICS) + "</tr>")
    body.append('<div class="scroll"><table>' + "".join(lines) + "</table></div>")
    for fig in figures:
        body.append(_img(fig.relative_to(out_dir).as_posix(), fig.stem))
    body.append('<h2 id="check">Runs to check</h2>')
    flagged = [(r, w) for r, w in zip(rows, warnings) if w]
    if not flagged:
        body.append('<p class="ok">None: no run has a warning.</p>')
    for r, warns in flagged:
        sub, stem = r["file"].split("/")[0], stem_of(r["file"])
        body.append(f'<div class="warn"><a href="{escape(sub)}.html#{escape(stem)}">{escape(stem)}</a>: '
                    + " ".join(escape(w) for w in warns) + "</div>")
    body += ['<h2 id="runs">Runs</h2>', _run_table(rows, warnings)]
    named = [(m, [stem_of(r["file"])]) for r, m in zip(rows, metas) if m]
    body += _methods([m for m, _ in named], [n for _, n in named])
    path = out_dir / "group.html"
    atomic_write_text(path, _page("bidsharmony: group report", body), root=out_dir)
    return path
