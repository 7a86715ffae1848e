import json
import os
import pickle

import pytest
import torch

from bidsharmony.errors import ModelError
from bidsharmony.flow.checkpoint import load_model, save_model
from bidsharmony.flow.model import build_flow
from bidsharmony.modelfolder import CONFIG, WEIGHTS


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
    from bidsharmony.modelfolder import CARD, GENERATED

    flow, folder = saved
    cfg = json.loads((folder / CONFIG).read_text())
    card = (folder / CARD).read_text()
    assert card.startswith(GENERATED) and cfg["weights_sha256"] in card and "normalizing-flow" in card
    save_model(folder, flow, {"name": "again"})
    assert "Model card: again" in (folder / CARD).read_text()  # a generated card follows the config
    (folder / CARD).write_text("# my own card\n")  # the generated line deleted: the user's edits stay
    save_model(folder, flow, {"name": "once more"})
    assert (folder / CARD).read_text() == "# my own card\n"


# --- model folders: publication, permissions, validation before allocation --------------------------------------


def _other_weights(flow, seed=1):
    """The same architecture with other weights."""
    other = build_flow("tiny")
    other.load_state_dict(flow.state_dict())
    with torch.no_grad():
        next(other.parameters()).add_(seed)
    return other


def _dead_pid() -> int:
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _hidden_leftovers(folder):
    return sorted(p.name for p in [*folder.parent.iterdir(), *folder.iterdir()] if p.name.startswith(f".{folder.name}."))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_model_files_get_the_mode_the_umask_gives(saved, tmp_path, umask, mode):
    import stat

    from bidsharmony.modelfolder import CARD, write_safetensors

    flow, _ = saved
    previous = os.umask(umask)
    try:
        folder = save_model(tmp_path / "shared", flow, {"name": "shared"})
        write_safetensors({"x": torch.zeros(3)}, tmp_path / "state.safetensors")
    finally:
        os.umask(previous)
    for path in (folder / WEIGHTS, folder / CONFIG, folder / CARD, tmp_path / "state.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_a_new_model_replaces_the_old_ones_card_and_keeps_what_is_not_the_models(saved):
    from bidsharmony.modelfolder import CARD, GENERATED

    flow, folder = saved
    (folder / CARD).write_text("# card of the old weights\n")
    (folder / "notes.txt").write_text("lab notes\n")
    (folder / "checkpoint").mkdir()
    (folder / "checkpoint" / "state.json").write_text("{}")
    save_model(folder, _other_weights(flow), {"name": "new"})
    card = (folder / CARD).read_text()
    assert card.startswith(GENERATED) and "Model card: new" in card  # not the stale hand-written card
    assert (folder / "notes.txt").read_text() == "lab notes\n" and (folder / "checkpoint" / "state.json").is_file()
    assert load_model(folder).name == "new" and _hidden_leftovers(folder) == []


def test_a_reader_sees_the_old_complete_folder_or_the_new_one_never_a_mix(saved):
    """Each snapshot is taken through a directory descriptor, as a reader holding the folder sees it
    (the old folder is removed after the swap: a reader holding it may find it emptied, never mixed);
    load_model, which reads by path, reads again if the folder was swapped between its reads."""
    import hashlib
    import threading

    flow, folder = saved
    other = _other_weights(flow)
    extras = {"start_images": torch.rand(50, 144, 176)}
    done, seen, problems = threading.Event(), [], []

    def read():
        while not done.is_set():
            try:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                problems.append("folder missing")
                continue
            try:
                with open(os.open(CONFIG, os.O_RDONLY, dir_fd=fd), "rb") as f:
                    cfg = json.loads(f.read())
                with open(os.open(WEIGHTS, os.O_RDONLY, dir_fd=fd), "rb") as f:
                    sha = hashlib.sha256(f.read()).hexdigest()
            except FileNotFoundError:
                continue  # the old folder, removed after the swap
            except json.JSONDecodeError as e:
                problems.append(repr(e))
                continue
            finally:
                os.close(fd)
            seen.append(cfg["name"])
            if sha != cfg["weights_sha256"]:
                problems.append(f"{cfg['name']}: config and weights of different models")
            try:
                load_model(folder)
            except ModelError as e:
                problems.append(str(e))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(12):
            save_model(folder, other if i % 2 else flow, {"name": f"v{i}"}, extras=extras)
    finally:
        done.set()
        reader.join()
    assert problems == [] and len(set(seen)) > 2, (problems[:3], len(seen))


def test_a_writer_killed_mid_way_leaves_a_complete_model_and_its_leftovers_are_cleaned(saved, tmp_path):
    import signal
    import subprocess
    import sys

    flow, folder = saved
    script = tmp_path / "writer.py"
    script.write_text(
        "import sys, torch\n"
        "from bidsharmony.flow.checkpoint import load_model, save_model\n"
        "flow = load_model(sys.argv[1]).flow\n"
        "for i in range(10**6):\n"
        "    with torch.no_grad():\n"
        "        next(flow.parameters()).add_(1)\n"
        "    save_model(sys.argv[1], flow, {'name': f'w{i}'}, extras={'start_images': torch.rand(50, 144, 176)})\n"
        "    print(i, flush=True)\n"
    )
    child = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # a few writes done, the next one under way
        child.stdout.readline()
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert load_model(folder).name.startswith("w")  # complete: its weights match its config
    save_model(folder, flow, {"name": "after"})  # the next writer cleans what the killed one left
    assert load_model(folder).name == "after" and _hidden_leftovers(folder) == []


def test_recovery_completes_or_undoes_a_killed_swap(saved, tmp_path):
    from bidsharmony.modelfolder import recover_stale

    flow, folder = saved
    pid = _dead_pid()
    new = save_model(tmp_path / f".m.{pid}.partial", _other_weights(flow), {"name": "new"})
    (new / "notes.txt").write_text("carried\n")
    # killed between the two renames of a swap without exchange: no folder; the old and new aside
    folder.rename(tmp_path / f".m.{pid}.old")
    recover_stale(folder)
    assert load_model(folder).name == "new" and (folder / "notes.txt").is_file() and _hidden_leftovers(folder) == []
    # killed after carrying the notes aside, before the swap: the old model stays, the notes come back
    new = save_model(tmp_path / f".m.{pid}.partial", flow, {"name": "newer"})
    (folder / "notes.txt").rename(new / "notes.txt")
    (tmp_path / f".m.{pid}.carried").write_text("notes.txt\n")
    recover_stale(folder)
    assert load_model(folder).name == "new" and (folder / "notes.txt").read_text() == "carried\n"
    assert _hidden_leftovers(folder) == []


def test_a_folder_that_cannot_be_swapped_is_published_inside_it(saved, tmp_path):
    """A mount point (a container's bind mount) or a folder in a read-only parent: built inside."""
    from bidsharmony.modelfolder import publish

    flow, folder = saved
    (folder / "notes.txt").write_text("kept\n")
    stage = folder / f".m.{os.getpid()}.partial"
    save_model(tmp_path / "elsewhere", _other_weights(flow), {"name": "inside"}).rename(stage)
    publish(stage, folder)
    assert load_model(folder).name == "inside" and (folder / "notes.txt").is_file() and _hidden_leftovers(folder) == []


def test_an_absurd_architecture_is_refused_by_its_shapes_before_anything_is_built(saved):
    import time

    _, folder = saved
    cfg = json.loads((folder / CONFIG).read_text())
    cfg["architecture"]["hidden"] = 10**6  # 36 TB of parameters
    (folder / CONFIG).write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    tensor = r"flow\.levels\.0\.layers\.2\.conditioner\.net\.0\.weight: \[8, 2, 1, 1\] in the file, \[1000000, 2, 1, 1\]"
    with pytest.raises(ModelError, match=rf"model.safetensors: weights do not match the architecture in config.json \({tensor}"):
        load_model(folder)
    assert time.perf_counter() - t0 < 10
    cfg["architecture"] = {**cfg["architecture"], "hidden": 8, "steps": 10**9}  # a billion layers: read no further than the file
    (folder / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="weights do not match the architecture"):
        load_model(folder)


def test_a_huge_config_is_refused_unread(saved):
    _, folder = saved
    cfg = json.loads((folder / CONFIG).read_text())
    cfg["padding"] = "x" * (1 << 20)
    (folder / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"config.json: larger than 1 MB"):
        load_model(folder)


@pytest.mark.parametrize("arch", [{}, {"levels": 3, "steps": 1, "hidden": 5, "blocks": 2, "bins": 4}, {"levels": 1, "blocks": 0}])
def test_shapes_from_the_config_are_those_of_the_built_flow(arch):
    from bidsharmony.flow.model import PRESETS, FlowConfig, SliceFlow, state_shapes

    for cfg in [FlowConfig(**{**PRESETS["tiny"].to_dict(), **arch}), *([PRESETS["fast"]] if not arch else [])]:
        built = {k: tuple(v.shape) for k, v in SliceFlow(cfg).state_dict().items()}
        assert dict(state_shapes(cfg)) == built


def test_a_link_to_a_model_folder_stays_a_link_to_the_new_model(saved, tmp_path):
    flow, folder = saved
    link = tmp_path / "current"
    link.symlink_to(folder)
    save_model(link, _other_weights(flow), {"name": "through the link"})
    assert link.is_symlink() and load_model(folder).name == "through the link"
    assert _hidden_leftovers(folder) == [] and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("key, value", [("normalisation", "z-score per volume"), ("orientation", "LPS"), ("quantisation_bits", 8),
                                        ("slice_shape", [160, 192])])
def test_a_model_trained_on_other_preprocessing_is_refused(saved, key, value):
    """The config's recorded preprocessing is what inference does, or loading says which field differs."""
    from bidsharmony.flow.checkpoint import PREPROCESSING
    from bidsharmony.flow.scaling import BITS

    assert PREPROCESSING["quantisation_bits"] == BITS  # the recorded value is the one the flow's scaling uses
    _, folder = saved
    cfg = json.loads((folder / CONFIG).read_text())
    cfg["preprocessing"] = {**PREPROCESSING, "slice_shape": list(cfg["architecture"]["slice_shape"])}
    (folder / CONFIG).write_text(json.dumps(cfg))
    load_model(folder)  # as train writes it: accepted
    cfg["preprocessing"][key] = value
    (folder / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=key):
        load_model(folder)
