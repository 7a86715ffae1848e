"""The GPU window's script, on the CPU: its data file, its pieces, and a whole dry run under a deadline,
so that the command cannot rot between the rare windows a GPU machine is lent."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_window_io as gwio  # noqa: E402


def test_codes_round_trip_exactly():
    rng = np.random.default_rng(0)
    for bits in (8, 10, 12):
        codes = rng.integers(0, 2**bits, (3, 16, 32)).astype(np.uint16)
        codes[0] = 0
        codes[1] = 2**bits - 1
        assert np.array_equal(gwio.decode(gwio.encode(codes), codes.shape), codes)


def test_coarse_codes_are_dithered_back_onto_the_12bit_grid():
    x = np.linspace(0, 1, 10_000, dtype=np.float32).reshape(1, 100, 100)
    c10 = gwio.to_codes(x, 10)
    plain = gwio.to_12bit(c10, 10)
    assert len(np.unique(plain)) <= 1024  # a comb without dithering
    d = gwio.to_12bit(c10, 10, np.random.default_rng(0))
    assert len(np.unique(d)) > 3000 and np.abs(d.astype(int) - np.round(x * 4095)).max() <= 4  # two half bins of 4 codes
    assert np.array_equal(gwio.to_12bit(gwio.to_codes(x, 12), 12), np.round(x * 4095))


def test_data_file_keeps_sets_subjects_and_meta(tmp_path):
    meta = {"note": "x"}
    w = gwio.Writer(meta)
    a = np.arange(2 * 16 * 16, dtype=np.uint16).reshape(2, 16, 16) % 1024
    w.add("train", a, [0, 0], [3, 4])
    w.add("train", a[:1], [1], [5])
    w.add("val", a[:1] * 4)
    w.arrays["target_histogram"] = np.ones(4, np.float32)
    meta["train"] = {"subjects": ["A", "B"]}  # added after the chunks: still written
    w.write(tmp_path / "d.npz")
    m, arrays = gwio.read(tmp_path / "d.npz")
    assert m["train"]["subjects"] == ["A", "B"] and m["shapes"]["train"] == [3, 16, 16] and m["version"] == gwio.VERSION
    assert np.array_equal(arrays["train"], np.concatenate([a, a[:1]])) and np.array_equal(arrays["val"], a[:1] * 4)
    assert arrays["train_subject"].tolist() == [0, 0, 1] and arrays["train_position_bin"].tolist() == [3, 4, 5]


def test_flops_counted_on_a_small_slice_scale_to_the_full_grid():
    from gpu_window import flops_per_slice_iteration
    from torch.utils.flop_counter import FlopCounterMode

    from bidsharmony.flow.model import PRESETS, build_flow
    from bidsharmony.harmonize.solvers import HarmonizeParams, harmonize_slices

    p = HarmonizeParams(iterations=1, batch_size=1)
    counter = FlopCounterMode(display=False)
    with counter:
        harmonize_slices(build_flow("tiny").eval(), torch.rand(1, 144, 176), p)
    scaled = flops_per_slice_iteration(PRESETS["tiny"], p)
    assert scaled == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_bf16_conditioners_are_put_back():
    from gpu_window import conditioners_in

    from bidsharmony.flow.coupling import Conditioner
    from bidsharmony.flow.model import build_flow
    from bidsharmony.flow.scaling import to_flow

    torch.manual_seed(0)
    flow = build_flow("tiny").train()
    x = to_flow(torch.rand(2, 1, 144, 176))
    with torch.no_grad():
        flow(x)
        for m in flow.modules():
            if isinstance(m, Conditioner):
                m.net[-1].weight.normal_(0, 0.05)
        flow.eval()
        z, _ = flow(x)
        with conditioners_in(flow, torch.bfloat16):
            zb, _ = flow(x)
            assert (flow.inverse(zb) - x).abs().max() < 1e-4
        assert not torch.equal(z, zb) and (z - zb).abs().max() < 0.1
        assert all("forward" not in vars(m) for m in flow.modules() if isinstance(m, Conditioner))
        assert torch.equal(flow(x)[0], z)


def test_warm_start_is_the_newest_folder_of_the_preset(tmp_path):
    from gpu_window import pick_warm_start

    def folder(name, preset, finished):
        (tmp_path / name).mkdir()
        cfg = {"format": "bidsharmony-flow", "preset": preset, "training": {"finished_unix": finished}}
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        return tmp_path / name

    old, new = folder("old", "paper", 1.0), folder("new", "paper", 2.0)
    folder("fast", "fast", 3.0)
    assert pick_warm_start([tmp_path], "paper") == new
    assert pick_warm_start([old], "paper") == old
    assert pick_warm_start([tmp_path], "tiny") is None


def test_cuda_tests_run_as_plain_functions_without_pytest():
    code = f"import sys; sys.path.insert(0, {str(BENCH)!r}); sys.path.insert(0, {str(REPO)!r}); import gpu_window; gpu_window.plain_tests()"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    outcomes = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(outcomes) >= 5
    assert set(outcomes.values()) == ({"passed"} if torch.cuda.is_available() else {"skipped"})


@pytest.fixture(scope="module")
def window_data(tmp_path_factory):
    """A small data file cut from the example dataset by the prepare step (no wheels: this
    environment has zuko and pytest)."""
    from gpu_window_prepare import DATA_FILE, prepare

    from bidsharmony.example import build_example

    root = build_example(tmp_path_factory.mktemp("bids") / "bids")
    out = tmp_path_factory.mktemp("gw-data")
    meta = prepare(root, ["01"], ["02"], out, 8 * 2**20, slice_step=2, val_step=2, cache=None, wheels=False,
                   reference=REPO / "bidsharmony" / "data" / "models" / "ixi-hh-fast", log=lambda *_: None)  # fmt: skip
    return out / DATA_FILE, meta


def test_prepare_writes_train_validation_and_test_slices(window_data):
    path, meta = window_data
    m, arrays = gwio.read(path)
    assert m["train"]["subjects"] == ["01"] and m["test"]["subject"] == "02" and m["split"]["test_subjects"] == ["02"]
    assert arrays["train"].shape[1:] == (144, 176) and len(arrays["train"]) == m["train"]["slices"] > 10
    assert arrays["train"].max() < 2 ** m["train"]["bits"] and arrays["val"].max() < 4096
    assert len(arrays["test"]) == m["test"]["slices"] > 10 and arrays["start_images"].shape == (50, 144, 176)
    assert m["reference"]["name"] == "ixi-hh-fast" and 0 < m["reference"]["validation_bpd_here"] < 16
    assert m["preprocessing"]["slice_shape"] == [144, 176]


def test_dry_run_on_the_cpu_meets_its_deadline(window_data, tmp_path):
    """The GPU window's command on the CPU with `tiny` and a 60 s deadline: every stage, results
    file, a model folder the project's loader reads, and no nibabel/pybids/nipype/antspyx."""
    from bidsharmony.flow.checkpoint import load_model

    path, _ = window_data
    out = tmp_path / "out"
    cmd = [sys.executable, str(BENCH / "gpu_window.py"), "--deadline", "60", "--preset", "tiny", "--device", "cpu",
           "--data", str(path), "--out", str(out), "--threads", "1", "--max-model-mb", "1", "--all-rows", "--warm-start"]  # fmt: skip
    t = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=150)
    wall = time.monotonic() - t
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert wall < 60 + 15, wall  # the deadline counts from the script's first line; interpreter start-up aside
    res = json.loads((out / "gpu_window-cpu.json").read_text())
    assert res["wall_s"] <= 60 and res["deadline_s"] == 60
    assert [s["stage"] for s in res["stages"]] == ["cuda tests", "loop speed", "training"]
    assert all(s["status"] == "done" for s in res["stages"]), res["stages"]
    assert res["tests"]["status"] == "skipped" and res["tests"]["counts"].get("skipped", 0) >= 5

    assert {(r_["model"], r_["dtype"]) for r_ in res["speed"]["rows"]} == {(m, d) for m in ("tiny", "fast", "default", "paper") for d in ("fp32", "bf16")}
    rows = {r_["model"]: r_ for r_ in res["speed"]["rows"] if r_["dtype"] == "fp32" and not r_["cudnn_benchmark"]}
    tiny = rows["tiny"]
    assert tiny["status"] == "measured" and tiny["s_per_volume"] > 0 and tiny["slices_per_s"] > 0
    assert tiny["gflop_per_volume"] == pytest.approx(0.1074 * tiny["slices"] * 10, rel=0.05)
    assert rows["paper"]["gflop_per_volume"] > 1000 * tiny["gflop_per_volume"]
    assert all(r_["status"] == "measured" or r_["status"].startswith("skipped") for r_ in res["speed"]["rows"])

    tr = res["train"]
    assert tr["steps"] > 0 and tr["improved"] and tr["warm_start"] is None
    model = load_model(tr["model_folder"])
    assert model.config["preset"] == "tiny" and model.sha256 == tr["weights_sha256"]
    assert model.config["validation_bpd"] == pytest.approx(tr["validation_bpd"], abs=1e-4)
    assert tr["reloaded_validation_bpd"] == pytest.approx(tr["validation_bpd"], abs=1e-4)
    assert model.extras["start_images"].shape == (50, 144, 176) and "target_histogram" in model.extras
    assert model.config["training_data"]["subjects_train"] == ["01"] and tr["model_mb"] < 45
    # --max-model-mb 1 takes the path `paper` takes on a GPU: float16 weights, scored as stored
    assert tr["storage_dtype"] == model.config["storage_dtype"] == "float16"

    md = (out / "gpu_window-cpu.md").read_text()
    for heading in ("## 1. CUDA tests", "## 2. Harmonization loop per volume", "## 3. Training"):
        assert heading in md
