"""Reports: per-participant HTML and the group level, checked against the sidecars and in a browser."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import numpy as np
import pytest

from bidsharmony.cli.run import main
from bidsharmony.reports.html import run_warnings


def _sidecars(out: Path) -> list[Path]:
    return sorted(out.glob("sub-*/**/anat/*_desc-harmonized_T1w.json"))


def _png_is_a_picture(path: Path) -> None:
    import matplotlib.image as mpimg

    img = mpimg.imread(str(path))  # a decodable PNG
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.02, f"{path} is blank"


def test_participant_reports_show_every_run_with_its_figures_and_sidecar_values(participant_run):
    out = participant_run["out"]
    assert participant_run["code"] == 0
    for subject, n_runs in (("01", 2), ("02", 2)):
        html = (out / f"sub-{subject}.html").read_text()
        sidecars = [p for p in _sidecars(out) if p.name.startswith(f"sub-{subject}_")]
        assert len(sidecars) == n_runs
        sources = re.findall(r'<img src="([^"]+)"', html)
        assert len(sources) == 3 * n_runs  # before/after, histograms, convergence per run
        for src in sources:
            _png_is_a_picture(out / unescape(src))
        for sidecar in sidecars:
            meta = json.loads(sidecar.read_text())
            stem = sidecar.name.split("_desc-")[0]
            section = html.split(f'<h2 id="{stem}">', 1)[1].split("<h2 ", 1)[0]
            assert meta["Model"]["Sha256"] in section and meta["Device"] in section
            q = meta["Quality"]
            assert f"{q['HistogramDistanceBefore']:.4g} → {q['HistogramDistanceAfter']:.4g}" in section
            assert f"<td>{q['SliceStepRatio']:.4g}</td>" in section
            assert f"<th>iterations</th><td>{meta['Parameters']['iterations']}</td>" in section
            assert meta["SourceScanner"]["Manufacturer"] in section


def test_quality_metrics_are_recorded_and_sane(participant_run):
    for sidecar in _sidecars(participant_run["out"]):
        q = json.loads(sidecar.read_text())["Quality"]
        assert 0.5 < q["SimilarityToInput"] <= 1.0
        assert 0 <= q["HistogramDistanceBefore"] < 1 and 0 <= q["HistogramDistanceAfter"] < 1
        assert 0 < q["SliceStepRatio"] < 10


def test_warnings_name_what_to_check():
    quiet = {"FallbackSlices": 0, "Quality": {"SliceStepRatio": 1.1, "SimilarityToInput": 0.99,
                                              "HistogramDistanceBefore": 0.05, "HistogramDistanceAfter": 0.02}}
    assert run_warnings(quiet) == []
    loud = {"FallbackSlices": 3, "Quality": {"SliceStepRatio": 4.8, "SimilarityToInput": 0.8,
                                             "HistogramDistanceBefore": 0.02, "HistogramDistanceAfter": 0.05}}
    text = " ".join(run_warnings(loud))
    assert "3 slice(s) fell back" in text and "4.8×" in text and "moved away" in text and "0.800" in text


def test_group_level_summarises_runs_by_scanner(participant_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(participant_run["out"], out)
    (out / "group.tsv").unlink(missing_ok=True)
    assert main([str(participant_run["bids"]), str(out), "group"]) == 0
    rows = list(csv.DictReader((out / "group.tsv").open(), delimiter="\t"))
    sidecars = _sidecars(out)
    assert len(rows) == len(sidecars) == 4
    for row, sidecar in zip(rows, sidecars):
        meta = json.loads(sidecar.read_text())
        assert row["file"] == sidecar.relative_to(out).as_posix().replace(".json", ".nii.gz")
        assert float(row["slice_step_ratio"]) == pytest.approx(meta["Quality"]["SliceStepRatio"])
        assert float(row["histogram_distance_after"]) == pytest.approx(meta["Quality"]["HistogramDistanceAfter"])
        assert row["manufacturer"] == meta["SourceScanner"]["Manufacturer"]
    scanners = {r["scanner"] for r in rows}
    assert len(scanners) == 2  # the example's two simulated scanners: sub-01 on A, sub-02 on B
    html = (out / "group.html").read_text()
    for s in scanners:
        assert s in html
    means = {s: np.mean([float(r["slice_step_ratio"]) for r in rows if r["scanner"] == s]) for s in scanners}
    for s, m in means.items():
        assert re.search(rf"<td>{re.escape(s)}</td><td>2</td>(<td>[^<]*</td>){{3}}<td>{m:.4g}</td>", html)
    _png_is_a_picture(out / "figures" / "group_metrics.png")


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no headless Chromium here (apt-get install chromium; .ci/run installs it)")


@pytest.mark.parametrize("page", ["sub-01.html", "group.html"])
def test_reports_render_in_a_headless_browser(participant_run, tmp_path, page):
    """Chromium loads the page as a user would: every figure decodes (marked by its onload), and
    the screenshot is not blank. The copy elsewhere proves the report is self-contained."""
    browser = _chromium()
    out = tmp_path / "copy"
    shutil.copytree(participant_run["out"], out, ignore=shutil.ignore_patterns("*.nii.gz", ".bidsharmony-work"))
    if page == "group.html":
        assert main([str(participant_run["bids"]), str(out), "group"]) == 0
    url = (out / page).as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=10000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    imgs = re.findall(r"<img [^>]*>", dom)
    assert imgs and all('data-loaded="1"' in i for i in imgs), [i for i in imgs if 'data-loaded="1"' not in i]
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1100,2400", url], capture_output=True, timeout=120)
    import matplotlib.image as mpimg

    pixels = mpimg.imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (2400, 1100)
    assert (pixels.mean(axis=2) < 0.9).mean() > 0.05, "the page renders (almost) blank"
