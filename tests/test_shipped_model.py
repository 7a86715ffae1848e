"""The model shipped in the package: intact, documented, the default, and useful on a real head."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from bidsharmony.flow.checkpoint import load_model
from bidsharmony.modelfolder import WEIGHTS, sha256_file
from bidsharmony.models import DEFAULT_MODEL, bundled_models, default_model


def test_the_default_model_ships_with_a_card_whose_hash_matches_the_weights():
    folder = default_model()
    assert folder.name == DEFAULT_MODEL and DEFAULT_MODEL in bundled_models()
    config = json.loads((folder / "config.json").read_text())
    card = (folder / "MODEL_CARD.md").read_text()
    actual = sha256_file(folder / WEIGHTS)
    assert config["weights_sha256"] == actual
    assert re.findall(r"[0-9a-f]{64}", card) == [actual]
    assert "CC BY-SA 3.0" in card and "brain-development.org/ixi-dataset" in card and "CC BY-SA 3.0" in config["licence"]
    assert "BENCHMARK-TABLE" not in card  # the benchmark's numbers were filled in
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total < 40e6


def test_version_and_list_models_name_the_default_with_its_hash():
    sha = json.loads((default_model() / "config.json").read_text())["weights_sha256"]
    for flag in ("--version", "--list-models"):
        out = subprocess.run([sys.executable, "-m", "bidsharmony", flag], capture_output=True, text=True, check=True).stdout
        assert f"{DEFAULT_MODEL} [default]" in out and sha in out


def test_the_shipped_model_harmonizes_a_real_head_towards_its_domain():
    """nibabel's real head on a simulated scanner: the loop raises the prior's likelihood of the
    slices while staying close to the source (similarity ≈ 1), deterministically."""
    import torch

    from bidsharmony.example import SCANNERS, simulate_scanner, source_head
    from bidsharmony.flow.scaling import bits_per_dim, to_flow
    from bidsharmony.harmonize.solvers import HarmonizeParams
    from bidsharmony.harmonize.volume import check_grid, harmonize_volume
    from bidsharmony.image.resample import canonical, resample_isotropic
    from bidsharmony.image.slices import cut

    model = load_model(default_model(), device="cpu")
    data, affine = source_head()
    source = simulate_scanner(data, *SCANNERS["B"], rng=np.random.default_rng(0))
    vol, _ = resample_isotropic(*canonical(source, affine), 1.2)
    slices, record = cut(vol)
    check_grid(model, record)
    params = HarmonizeParams(iterations=5).validate()
    out = harmonize_volume(slices, record, model, params)
    again = harmonize_volume(slices, record, model, params)
    np.testing.assert_array_equal(out, again)
    idx = np.flatnonzero(record.harmonize)
    assert out.shape == slices.shape and np.isfinite(out).all()
    np.testing.assert_array_equal(out[~record.harmonize], slices[~record.harmonize])

    def bpd(x):
        with torch.no_grad():
            y = to_flow(torch.from_numpy(x)[:, None])  # bin centres: no dequantisation randomness
            return float(bits_per_dim(model.flow.log_prob(y), y[0].numel()).mean())

    before, after = bpd(slices[idx]), bpd(out[idx])
    # The source start moves little (the README's probe table): the likelihood must rise, not leap.
    assert after < before, (before, after)
    a, b = out[idx].ravel(), slices[idx].ravel()
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.97
    # It did something, if little: the source start moves ~2 of the 4096 quantisation levels on average.
    assert float(np.abs(out[idx] - slices[idx]).mean()) > 1e-4


@pytest.mark.slow
def test_the_demo_runs_offline_with_the_default_model(tmp_path):
    import nibabel as nb

    proc = subprocess.run([sys.executable, "-m", "bidsharmony.demo", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training a tiny" not in proc.stderr  # the shipped model, not the fallback
    sha = json.loads((default_model() / "config.json").read_text())["weights_sha256"]
    inputs = sorted((tmp_path / "bids").rglob("*_T1w.nii.gz"))
    assert len(inputs) == 4
    for src in inputs:
        rel = src.relative_to(tmp_path / "bids")
        out = tmp_path / "out" / rel.parent / src.name.replace("_T1w.nii.gz", "_desc-harmonized_T1w.nii.gz")
        a, b = nb.load(str(src)), nb.load(str(out))
        assert b.shape == a.shape and np.allclose(b.affine, a.affine)
        assert np.isfinite(b.get_fdata()).all()
        side = json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())
        assert side["Model"]["Sha256"] == sha and side["Model"]["Name"] == DEFAULT_MODEL
        # The default: the standardisation, no flow loop (docs/benchmarks/quality.md).
        assert side["Parameters"]["iterations"] == 0 and side["Parameters"]["standardise"] == "landmarks"
        assert side["IntensityScale"] == "standard" and side["FallbackSlices"] == 0
    assert (tmp_path / "out" / "group.tsv").is_file()


def test_the_shipped_denoiser_removes_added_noise_from_a_real_test_head_and_little_else():
    """IXI-HH TEST head IXI012 (never trained on), standardised as harmonization does: with Rician
    noise added (σ 4 % of the head's 99th percentile, the benchmark's noise scanner) the network's
    output is closer to the clean image than the noisy input was; the clean image it changes little."""
    from tests.conftest import SHARED_DATA

    path = SHARED_DATA / "ixi-hh" / "sub-IXI012" / "anat" / "sub-IXI012_T1w.nii.gz"
    if not path.is_file():
        pytest.skip(f"real data not available at {path}")
    pytest.importorskip("torch")
    from bidsharmony.flow.checkpoint import model_denoiser, model_landmarks
    from bidsharmony.image.denoiser import denoise
    from bidsharmony.image.io import load_t1w
    from bidsharmony.image.resample import canonical
    from bidsharmony.image.slices import head_mask
    from bidsharmony.image.standardise import grid_landmarks, standardise
    from bidsharmony.simulation import rician, unit

    net = model_denoiser(default_model())
    assert net is not None
    landmarks, _ = model_landmarks(default_model())
    img, data = load_t1w(path)
    v, affine = canonical(unit(data), img.affine)
    head = head_mask(v)
    noisy = rician(v, np.random.default_rng(0), 0.04 * float(np.percentile(v[head], 99)))

    def on_its_map(x):  # the clean image through the same map, so that only the noise differs
        at = grid_landmarks(x, affine)[0]
        return standardise(x, landmarks, source_landmarks=at), standardise(v, landmarks, source_landmarks=at)

    def rms(a, b):
        return float(np.sqrt(np.mean((a - b)[head] ** 2)))

    src, ref = on_its_map(noisy)
    assert rms(denoise(net, src, affine), ref) < 0.9 * rms(src, ref)  # the probe-trained network: 0.82
    clean, _ = on_its_map(v)
    assert rms(denoise(net, clean, affine), clean) < 0.25 * rms(src, ref)  # the probe-trained network: 0.11
