"""Which threads have a run in progress, seen from any process on this machine.

A run holds an OS lock on its thread's file under `<runs_dir>/.live/` while it runs
(`hold`); another process that wants the same thread (a turn on the same session, a
`resume`) finds it held (`holder`) and is refused with `BusyError`, and `recent_runs` says
'running' rather than 'unfinished'. The OS drops the lock when its process ends, however
it ends (`kill -9` too), so a crashed run never leaves its thread locked.

One process holds at most one lock per thread: `LavidaAgent` takes it for the first run on
a thread and gives it back after the last (its own registry serialises runs within the
process). Locks are `flock` advisory locks, so they see processes on this machine only
(not a `runs_dir` shared over NFS), and on a system without `fcntl` (Windows) nothing is
locked and every run looks stopped to the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; see the module docstring
    fcntl = None  # type: ignore[assignment]

from lavida_agent.errors import BusyError

__all__ = ("ThreadLock", "busy_message", "hold", "holder")

_DIR = ".live"


def _path(runs_dir: str | Path, thread_id: str) -> Path:
    # Hashed: a thread id is any string a caller chose, a file name must be safe.
    name = hashlib.sha256(thread_id.encode("utf-8")).hexdigest()[:32]
    return Path(runs_dir) / _DIR / f"{name}.lock"


class ThreadLock:
    """A held thread lock; `release()` (idempotent) gives it back and removes its file."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):  # removed while held: no one can take a stale inode
            self.path.unlink()
        os.close(fd)  # closing drops the lock


def hold(runs_dir: str | Path, thread_id: str, *, run_id: str | None, doing: str,
         what: str) -> ThreadLock:  # fmt: skip
    """Take `thread_id`'s lock, or raise if another process holds it.

    Args:
        run_id: the run that takes it (None for a change that is not a run: an undo).
        doing: what takes it, as a refusal names it ("run 1a2b...", "an undo").
        what: how a refusal names the thread ("session 'abc'").

    Raises:
        BusyError: another process holds the thread now (the message names the process
            and what it does).
    """
    path = _path(runs_dir, thread_id)
    if fcntl is None:
        return ThreadLock(path, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read(fd)
            os.close(fd)
            raise BusyError(busy_message(what, info)) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else its holder removed the file between our open and lock: open anew
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    record = {"pid": os.getpid(), "run_id": run_id, "doing": doing, "thread_id": thread_id}
    os.write(fd, json.dumps(record).encode())
    return ThreadLock(path, fd)


def busy_message(what: str, info: dict[str, Any]) -> str:
    """The refusal for a thread another process holds, naming the process and its work."""
    return (f"{what} is running now in another process (pid {info.get('pid')}, "
            f"{info.get('doing', 'a run')}): try again when it ends")


def holder(runs_dir: str | Path, thread_id: str) -> dict[str, Any] | None:
    """`{pid, run_id, doing, thread_id}` of what holds `thread_id` now (this process's own
    runs too), or None when nothing does."""
    if fcntl is None:
        return None
    try:
        fd = os.open(_path(runs_dir, thread_id), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(fd)
    finally:
        os.close(fd)
    return None


def _read(fd: int) -> dict[str, Any]:
    """The holder's record (empty while it is being written)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
