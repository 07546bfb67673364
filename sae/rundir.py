"""Files in a run directory that the user's next command cannot corrupt.

- ``atomic_write(path, write)``: ``write(tmp)`` fills a temporary file with a unique name in the
  same folder (``.NAME.PID.RANDOM.tmp``), which is fsynced and renamed over ``path``; a kill leaves
  the old file or the new one, never half of one, and two writers never share a temp file.
- ``clean_stale_temps(folder)``: removes temp files whose writing process is gone.
- ``RunLock(folder)``: one process per run directory, through an ``flock`` on ``folder/.lock``
  (the kernel drops it when the holder dies, so a lock left by a killed process is stale by
  construction and the next run takes it).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Callable

_TEMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


def temp_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform that cannot open a folder (Windows): the rename is what it is
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then fsync and rename ``tmp`` over ``path``; the temp file is removed on error."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)  # the rename itself survives a power loss
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (a process of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove ``.NAME.PID.RANDOM.tmp`` files in ``folder`` whose process no longer runs."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TEMP.match(entry.name)
        if m and entry.is_file() and not pid_alive(int(m.group(1))):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


_HELD: dict[Path, int] = {}  # folders this process holds: a nested RunLock on one is a no-op


class RunLock:
    """``with RunLock(folder):`` holds ``folder/.lock`` (creating the folder) or raises ``RunLockedError``.

    Re-entrant within one process (the CLI holds the lock around ``train()``, which takes it too).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self._fd = None
        self._nested = False

    def __enter__(self) -> "RunLock":
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.folder.resolve()
        if key in _HELD:
            _HELD[key] += 1
            self._nested = True
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(f"out: {self.folder} is in use by {holder} (lock {self.path}); "
                                 f"wait for it to finish or choose another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd
        _HELD[key] = 1
        clean_stale_temps(self.folder)
        return self

    def __exit__(self, *exc) -> None:
        key = self.folder.resolve()
        if self._nested:
            _HELD[key] -= 1
            return
        _HELD.pop(key, None)
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None
