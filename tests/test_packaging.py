"""Packaging metadata agrees with itself: the citation file, the licence and the version."""

from pathlib import Path

import yaml

import bidsharmony

ROOT = Path(__file__).resolve().parents[1]


def test_citation_file_matches_the_package():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["version"] == bidsharmony.__version__
    assert cff["license"] == "Apache-2.0"
    titles = " ".join(r["title"] for r in cff["references"])
    assert "BlindHarmony" in titles and "MRFlow" in titles


def test_licence_text_is_the_one_declared():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert '"Apache-2.0"' in (ROOT / "pyproject.toml").read_text()


def test_the_package_neither_ships_nor_imports_the_benchmarks():
    """The benchmarks need the shared data and the bench extra: they live beside the package, in
    ``benchmarks/``, and no product module imports them."""
    import re

    from setuptools import find_packages

    packages = find_packages(str(ROOT), include=["bidsharmony*"])
    assert "bidsharmony" in packages and not any("bench" in p for p in packages)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "bidsharmony").rglob("*.py")
                 if re.search(r"^\s*(from|import) benchmarks\b", p.read_text(), re.M)]
    assert offenders == []
    assert (ROOT / "benchmarks" / "quality" / "__main__.py").is_file()
