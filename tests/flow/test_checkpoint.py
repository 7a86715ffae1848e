import json
import pickle

import pytest
import torch

from bidsharmony.errors import ModelError
from bidsharmony.flow.checkpoint import CONFIG, WEIGHTS, load_model, save_model
from bidsharmony.flow.model import build_flow


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    flow = build_flow("tiny")
    flow.train()
    flow(torch.rand(4, 1, 144, 176) - 0.5)
    flow.eval()
    folder = save_model(tmp_path / "m", flow, {"name": "m", "preset": "tiny"}, extras={"start_images": torch.rand(50, 144, 176)})
    return flow, folder


def test_save_load_gives_identical_outputs(saved):
    flow, folder = saved
    loaded = load_model(folder)
    x = torch.rand(2, 1, 144, 176) - 0.5
    with torch.no_grad():
        torch.testing.assert_close(loaded.flow(x)[0], flow(x)[0], rtol=0, atol=0)
    assert loaded.extras["start_images"].shape == (50, 144, 176)
    assert len(loaded.sha256) == 64 and loaded.config["preset"] == "tiny"


def test_half_precision_storage_loads_as_float32(saved, tmp_path):
    flow, _ = saved
    folder = save_model(tmp_path / "h", flow, {"name": "h"}, half=True)
    loaded = load_model(folder)
    assert loaded.config["storage_dtype"] == "float16"
    assert all(p.dtype == torch.float32 for p in loaded.flow.parameters())


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        load_model(tmp_path / "nope")


def test_missing_weights(saved):
    _, folder = saved
    (folder / WEIGHTS).unlink()
    with pytest.raises(ModelError, match=f"{WEIGHTS}: missing"):
        load_model(folder)


def test_truncated_weights(saved):
    _, folder = saved
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="sha256 does not match"):
        load_model(folder)
    with pytest.raises(ModelError, match="not a readable safetensors"):
        load_model(folder, verify_hash=False)


def test_config_that_does_not_match_the_weights(saved):
    _, folder = saved
    cfg = json.loads((folder / CONFIG).read_text())
    cfg["architecture"]["hidden"] = 16
    (folder / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="do not match the architecture"):
        load_model(folder)


def test_pickle_offered_as_model_is_refused_without_unpickling(saved, tmp_path):
    _, folder = saved
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / WEIGHTS).write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ModelError):
        load_model(folder, verify_hash=False)
    assert not marker.exists()


def test_invalid_config_json(saved):
    _, folder = saved
    (folder / CONFIG).write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(folder)


def test_a_card_is_generated_from_the_config_and_a_hand_written_one_is_kept(saved):
    from bidsharmony.flow.checkpoint import CARD, GENERATED

    flow, folder = saved
    cfg = json.loads((folder / CONFIG).read_text())
    card = (folder / CARD).read_text()
    assert card.startswith(GENERATED) and cfg["weights_sha256"] in card and "normalizing-flow" in card
    save_model(folder, flow, {"name": "again"})
    assert "Model card: again" in (folder / CARD).read_text()  # a generated card follows the config
    (folder / CARD).write_text("# my own card\n")  # the generated line deleted: the user's edits stay
    save_model(folder, flow, {"name": "once more"})
    assert (folder / CARD).read_text() == "# my own card\n"
