"""Model folders through the real CLI: train never writes into what is not its own (the bundled
models, a folder holding a model without --overwrite), replaces a model as a whole, and a model
whose config does not fit its weights is refused in one line before anything is built."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bidsharmony.cli.run import main
from bidsharmony.errors import EXIT_CANT_CREATE, EXIT_NO_INPUT
from bidsharmony.flow.checkpoint import load_model, save_model
from bidsharmony.flow.model import build_flow
from bidsharmony.modelfolder import CARD, CONFIG, WEIGHTS
from bidsharmony.models import BUNDLED, DEFAULT_MODEL

from .conftest import tree_digest

TRAIN = ["train", "--preset", "tiny", "--steps", "2", "--train-batch-size", "2", "--val-every", "2",
         "--checkpoint-every", "2", "--nprocs", "1", "--device", "cpu", "--skip-bids-validation", "--denoiser-steps", "0", "--field-volumes", "0"]  # fmt: skip


def _run(capsys, *args):
    code = main([str(a) for a in args])
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("bidsharmony: error:")]
    return code, errors


@pytest.fixture
def model_folder(tmp_path):
    torch.manual_seed(0)
    flow = build_flow("tiny")
    flow.train()
    flow(torch.rand(2, 1, 144, 176) - 0.5)
    folder = save_model(tmp_path / "lab-model", flow, {"name": "lab-model", "preset": "tiny"})
    (folder / CARD).write_text("# our lab's model: written by hand\n")
    (folder / "notes.txt").write_text("trained on the 2019 scans\n")
    return folder


def test_train_refuses_a_folder_that_holds_a_model(capsys, example_bids, model_folder, tmp_path):
    before = tree_digest(model_folder)
    code, errors = _run(capsys, example_bids, model_folder, *TRAIN, "-w", tmp_path / "work")
    assert code == EXIT_CANT_CREATE and len(errors) == 1
    assert f"{model_folder}: holds a model already; pass --overwrite to replace it, or choose another folder" in errors[0]
    assert tree_digest(model_folder) == before and not (model_folder / "logs").exists() and not (model_folder.parent / f".{model_folder.name}-logs").exists()


@pytest.mark.parametrize("flag", [[], ["--overwrite"]])
def test_train_never_writes_into_the_bundled_models(capsys, example_bids, tmp_path, flag):
    before = tree_digest(BUNDLED)
    for target in (BUNDLED / DEFAULT_MODEL, BUNDLED / "new-model", BUNDLED):
        code, errors = _run(capsys, example_bids, target, *TRAIN, *flag, "-w", tmp_path / "work")
        assert code == EXIT_CANT_CREATE and len(errors) == 1 and "installed bidsharmony package" in errors[0], errors
    assert tree_digest(BUNDLED) == before and not (BUNDLED / "new-model").exists()
    assert not (BUNDLED / DEFAULT_MODEL / "logs").exists()


def test_train_with_overwrite_replaces_the_model_as_a_whole_and_keeps_the_rest(capsys, example_bids, model_folder, tmp_path):
    old_sha = load_model(model_folder).sha256
    code, errors = _run(capsys, example_bids, model_folder, *TRAIN, "--overwrite", "-w", tmp_path / "work")
    assert code == 0, errors
    new = load_model(model_folder)
    assert new.sha256 != old_sha and new.config["training_data"]["dataset"] == str(example_bids)
    assert "written by hand" not in (model_folder / CARD).read_text()  # the old model's card went with it
    assert (model_folder / "notes.txt").read_text() == "trained on the 2019 scans\n"  # not the model's: kept
    assert (model_folder / "checkpoint" / "state.json").is_file() and any((model_folder.parent / f".{model_folder.name}-logs").iterdir())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [f".{model_folder.name}-logs"]  # nothing left aside but the logs
    code, errors = _run(capsys, example_bids, model_folder, *TRAIN, "-w", tmp_path / "work")  # finished: not resumed
    assert code == EXIT_CANT_CREATE and "--overwrite" in errors[0]


@pytest.mark.parametrize("method", ["flow", "bhdiff"])
def test_a_model_config_that_does_not_fit_its_weights_is_one_line_before_anything_is_built(capsys, example_bids, model_folder, tmp_path, method):
    if method == "bhdiff":
        from bidsharmony.bhdiff.checkpoint import save_bhdiff_model
        from bidsharmony.bhdiff.unet import build_unet

        shutil.rmtree(model_folder)
        save_bhdiff_model(model_folder, build_unet("tiny"), {"name": "t"})
    cfg = json.loads((model_folder / CONFIG).read_text())
    cfg["architecture"]["hidden" if method == "flow" else "base"] = 10**6  # tens of terabytes
    (model_folder / CONFIG).write_text(json.dumps(cfg))
    code, errors = _run(capsys, example_bids, tmp_path / "out", "participant", "--method", method, "--model", model_folder,
                        "--participant-label", "01", "--device", "cpu", "--skip-bids-validation")  # fmt: skip
    assert code == EXIT_NO_INPUT and len(errors) == 1
    assert f"{model_folder / WEIGHTS}: weights do not match the architecture in {CONFIG}" in errors[0]
