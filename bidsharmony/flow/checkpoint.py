"""The model folder: ``model.safetensors`` + ``config.json`` (+ ``MODEL_CARD.md``).

The one definition of the format. Weights are read with safetensors only (no pickle, ever);
``config.json`` records the architecture, the preprocessing the model expects, training facts and
the sha256 of the weights, which loading checks, so a truncated or swapped file is caught by name.
Tensors that the harmonization loop needs from training data (the mean target slice per slice
position, the target intensity histogram) live in the same safetensors file under ``extra.``.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from bidsharmony import __version__
from bidsharmony.errors import ModelError, OutputError

FORMAT = "bidsharmony-flow"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "MODEL_CARD.md"
DESCRIBED = (CARD, "samples.png", "training_curve.png")  # they describe the weights, so they follow them
MAX_CONFIG_BYTES = 1 << 20  # a config is a few kB; a bigger one is not read


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class LoadedModel:
    flow: "object"  # SliceFlow
    config: dict
    extras: dict = field(default_factory=dict)  # name -> tensor
    path: Path | None = None

    @property
    def sha256(self) -> str:
        return self.config["weights_sha256"]

    @property
    def name(self) -> str:
        return self.config.get("name", self.path.name if self.path else "unnamed")


def write_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """``safetensors`` writes a private temporary file (mode 0600) and renames it onto ``path``, so
    others could not read a model in a shared folder: the file gets the mode any new file gets here
    (umask, default ACL) instead."""
    from safetensors.torch import save_file

    path = Path(path)
    path.unlink(missing_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = stat.S_IMODE(path.stat().st_mode)
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, mode)


def write_folder(folder, tensors: dict, config: dict) -> Path:
    """Write a complete model folder aside, then swap it in (``publish``): a reader finds the
    previous complete model or the new one, never a mix, and a kill leaves the previous one whole.
    ``config['format']`` says which model kind the folder holds."""
    target = Path(folder).resolve()  # a link to a model folder: the folder is replaced, the link kept
    stage = new_stage(target)
    try:
        write_safetensors(tensors, stage / WEIGHTS, metadata={"format": config["format"]})
        cfg = {**config, "weights_sha256": sha256_file(stage / WEIGHTS)}
        cfg.setdefault("software_version", __version__)
        (stage / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        same = _recorded_sha(target) == cfg["weights_sha256"]
        card = target / CARD
        if not (same and card.is_file() and GENERATED not in card.read_text(errors="replace")):
            (stage / CARD).write_text(card_text(cfg))  # a hand-written card stays only with the weights it describes
        publish(stage, target, keep_described=same)
    finally:
        if not stage.with_name(stage.name.removesuffix(".partial") + ".carried").exists():  # else: others' files inside
            shutil.rmtree(stage, ignore_errors=True)
    return Path(folder)


# Publication. A model folder is built in a hidden sibling ``.<name>.<pid>.partial`` and swapped in
# with one rename (renameat2 RENAME_EXCHANGE where the filesystem has it, else two renames). What the
# old folder held besides the model (a training checkpoint, logs, a user's notes) is moved into the
# new one first, and the names moved are recorded in ``.<name>.<pid>.carried``, so whoever finds a
# killed writer's leftovers (``recover_stale``) can put exactly those back.
_LEFTOVER = r"^\.{name}\.(\d+)\.(partial|old|carried)$"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != 0


def _stage_parent(folder: Path) -> Path:
    """Beside ``folder``; inside it where it cannot be swapped (a mount point, such as a container's
    bind mount, or a parent that is not writable): there the files are moved in one by one, config last."""
    if folder.is_dir() and (os.path.ismount(folder) or not os.access(folder.parent, os.W_OK | os.X_OK)):
        return folder
    return folder.parent


def new_stage(folder, tag: str | None = None) -> Path:
    """A new, empty hidden folder where the next version of ``folder`` is built (``tag``: a fixed
    name that outlives this process, as a training's resumable folder)."""
    folder = Path(folder).resolve()
    recover_stale(folder)
    parent = _stage_parent(folder)
    stage = parent / f".{folder.name}.{tag or f'{os.getpid()}.partial'}"
    if tag is None:
        shutil.rmtree(stage, ignore_errors=True)  # a dead process's, with this pid
    try:
        stage.mkdir(parents=True, exist_ok=tag is not None)
    except OSError as e:
        raise OutputError(f"{stage}: cannot create a model folder beside {folder} ({e.strerror})") from None
    return stage


def _exchange(a: Path, b: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a), None, str(b))


def _move_back(stage: Path, folder: Path, carried: Path) -> None:
    if carried.is_file():
        for name in carried.read_text().splitlines():
            if name and os.path.lexists(stage / name) and not os.path.lexists(folder / name):
                os.rename(stage / name, folder / name)
        carried.unlink()


def publish(stage, folder, keep_described: bool = False) -> None:
    """Make the complete folder ``stage`` (from ``new_stage``) the folder ``folder``. Only the old
    model is replaced: its weights and config, and its card and figures unless the weights stay the
    same (``keep_described``); everything else in ``folder`` is kept. On failure ``folder`` is as
    before and ``stage`` still holds the new model."""
    stage, folder = Path(stage), Path(folder).resolve()
    replaced = {WEIGHTS, CONFIG} | (set() if keep_described else set(DESCRIBED))
    base = stage.name.removesuffix(".partial")
    carried, old = stage.with_name(base + ".carried"), stage.with_name(base + ".old")
    try:
        if stage.parent == folder:
            return _publish_inside(stage, folder, replaced)
        if folder.is_dir():
            names = [n for n in sorted(os.listdir(folder)) if n not in replaced and not os.path.lexists(stage / n)]
            carried.write_text("".join(f"{n}\n" for n in names))
            for name in names:
                os.rename(folder / name, stage / name)
        if not folder.exists() or not os.listdir(folder):
            os.rename(stage, folder)  # atomic, also onto an empty folder
        else:
            try:
                _exchange(stage, folder)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                os.rename(folder, old)  # no exchange on this filesystem (e.g. NFS): two renames; a kill
                try:  # between them is completed by recover_stale
                    os.rename(stage, folder)
                except OSError:
                    os.rename(old, folder)
                    raise
                stage = old
        carried.unlink(missing_ok=True)
        shutil.rmtree(stage, ignore_errors=True)  # the previous model
    except BaseException as e:
        if stage.is_dir() and folder.is_dir():
            _move_back(stage, folder, carried)
        if isinstance(e, OSError):
            raise OutputError(f"{folder}: cannot publish the model folder ({e.strerror})") from None
        raise


def publish_training(stage, folder) -> None:
    """Publish a finished training's folder ``stage`` (``new_stage(folder, "training")``) as
    ``folder``. It is renamed first, so a kill mid-way never leaves the previous model where a rerun
    would resume from; if publication fails it goes back, and a rerun publishes it."""
    stage, folder = Path(stage), Path(folder).resolve()
    part = stage.with_name(f".{folder.name}.{os.getpid()}.partial")
    os.rename(stage, part)
    try:
        publish(part, folder)
    except BaseException:
        if part.is_dir():
            os.rename(part, stage)
        raise


def _publish_inside(stage: Path, folder: Path, replaced: set) -> None:
    old = stage.with_name(stage.name.removesuffix(".partial") + ".old")  # its presence says: moving
    old.mkdir()
    names = sorted(os.listdir(stage), key=lambda n: n == CONFIG)  # the config, naming the weights, last
    for name in sorted(replaced - set(names)):
        if os.path.lexists(folder / name):
            os.rename(folder / name, old / name)
    _move_in(stage, folder, old, names)
    stage.rmdir()
    shutil.rmtree(old, ignore_errors=True)


def _move_in(stage: Path, folder: Path, old: Path, names) -> None:
    for name in names:
        if (folder / name).is_dir() and not (folder / name).is_symlink():
            os.rename(folder / name, old / name)
        os.rename(stage / name, folder / name)


def recover_stale(folder) -> None:
    """Finish or undo what a killed writer of ``folder`` left (hidden ``.<name>.<pid>.*`` entries
    whose process is dead): ``folder`` ends up holding a complete model, the old or the new one, and
    what was carried aside goes back. Entries of live writers are left alone."""
    folder = Path(folder).resolve()
    pattern = re.compile(_LEFTOVER.format(name=re.escape(folder.name)))
    for parent in {folder.parent, folder} if folder.is_dir() else {folder.parent}:
        if not parent.is_dir():
            continue
        stale = sorted({m.group(1) for n in os.listdir(parent) if (m := pattern.match(n)) and not _pid_alive(int(m.group(1)))})
        for pid in stale:
            stage, old, carried = (parent / f".{folder.name}.{pid}.{kind}" for kind in ("partial", "old", "carried"))
            if parent == folder:  # built inside: a kill while moving in is finished, one while building undone
                if old.is_dir() and stage.is_dir():
                    _move_in(stage, folder, old, sorted(os.listdir(stage), key=lambda n: n == CONFIG))
            elif old.is_dir() and not folder.exists():  # killed between the two renames of a swap
                os.rename(stage if (stage / CONFIG).is_file() else old, folder)
            elif stage.is_dir() and folder.is_dir():
                _move_back(stage, folder, carried)
            for leftover in (stage, old):
                shutil.rmtree(leftover, ignore_errors=True)
            carried.unlink(missing_ok=True)


def _recorded_sha(folder: Path) -> str | None:
    try:
        return read_config_file(folder / CONFIG).get("weights_sha256")
    except (ModelError, AttributeError):
        return None


GENERATED = "<!-- generated by bidsharmony from config.json; delete this line to keep your edits -->"


def card_text(cfg: dict) -> str:
    """A model card from what config.json knows: enough to tell what the weights are, where they came
    from and how to check them; the README of a shipped model adds its benchmark by hand."""
    method = "BlindHarmonyDiff 3D rectified flow (edges → image)" if cfg["format"].endswith("bhdiff") else "BlindHarmony 2D normalizing-flow prior"
    data, training = cfg.get("training_data", {}), cfg.get("training", {})
    lines = [GENERATED, f"# Model card: {cfg.get('name', '?')}", "",
             f"- Method: {method}; preset `{cfg.get('preset', '?')}`; format `{cfg['format']}` v{cfg.get('format_version', '?')}",
             f"- Weights: `{WEIGHTS}`, sha256 `{cfg['weights_sha256']}` (checked on every load)",
             f"- Software: bidsharmony {cfg.get('software_version', '?')}",
             f"- Architecture: `{json.dumps(cfg.get('architecture', {}), sort_keys=True)}`",
             f"- Training data: `{data.get('dataset', '?')}`; "
             + ", ".join(f"{k.replace('_', ' ')} {len(v) if isinstance(v, list) else v}" for k, v in data.items() if k != "dataset"),
             "- Training: " + ", ".join(f"{k} {v}" for k, v in training.items()) if training else "- Training: see config.json",
             "- Preprocessing the model expects: " + "; ".join(f"{k} {v}" for k, v in cfg.get("preprocessing", {}).items()),
             "", "## Use and limits", "",
             "Trained on one target domain's T1-weighted images only: it pulls other scanners' images towards",
             "that domain and knows nothing else. Check its outputs (the participant reports) before pooling;",
             "not for diagnosis. The data's licence applies to the weights: see the training dataset's terms.", ""]
    return "\n".join(lines)


def save_model(folder, flow, config: dict, extras: dict | None = None, half: bool = False) -> Path:
    import torch

    tensors = {}
    for k, v in flow.state_dict().items():
        v = v.detach().cpu().contiguous()
        if half and v.is_floating_point():
            v = v.half()
        tensors[f"flow.{k}"] = v
    for k, v in (extras or {}).items():
        tensors[f"extra.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    cfg = {**config, "format": FORMAT, "format_version": FORMAT_VERSION, "architecture": flow.cfg.to_dict(),
           "storage_dtype": "float16" if half else "float32"}  # fmt: skip
    return write_folder(folder, tensors, cfg)


def read_config_file(path: Path):
    """The parsed JSON of a config file, refused unread beyond ``MAX_CONFIG_BYTES``."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ModelError(f"{path}: larger than {MAX_CONFIG_BYTES // 2**20} MB; a model config is a few kB")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None


def check_shapes(tensors: dict, prefix: str, expected, folder) -> None:
    """The file's tensors under ``prefix`` against the (name, shape) pairs that the config's
    architecture implies, computed without building anything: an absurd config (36 TB of
    parameters) is refused before a network is allocated. ``expected`` is read lazily, no further
    than one entry past the file's count."""
    folder = Path(folder)
    have = {k[len(prefix):]: tuple(v.shape) for k, v in tensors.items() if k.startswith(prefix)}
    try:
        want = dict(itertools.islice(((n, tuple(s)) for n, s in expected), len(have) + 1))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise ModelError(f"{folder / CONFIG}: invalid architecture ({type(e).__name__}: {e})") from None
    problem = next((f"{prefix}{n}: missing from the file" if n not in have else
                    f"{prefix}{n}: {list(have[n])} in the file, {list(s)} from the config"
                    for n, s in want.items() if have.get(n) != s), None)  # fmt: skip
    if problem is None and set(have) - set(want):
        problem = f"{prefix}{min(set(have) - set(want))}: in the file, not in the architecture"
    if problem:
        raise ModelError(f"{folder / WEIGHTS}: weights do not match the architecture in {CONFIG} ({problem})")


def read_config(folder, fmt: str = FORMAT, version: int = FORMAT_VERSION) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: model folder not found")
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise ModelError(f"{cfg_path}: missing (a model folder holds {WEIGHTS} and {CONFIG})")
    cfg = read_config_file(cfg_path)
    if not isinstance(cfg, dict) or cfg.get("format") != fmt:
        raise ModelError(f"{cfg_path}: not a bidsharmony {fmt.split('-')[-1]} config (format != {fmt!r})")
    if cfg.get("format_version", 0) > version:
        raise ModelError(f"{cfg_path}: format version {cfg['format_version']} is newer than this bidsharmony reads")
    return cfg


def read_weights(folder, cfg: dict, verify_hash: bool = True) -> dict:
    """The folder's tensors (CPU), after checking them against the config's sha256."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = Path(folder) / WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{weights}: missing")
    if verify_hash and sha256_file(weights) != cfg.get("weights_sha256"):
        raise ModelError(f"{weights}: sha256 does not match {CONFIG} (truncated, corrupted or replaced)")
    try:
        return load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{weights}: not a readable safetensors file ({e})") from None


def read_folder(folder, fmt: str = FORMAT, version: int = FORMAT_VERSION, verify_hash: bool = True) -> tuple[dict, dict]:
    """(config, tensors) of one version of the folder: a reader whose config and weights straddle a
    publication (the folder swapped between the two reads) reads again."""
    cfg = read_config(folder, fmt, version)
    try:
        return cfg, read_weights(folder, cfg, verify_hash)
    except ModelError:
        if read_config(folder, fmt, version) == cfg:
            raise
    cfg = read_config(folder, fmt, version)
    return cfg, read_weights(folder, cfg, verify_hash)


def load_model(folder, device="cpu", verify_hash: bool = True) -> LoadedModel:
    """Load a model folder for inference (eval mode, float32, on ``device``)."""
    from bidsharmony.flow.model import FlowConfig, SliceFlow, state_shapes

    folder = Path(folder)
    cfg, tensors = read_folder(folder, verify_hash=verify_hash)
    weights = folder / WEIGHTS
    try:
        arch = FlowConfig.from_dict(cfg["architecture"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelError(f"{folder / CONFIG}: invalid architecture ({e})") from None
    check_shapes(tensors, "flow.", state_shapes(arch), folder)
    try:
        flow = SliceFlow(arch)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{folder / CONFIG}: invalid architecture ({e})") from None
    state = {k[5:]: v.float() if v.is_floating_point() else v for k, v in tensors.items() if k.startswith("flow.")}
    try:
        flow.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ModelError(f"{weights}: weights do not match the architecture in {CONFIG} ({' '.join(first[:2])[:300]})") from None
    extras = {k[6:]: v.float() if v.is_floating_point() else v for k, v in tensors.items() if k.startswith("extra.")}
    flow.eval().to(device)
    for p in flow.parameters():
        p.requires_grad_(False)
    return LoadedModel(flow=flow, config=cfg, extras=extras, path=folder)
