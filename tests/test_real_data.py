"""The pipeline on real scanner data from ../shared/data (skips where it is absent):
IXI (PSR orientation, 8-bit with scale factor) and studyforrest (0.7 mm, oblique, LAS)."""

import json

import nibabel as nb
import numpy as np
import pytest

from tests.cli.test_cli import _slice_jumps

from .conftest import SHARED_DATA, tree_digest

SOURCES = {
    "ixi": SHARED_DATA / "ixi-hh" / "sub-IXI012" / "anat" / "sub-IXI012_T1w.nii.gz",
    "forrest": SHARED_DATA / "unseen-scanners" / "sub-forrest" / "anat" / "sub-forrest_T1w.nii.gz",
}


@pytest.fixture(scope="module")
def real_bids(tmp_path_factory):
    missing = [str(p) for p in SOURCES.values() if not p.is_file()]
    if missing:
        pytest.skip(f"real data not available: {missing[0]}")
    root = tmp_path_factory.mktemp("real") / "bids"
    (root).mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "real", "BIDSVersion": "1.10.0"}))
    for label, src in SOURCES.items():
        dst = root / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"
        dst.parent.mkdir(parents=True)
        dst.symlink_to(src)
    return root


def test_real_heads_keep_geometry_and_have_no_slice_steps(real_bids, tiny_model, tmp_path):
    from bidsharmony.cli.run import main

    before = tree_digest(real_bids)
    out = tmp_path / "out"
    code = main([str(real_bids), str(out), "participant", "--model", str(tiny_model), "--iterations", "2",
                 "--nprocs", "2", "--omp-nthreads", "1", "-w", str(tmp_path / "w"), "--device", "cpu"])  # fmt: skip
    assert code == 0
    assert tree_digest(real_bids) == before
    for label, src_path in SOURCES.items():
        out_path = out / f"sub-{label}" / "anat" / f"sub-{label}_desc-harmonized_T1w.nii.gz"
        src, img = nb.load(src_path), nb.load(out_path)
        assert img.shape == src.shape
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
        orig = nb.as_closest_canonical(src).get_fdata()
        harm = nb.as_closest_canonical(img).get_fdata()
        assert np.isfinite(harm).all()
        mask = orig > 0.2 * np.percentile(orig, 99)
        assert np.corrcoef(harm[mask], orig[mask])[0, 1] > 0.8
        ratio = _slice_jumps(harm, mask) / _slice_jumps(orig, mask)
        assert ratio < 1.5, f"{label}: slice-to-slice jumps grew {ratio:.2f}x"
        meta = json.loads(out_path.with_name(out_path.name.replace(".nii.gz", ".json")).read_text())
        assert meta["SlicesHarmonized"] > 100
        assert len(meta["ConvergenceTrace"]["similarity"]) == 2


def test_the_shipped_model_brings_a_simulated_scanner_to_the_truth_blind(tmp_path):
    """The default pipeline (standardisation, then the flow loop; 2 iterations to keep it short) with
    the shipped model, on an IXI-HH TEST head through a gamma-1.5 scanner (the benchmark's
    simulation): volume PSNR against the truth gains well over the untreated input, no slice steps
    beyond 1.1× the truth's, and the output correlates with the source at ≥ 0.95 in the head (no
    invented anatomy). Nothing here is fitted on the TEST head."""
    from benchmarks.quality import scores
    from benchmarks.quality.run import load_subject, t1w_path
    from bidsharmony.models import default_model
    from bidsharmony.simulation import simulate
    from bidsharmony.workflows.harmonize import init_harmonize_wf

    data = SHARED_DATA / "ixi-hh"
    if not (data / "derivatives" / "dlmuse").is_dir() or not t1w_path(data, "sub-IXI012").is_file():
        pytest.skip(f"real data not available at {data}")
    assert "IXI012" in {s.removeprefix("sub-") for s in json.loads((data / "splits.json").read_text())["test"]}  # scored, never fitted
    truth, brain, tissue = load_subject(data, "sub-IXI012")
    canon = nb.as_closest_canonical(nb.load(str(t1w_path(data, "sub-IXI012"))))
    source = simulate("gamma1p5", truth, tissue, canon.header.get_zooms()[:3], 0)
    src_path = tmp_path / "sub-sim_T1w.nii.gz"
    nb.Nifti1Image(source, canon.affine).to_filename(src_path)
    wf = init_harmonize_wf(model=default_model(), params={"iterations": 2}, device="cpu")
    wf.base_dir = str(tmp_path / "work")
    wf.get_node("inputnode").inputs.t1w = str(src_path)
    graph = wf.run(plugin="Linear")
    out = next(n for n in graph.nodes() if n.name == "reassemble").result.outputs.out_file
    harmonized = np.asanyarray(nb.as_closest_canonical(nb.load(out)).dataobj, np.float32)
    before, after = scores.score_volume(source, truth, brain), scores.score_volume(harmonized, truth, brain)
    assert after["psnr_vol"] > before["psnr_vol"] + 10, (before["psnr_vol"], after["psnr_vol"])
    assert after["jump_ratio"] <= 1.1
    head = source > 0.1 * np.percentile(source, 99)
    assert np.corrcoef(harmonized[head], source[head])[0, 1] >= 0.95
