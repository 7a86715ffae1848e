"""Publishing a folder whole: a new version is built in a hidden sibling and swapped in, so a reader
sees the old complete folder or the new one, never a mix, and a kill leaves the old one whole.

The stage is ``.<name>.<pid>.partial`` beside the folder; it is swapped in with one rename
(renameat2 RENAME_EXCHANGE where the filesystem has it, else two renames). What the old folder
held besides the replaced entries (a training checkpoint, logs, a user's notes) is moved into the
new one first, and the names moved are recorded in ``.<name>.<pid>.carried``, so whoever finds a
killed writer's leftovers (``recover_stale``) can put exactly those back. Model folders use it
(``flow.checkpoint``); nothing here knows what a model is.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from pathlib import Path

from bidsharmony.errors import OutputError
from bidsharmony.outputs import pid_alive

_LEFTOVER = r"^\.{name}\.(\d+)\.(partial|old|carried)$"


def _stage_parent(folder: Path) -> Path:
    """Beside ``folder``; inside it where it cannot be swapped (a mount point, such as a container's
    bind mount, or a parent that is not writable): there the files are moved in one by one, config last."""
    if folder.is_dir() and (os.path.ismount(folder) or not os.access(folder.parent, os.W_OK | os.X_OK)):
        return folder
    return folder.parent


def new_stage(folder, last: str, tag: str | None = None) -> Path:
    """A new, empty hidden folder where the next version of ``folder`` is built (``tag``: a fixed
    name that outlives this process, as a training's resumable folder). ``last``: see ``publish``."""
    folder = Path(folder).resolve()
    recover_stale(folder, last)
    parent = _stage_parent(folder)
    stage = parent / f".{folder.name}.{tag or f'{os.getpid()}.partial'}"
    if tag is None:
        shutil.rmtree(stage, ignore_errors=True)  # a dead process's, with this pid
    try:
        stage.mkdir(parents=True, exist_ok=tag is not None)
    except OSError as e:
        raise OutputError(f"{stage}: cannot create a folder beside {folder} ({e.strerror})") from None
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


def publish(stage, folder, replaced: set, last: str) -> None:
    """Make the complete folder ``stage`` (from ``new_stage``) the folder ``folder``. Only the entries
    named in ``replaced`` are replaced; everything else in ``folder`` is kept. ``last`` names the
    entry whose presence says the folder is complete (moved in last where files move one by one).
    On failure ``folder`` is as before and ``stage`` still holds the new version."""
    stage, folder = Path(stage), Path(folder).resolve()
    base = stage.name.removesuffix(".partial")
    carried, old = stage.with_name(base + ".carried"), stage.with_name(base + ".old")
    try:
        if stage.parent == folder:
            return _publish_inside(stage, folder, replaced, last)
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
            raise OutputError(f"{folder}: cannot publish the folder ({e.strerror})") from None
        raise


def publish_tagged(stage, folder, replaced: set, last: str) -> None:
    """Publish a tagged stage (``new_stage(folder, last, tag)``, e.g. a training's) as ``folder``.
    It is renamed to this process's stage first, so a kill mid-way never leaves the previous
    version where a rerun would resume from; if publication fails it goes back, and a rerun
    publishes it."""
    stage, folder = Path(stage), Path(folder).resolve()
    part = stage.with_name(f".{folder.name}.{os.getpid()}.partial")
    os.rename(stage, part)
    try:
        publish(part, folder, replaced, last)
    except BaseException:
        if part.is_dir():
            os.rename(part, stage)
        raise


def _publish_inside(stage: Path, folder: Path, replaced: set, last: str) -> None:
    old = stage.with_name(stage.name.removesuffix(".partial") + ".old")  # its presence says: moving
    old.mkdir()
    names = sorted(os.listdir(stage), key=lambda n: n == last)
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


def recover_stale(folder, last: str) -> None:
    """Finish or undo what a killed writer of ``folder`` left (hidden ``.<name>.<pid>.*`` entries
    whose process is dead): ``folder`` ends up holding a complete model, the old or the new one, and
    what was carried aside goes back. Entries of live writers are left alone."""
    folder = Path(folder).resolve()
    pattern = re.compile(_LEFTOVER.format(name=re.escape(folder.name)))
    for parent in {folder.parent, folder} if folder.is_dir() else {folder.parent}:
        if not parent.is_dir():
            continue
        stale = sorted({m.group(1) for n in os.listdir(parent) if (m := pattern.match(n)) and not pid_alive(int(m.group(1)))})
        for pid in stale:
            stage, old, carried = (parent / f".{folder.name}.{pid}.{kind}" for kind in ("partial", "old", "carried"))
            if parent == folder:  # built inside: a kill while moving in is finished, one while building undone
                if old.is_dir() and stage.is_dir():
                    _move_in(stage, folder, old, sorted(os.listdir(stage), key=lambda n: n == last))
            elif old.is_dir() and not folder.exists():  # killed between the two renames of a swap
                os.rename(stage if (stage / last).exists() else old, folder)
            elif stage.is_dir() and folder.is_dir():
                _move_back(stage, folder, carried)
            for leftover in (stage, old):
                shutil.rmtree(leftover, ignore_errors=True)
            carried.unlink(missing_ok=True)
