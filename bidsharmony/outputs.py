"""Where and how bidsharmony writes: atomic writes (outputs appear complete or not at all: written
aside in the same folder, then renamed), containment (nothing lands outside OUT_DIR, whatever
symbolic links it holds), the cleanup of a killed run's partial files, and per-participant locks."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

from bidsharmony.errors import BusyError, OutputError

LOG = logging.getLogger("bidsharmony")

# A partial file is named after its writer, ``<pid>@<host>``: whether the writer is alive can only
# be told on its own host (runs of a cluster job array share one OUT_DIR).
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"
_PARTIAL = re.compile(r"^\..+\.(\d+)(?:@([A-Za-z0-9-]+))?\.partial")


def _tmp_for(path: Path) -> Path:
    # A leading dot hides the partial file from pybids; the suffix keeps nibabel's gzip detection.
    return path.with_name(f".{path.name}.{os.getpid()}@{_HOST}.partial{''.join(path.suffixes[-2:])}")


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


def ensure_inside(path, root) -> Path:
    """``path``, if it resolves (symbolic links followed) inside ``root``; else OutputError. A link
    such as ``OUT/sub-01 -> BIDS/sub-01`` would otherwise send outputs into the input dataset."""
    path, root = Path(path), Path(root)
    real, real_root = path.resolve(), root.resolve()
    if real != real_root and real_root not in real.parents:
        raise OutputError(f"{path}: resolves to {real}, outside the output directory {real_root} "
                          "(a symbolic link?); refusing to write there")
    return path


def atomic_save(path, write, root=None) -> None:
    """``write(tmp_path)`` then rename into place; the partial file never survives a failure.
    With ``root``, the destination must resolve inside it (``ensure_inside``)."""
    path = Path(path)
    if root is not None:
        ensure_inside(path, root)
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


def atomic_write_text(path, text: str, root=None) -> None:
    atomic_save(path, lambda tmp: Path(tmp).write_text(text), root=root)


def atomic_write_json(path, obj, root=None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", root=root)


def atomic_copy(src, path, root=None) -> None:
    atomic_save(path, lambda tmp: shutil.copyfile(src, tmp), root=root)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine): a partial file or stage named after a dead
    writer is stale."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _own_folders(out_dir: Path, subjects=None):
    """The folders of OUT_DIR that bidsharmony writes into (top level, figures/, logs/,
    sub-*/[ses-*/]{anat,figures}/), never through a symbolic link: the cleanup below must not
    reach a file that another program (or the input dataset) owns."""
    def real_dirs(paths):
        return [p for p in paths if p.is_dir() and not p.is_symlink()]

    top = [out_dir]
    subs = real_dirs(out_dir.glob("sub-*") if subjects is None else (out_dir / f"sub-{s}" for s in subjects))
    sessions = real_dirs(d for s in subs for d in s.glob("ses-*"))
    leaves = real_dirs(d / leaf for d in subs + sessions for leaf in ("anat", "figures"))
    return top + real_dirs([out_dir / "figures", out_dir / "logs"]) + subs + sessions + leaves


def remove_stale_partials(out_dir, subjects=None) -> list[Path]:
    """Delete partial files that a killed run left behind (SIGKILL skips every cleanup), in the
    folders bidsharmony writes only: OUT_DIR's own and those of ``subjects`` (the participants
    this run has locked; default all). A partial file whose writer is alive, or on another host,
    belongs to a concurrent run: kept."""
    removed = []
    for folder in _own_folders(Path(out_dir), subjects):
        for p in sorted(folder.glob(".*.partial*")):
            m = _PARTIAL.match(p.name)
            if not m or m.group(2) not in (None, _HOST):
                continue
            if p.is_file() and not p.is_symlink() and not pid_alive(int(m.group(1))):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


LOCKS = ".bidsharmony-locks"


@contextlib.contextmanager
def participant_locks(out_dir, subjects):
    """Hold an exclusive lock per participant in OUT_DIR for the duration of a run: two runs on
    the same participant would otherwise share work nodes and outputs and the second would die
    inside Nipype. A lock dies with its process (``flock``), so a killed run never leaves a stale
    one. BusyError names the participant and the holder."""
    import fcntl

    folder = Path(out_dir) / LOCKS
    _mkdir(folder)
    held = []
    try:
        for subject in sorted(set(subjects)):
            path = folder / f"sub-{subject}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another run"
                os.close(fd)
                raise BusyError(f"{Path(out_dir)}: sub-{subject} is being processed by {holder}; "
                                "wait for it to finish (or stop it), then rerun") from None
            except OSError as e:  # a filesystem without locks (Lustre without -o flock, some NFS)
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                LOG.warning("%s: this filesystem cannot lock files (%s); running without participant locks", folder, e.strerror)
                break
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"bidsharmony pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
            held.append(fd)
        yield
    finally:
        for fd in held:
            os.close(fd)  # closing releases the lock; the file stays (removing it would race)
