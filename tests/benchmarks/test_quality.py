"""The benchmark's parts on cases with known answers, and its quick mode end to end on real data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.quality import scores
from benchmarks.quality.peers import make_peers
from bidsharmony.simulation import SCANNERS, simulate, smooth_field
from tests.conftest import SHARED_DATA


def phantom(seed: int = 0):
    """A smooth three-tissue 'brain' (CSF 0.3, GM 0.6, WM 0.9) in a background of 0, RAS axes."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (40, 44, 36)], indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    tissue = np.select([r < 0.35, r < 0.6, r < 0.8], [3, 2, 1], 0).astype(np.uint8)
    v = np.choose(tissue, [0.0, 0.3, 0.6, 0.9]).astype(np.float32) + 0.01 * rng.standard_normal(r.shape).astype(np.float32)
    return np.clip(v, 0, None), tissue > 0, tissue


def test_psnr_known_values():
    a = np.zeros((10, 10))
    assert scores.psnr(a, a) == float("inf")
    assert scores.psnr(a, a + 0.1) == pytest.approx(20.0)
    assert scores.psnr(a, a + 0.01) == pytest.approx(40.0)


def test_scores_of_identical_volumes_are_perfect_and_affine_invariant():
    v, mask, _ = phantom()
    s = scores.score_volume(3.0 * v + 100.0, v, mask)  # another unit system, same image
    assert s["psnr_vol"] > 60 and s["psnr_slice"] > 60
    assert s["ssim_vol"] == pytest.approx(1.0, abs=1e-6) and s["ssim_slice"] == pytest.approx(1.0, abs=1e-6)
    assert s["ncc_vol"] == pytest.approx(1.0, abs=1e-6)
    assert s["dice"] == 1.0 and s["jump_ratio"] == pytest.approx(1.0, abs=1e-4) and s["profile_rmse"] < 1e-5


def test_a_truth_segmented_once_scores_as_one_segmented_per_call():
    """The benchmark segments each truth once and passes it on: the scores must be those of the
    call that segments it itself, and a different labelling must change them (it is used)."""
    v, mask, _ = phantom()
    out = np.sqrt(np.clip(v, 0, None)) + 0.05 * np.random.default_rng(0).standard_normal(v.shape)
    seg = scores.segment(v, mask)
    assert scores.score_volume(out, v, mask, seg) == scores.score_volume(out, v, mask)
    other = np.where(seg == 2, 3, seg).astype(seg.dtype)  # grey matter relabelled white
    assert scores.score_volume(out, v, mask, other)["dice"] < scores.score_volume(out, v, mask)["dice"]


def test_a_known_shift_lowers_the_volume_psnr_by_the_expected_amount():
    v, mask, _ = phantom()
    scaled = scores.robust_scale(v, mask)
    # A shift of 0.1 of the 1–99 % range on half the brain's voxels: MSE 0.005 → 23 dB.
    shifted = scaled.copy()
    idx = np.flatnonzero(mask.ravel())[::2]
    shifted.ravel()[idx] += 0.1
    assert scores.psnr(shifted[mask], scaled[mask]) == pytest.approx(10 * np.log10(1 / 0.005), abs=0.1)


def test_dice_known_overlap():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 voxels
    b[1:3] = True  # 8 voxels, 4 shared
    assert scores.dice(a, b) == pytest.approx(0.5)
    assert scores.dice(a, a) == 1.0
    assert scores.dice(a, ~a) == 0.0


def test_kmeans_finds_three_separated_classes():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(c, 0.02, 500) for c in (0.2, 0.5, 0.9)])
    centres, labels = scores.kmeans1d(rng.permutation(x))
    np.testing.assert_allclose(centres, [0.2, 0.5, 0.9], atol=0.01)
    assert sorted(np.bincount(labels)) == [500, 500, 500]


def test_tissue_dice_and_gm_wm_ratio_on_the_phantom():
    v, mask, tissue = phantom()
    np.testing.assert_array_equal(scores.segment(v, mask), tissue)
    assert scores.gm_wm_ratio(v, mask) == pytest.approx((0.6 - 0.3) / (0.9 - 0.3), abs=0.03)  # robust-scaled: p1 ≈ CSF


def test_slice_steps_are_seen_by_the_consistency_score():
    v, mask, _ = phantom()
    stepped = v * (1 + 0.2 * (np.arange(v.shape[2]) % 2))[None, None, :]  # every other axial slice 20 % brighter
    s = scores.consistency_scores(stepped, v, mask)
    assert s["jump_ratio"] > 2 and s["profile_rmse"] > 0.05


def test_histogram_distance_is_zero_for_the_same_distribution_and_grows_with_change():
    v, mask, _ = phantom()
    ref = scores.brain_sample(v, mask, seed=1)
    same = scores.histogram_distance(v, mask, ref)
    changed = scores.histogram_distance(v**2, mask, ref)
    assert same < 0.01 < changed


def test_tissue_classes_group_labels_by_brightness():
    v, mask, tissue = phantom()
    labels = tissue.astype(np.int32) * 10 + (np.arange(v.shape[0])[:, None, None] > 20) * mask  # two labels per class
    np.testing.assert_array_equal(scores.tissue_classes(v, labels), tissue)


@pytest.mark.parametrize("name", list(SCANNERS))
def test_every_scanner_is_seeded_finite_and_keeps_the_grid(name):
    v, _, tissue = phantom()
    a = simulate(name, v, tissue, (2.0, 2.0, 2.0), seed=3)
    b = simulate(name, v, tissue, (2.0, 2.0, 2.0), seed=3)
    assert a.shape == v.shape and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    if SCANNERS[name].kind == "monotone":  # a monotone map keeps the voxels' order
        order = np.argsort(v.ravel(), kind="stable")
        assert np.all(np.diff(a.ravel()[order]) >= -1e-4)


def test_physical_scanners_do_what_they_say():
    v, mask, tissue = phantom()
    field = smooth_field(v.shape, np.random.default_rng(0), amplitude=1.4)
    assert 1 / 1.4 - 1e-4 <= field.min() < 0.95 and 1.05 < field.max() <= 1.4 + 1e-4
    contrast = simulate("contrast", v, tissue, (2, 2, 2), seed=0)
    assert scores.gm_wm_ratio(contrast, mask) > scores.gm_wm_ratio(v, mask) + 0.1  # GM moved toward WM
    noisy = simulate("noise", v, tissue, (2, 2, 2), seed=0)
    assert scores.volume_scores(noisy, v, mask)["psnr_vol"] < 35
    with pytest.raises(ValueError, match="unknown simulated scanner"):
        simulate("nope", v, tissue, (2, 2, 2), seed=0)


def test_histogram_matching_undoes_a_monotone_change_and_peers_run():
    v, mask, tissue = phantom()
    peers = {p.name: p for p in make_peers()}
    hm = peers["histmatch"].fit([v], [mask])
    source = simulate("gamma1p5", v, tissue, (2, 2, 2), seed=0)
    assert scores.volume_scores(hm.apply(source, mask), v, mask)["psnr_vol"] > scores.volume_scores(source, v, mask)["psnr_vol"] + 5
    nyul = peers["nyul"].fit([v, v * 2], [mask, mask])
    for out in (nyul.apply(source, mask), peers["whitestripe"].apply(source, mask)):
        assert out.shape == v.shape and np.isfinite(out).all()
    z = peers["zscore"].apply(source, mask)
    assert z[mask].mean() == pytest.approx(0, abs=1e-4) and z[mask].std() == pytest.approx(1, abs=1e-3)
    np.testing.assert_array_equal(peers["none"].apply(source, mask), source)


def test_quick_mode_runs_the_real_cli_end_to_end(tmp_path):
    ixi = SHARED_DATA / "ixi-hh"
    if not (ixi / "splits.json").is_file():
        pytest.skip(f"real data not available at {ixi}")
    from benchmarks.quality.run import main

    code = main(["--quick", "--data", str(ixi), "--subjects", "1", "--scanners", "gamma0p7", "--unseen", "none",
                 "--train-subjects", "3", "--cli-args", "--iterations 2 --nprocs 2", "--work", str(tmp_path / "work"),
                 "--out", str(tmp_path / "res")])  # fmt: skip
    assert code == 0
    md = (tmp_path / "res" / "quality-quick.md").read_text()
    result = json.loads((tmp_path / "res" / "quality-quick.json").read_text())
    assert "| **bidsharmony** |" in md and "sha256" in md
    methods = {r["method"] for r in result["rows"]}
    assert methods == {"none", "histmatch", "nyul", "zscore", "whitestripe", "bidsharmony"}
    assert all(np.isfinite(r["psnr_vol"]) and 0 < r["ssim_slice"] <= 1 for r in result["rows"])
    assert (tmp_path / "res" / "quality-quick-examples.png").stat().st_size > 1000
    # The simulated source never replaces the truth: the input dataset is untouched, the source differs.
    none = next(r for r in result["rows"] if r["method"] == "none")
    assert none["psnr_vol"] < 40


def test_report_scores_the_3d_method_beside_the_2d_one_on_its_own_cases(tmp_path):
    from benchmarks.quality.plan import BHDIFF, METHOD, METRICS
    from benchmarks.quality.report import write_report
    from benchmarks.quality.run import parse_args

    args = parse_args(["--scanners", "gamma0p7,bias,noise", "--ablations", "none", "--bhdiff-model", "m",
                       "--bhdiff-scanners", "bias,noise,blur", "--out", str(tmp_path)])  # fmt: skip
    assert args.bhdiff_scanners == ["bias", "noise"]  # only scanners that are simulated
    assert parse_args(["--ablation-scanners", "bias"]).bhdiff_scanners == ["bias"]  # default: the ablation cases
    with pytest.raises(SystemExit):
        parse_args(["--bhdiff-scanners", "bias,nonsense"])
    methods = [p.name for p in make_peers()] + [METHOD]
    rows = []
    for scanner in ("gamma0p7", "bias", "noise"):
        for i, m in enumerate(methods + ([BHDIFF] if scanner != "gamma0p7" else [])):
            rows.append({"subject": "sub-1", "scanner": scanner, "kind": SCANNERS[scanner].kind, "method": m,
                         **{k: 20.0 + i for k in METRICS}, "seconds": 1.0 + i})  # fmt: skip
    bh = {"Name": "bh-small", "Preset": "small", "Sha256": "ab" * 32}
    write_report(args, rows, [], {}, model={"Name": "x", "Preset": "fast", "Sha256": "cd" * 32}, bhdiff_model=bh,
                 target_gm_wm=1.0, walls={METHOD: None, BHDIFF: 20.0}, seconds_total=1.0, train=[], test=["sub-1"])  # fmt: skip
    md = (tmp_path / "quality.md").read_text()
    section = md.split("## The 3D method beside the 2D one")[1]
    assert "2 case(s): sub-1/bias, sub-1/noise" in section and "`bh-small` (small)" in section
    bh_line = next(line for line in section.splitlines() if line.startswith("| bidsharmony --method bhdiff"))
    assert bh_line.split("|")[2].strip() == f"**{20.0 + len(methods):.2f}**"  # the best PSNR, in bold
    main_part = md.split("## The 3D method")[0]
    assert "| bidsharmony --method bhdiff" not in main_part  # the tables over all scanners: 2D and peers only
    assert "bidsharmony --method bhdiff (3D) 10.0 s" in main_part  # its CLI wall time per volume: 20 s over 2 volumes
    assert "bidsharmony reused from an earlier run" in main_part  # a resumed run's wall time is not reported as the method's
    assert json.loads((tmp_path / "quality.json").read_text())["bhdiff_model"] == bh


def test_biology_section_reports_each_methods_change_of_the_gm_fraction_age_correlation():
    """Known answers: a method whose GM fractions are the truth's keeps r exactly (Δr 0); one that
    reverses their order with age loses it and is marked; scores.gm_fraction counts label 2."""
    from benchmarks.quality.report import biology_section
    from benchmarks.quality.scores import correlation, gm_fraction

    assert gm_fraction(np.array([0, 1, 2, 2, 3])) == 0.5
    assert np.isnan(correlation([1, 2], [3, 4])) and correlation([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    ages = {"sub-1": 20.0, "sub-2": 40.0, "sub-3": 60.0, "sub-4": 80.0}
    truth = {"sub-1": 0.50, "sub-2": 0.47, "sub-3": 0.45, "sub-4": 0.41}  # GM falls with age
    biology = {s: {"age": a, "gm_fraction_truth": truth[s]} for s, a in ages.items()}
    rows = [{"method": "keeps", "scanner": "bias", "subject": s, "gm_fraction": truth[s]} for s in ages]
    rows += [{"method": "breaks", "scanner": "bias", "subject": s, "gm_fraction": 0.9 - truth[s]} for s in ages]
    lines = biology_section(rows, ["keeps", "breaks"], biology, {})
    row = next(line for line in lines if line.startswith("| bias"))
    keeps, breaks = (c.strip() for c in row.strip("|").split("|")[1:])
    assert keeps == "+0.000"
    assert breaks.endswith("✗") and float(breaks.split()[0]) > 1.5  # r flipped from about −0.99 to +0.99


def test_the_report_separates_distortions_seen_in_training_from_those_never_seen():
    """Known answers: bidsharmony 2 dB over the best peer on the noise scanner (a family its training
    drew), 1 dB under it on the others; the two rows say so, each against that group's best peer."""
    from benchmarks.quality.plan import METHOD
    from benchmarks.quality.report import seen_section

    psnr = {("noise", "histmatch"): 25.0, ("noise", "nyul"): 26.0, ("noise", METHOD): 28.0,
            ("bias", "histmatch"): 23.5, ("bias", "nyul"): 23.0, ("bias", METHOD): 23.0,
            ("gamma0p7", "histmatch"): 38.0, ("gamma0p7", "nyul"): 39.0, ("gamma0p7", METHOD): 38.0}  # fmt: skip
    rows = [{"scanner": s, "method": m, "subject": "sub-1", "psnr_vol": v} for (s, m), v in psnr.items()]
    lines = seen_section(rows, ["histmatch", "nyul"], ["noise"])
    seen = next(line for line in lines if line.startswith("| seen in training"))
    never = next(line for line in lines if line.startswith("| never seen"))
    assert "| noise | 1 | 28.00 | 26.00 (nyul) | +2.00 |" in seen
    assert "| 2 | 30.50 | 31.00 (nyul) | -0.50 |" in never and "monotone" in never and "spatial" in never
    assert not any(line.startswith("| seen in training") for line in seen_section(rows, ["histmatch", "nyul"], []))
