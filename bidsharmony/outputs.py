"""Atomic writes: outputs appear complete or not at all (write aside in the same folder, rename)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from bidsharmony.errors import OutputError

_PARTIAL = re.compile(r"^\..+\.(\d+)\.partial")


def _tmp_for(path: Path) -> Path:
    # A leading dot hides the partial file from pybids; the suffix keeps nibabel's gzip detection.
    return path.with_name(f".{path.name}.{os.getpid()}.partial{''.join(path.suffixes[-2:])}")


def _replace(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({e.strerror})") from None


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{folder}: cannot create ({e.strerror})") from None


def atomic_save(path, write) -> None:
    """``write(tmp_path)`` then rename into place; the partial file never survives a failure."""
    path = Path(path)
    _mkdir(path.parent)
    tmp = _tmp_for(path)
    try:
        write(str(tmp))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({e.strerror})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _replace(tmp, path)


def atomic_write_text(path, text: str) -> None:
    atomic_save(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_copy(src, path) -> None:
    atomic_save(path, lambda tmp: shutil.copyfile(src, tmp))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out_dir) -> list[Path]:
    """Delete partial files that a killed run left behind (SIGKILL skips every cleanup). A partial
    file whose writer is still alive belongs to a concurrent run into the same folder: kept."""
    removed = []
    for p in Path(out_dir).rglob(".*.partial*"):
        m = _PARTIAL.match(p.name)
        if m and p.is_file() and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
