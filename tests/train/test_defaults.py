"""Training as a user runs it: defaults that fit the device, progress in the log, a clean model
folder with logs and work beside it, --model-name, and a validation split that holds for few subjects."""

import json
import logging
import re
from types import SimpleNamespace

import numpy as np
import pytest

from bidsharmony.cli.parser import build_parser
from bidsharmony.cli.run import main
from bidsharmony.cli.train import train_params
from bidsharmony.train.data import SliceSet, split_by_subject
from bidsharmony.train.loop import progress_line

TRAIN = ["train", "--preset", "tiny", "--steps", "4", "--train-batch-size", "2", "--val-every", "2",
         "--checkpoint-every", "2", "--nprocs", "1", "--device", "cpu", "--skip-bids-validation", "--denoiser-steps", "0", "--field-volumes", "0"]  # fmt: skip


def _opts(**kw):
    base = {"method": "flow", "steps": None, "train_batch_size": None}
    return SimpleNamespace(**{**base, **kw})


def test_defaults_fit_the_device_and_are_logged(caplog):
    caplog.set_level(logging.INFO, logger="bidsharmony")
    assert train_params(_opts(), "cpu") == (2000, 32)
    assert train_params(_opts(), "cuda:0") == (10000, 256)
    assert train_params(_opts(steps=7, train_batch_size=3), "cuda") == (7, 3)
    assert train_params(_opts(method="bhdiff"), "cpu") == (20000, 2)
    text = caplog.text
    assert "training on cpu: steps 2000 (defaults for a CPU), batch size 32 (defaults for a CPU)" in text
    assert "steps 10000 (defaults for a GPU), batch size 256 (defaults for a GPU)" in text
    assert "steps 7 (--steps), batch size 3 (--train-batch-size)" in text


def test_parser_defaults_are_none_and_model_name_is_a_label():
    p = build_parser()
    opts = p.parse_args(["bids", "out", "train"])
    assert opts.steps is None and opts.train_batch_size is None and opts.model_name is None
    assert p.parse_args(["bids", "out", "train", "--model-name", "site-A_3T.v2"]).model_name == "site-A_3T.v2"
    for bad in ("../x", "a b", "", ".hidden", "a/b"):
        with pytest.raises(SystemExit):
            p.parse_args(["bids", "out", "train", "--model-name", bad])


def test_progress_line_reads_like_a_report():
    line = progress_line(500, 2000, 0, [3.0] * 500, 3.5, 192.0)
    assert line == "training 25% (500/2000 steps), loss 3.000, val 3.500 bits/dim, 3.2 min elapsed, ~9.6 min left"
    assert "left" not in progress_line(2000, 2000, 0, [3.0], 3.5, 600.0)
    assert "val - (not yet)" in progress_line(100, 2000, 0, [3.0], None, 6.0)


def _set(subjects, per=10):
    subj = np.repeat(np.array(subjects), per)
    return SliceSet(np.arange(len(subj) * 4, dtype=np.uint16).reshape(-1, 2, 2), subj, np.zeros(len(subj), int))


@pytest.mark.parametrize("n", [2, 3, 5, 9])
def test_split_holds_out_one_subject_at_least_and_trains_on_one(n):
    train, val = split_by_subject(_set([f"s{i}" for i in range(n)]), 0.1, seed=0)
    assert len(set(val.subject)) == 1 and len(set(train.subject)) == n - 1
    assert set(train.subject).isdisjoint(val.subject)
    _, val = split_by_subject(_set([f"s{i}" for i in range(n)]), 0.99, seed=0)
    assert len(set(val.subject)) == n - 1  # never all


def test_one_subject_validates_on_a_contiguous_block(caplog):
    caplog.set_level(logging.INFO, logger="bidsharmony")
    data = _set(["only"], per=40)
    train, val = split_by_subject(data, 0.1, seed=0)
    rows = [int(c[0, 0]) // 4 for c in val.codes]
    assert len(val) == 4 and rows == list(range(rows[0], rows[0] + 4))  # contiguous, not every 10th
    assert len(train) == 36 and not set(rows) & {int(c[0, 0]) // 4 for c in train.codes}
    assert "one subject only: validating on a held-out contiguous block of 4 of its 40 slices" in caplog.text
    train, val = split_by_subject(_set(["only"], per=3), 0.0, seed=0)
    assert len(val) == 1 and len(train) == 2


def test_train_level_publishes_a_clean_model_folder(example_bids, tmp_path, capsys):
    folder = tmp_path / "models" / "scanner"
    code = main([str(example_bids), str(folder), *TRAIN, "--model-name", "site-A"])
    err = capsys.readouterr().err
    assert code == 0, err
    names = sorted(p.name for p in folder.iterdir())
    figures = {n for n in names if n.endswith(".png")}
    assert {"model.safetensors", "config.json", "MODEL_CARD.md"} <= set(names)
    # checkpoint/: the training state a later --overwrite run resumes from; nothing else
    assert set(names) - figures - {"checkpoint"} == {"model.safetensors", "config.json", "MODEL_CARD.md"}, names
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["name"] == "site-A"
    assert cfg["training"]["steps"] == 4 and cfg["training"]["batch_size"] == 2
    assert len(cfg["training_data"]["subjects_validation"]) == 1 and len(cfg["training_data"]["subjects_train"]) == 1
    logs = tmp_path / "models" / ".scanner-logs"
    assert (tmp_path / "models" / ".scanner-work").is_dir()
    logged = "".join(p.read_text() for p in logs.glob("bidsharmony-*.log"))
    assert re.search(r"training 50% \(2/4 steps\), loss [\d.]+, val [\d.]+ bits/dim, [\d.]+ min elapsed, ~[\d.]+ min left", logged)
    assert "training 100% (4/4 steps)" in logged and "training 100% (4/4 steps)" in err
    assert "steps 4 (--steps), batch size 2 (--train-batch-size)" in logged


@pytest.mark.parametrize("which", ["logs", "work"])
def test_a_file_where_the_train_side_folders_go_is_refused_before_anything_is_written(example_bids, tmp_path, capsys, which):
    blocker = tmp_path / f".scanner-{which}"
    blocker.write_text("x")
    code = main([str(example_bids), str(tmp_path / "scanner"), *TRAIN])
    err = capsys.readouterr().err
    assert code != 0 and f"{blocker}: exists and is not a directory" in err
    assert not (tmp_path / "scanner").exists()
