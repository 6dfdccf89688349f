"""Which threads have a run in progress, seen from any process on this machine.

A run holds an OS lock on its thread's file under `<runs_dir>/.live/` while it runs
(`hold`); another process that wants the same thread (a turn on the same session, an undo,
a `resume`) finds it held and is refused with `BusyError`, and `recent_runs` says 'running'
rather than 'unfinished' (`holder`). The OS drops the lock when its process ends, however
it ends (`kill -9` too), so a crashed run never leaves its thread locked.

One process holds at most one lock per thread: `LavidaAgent` takes it for the first run on
a thread, records every run of its own on it (`ThreadLock.record`), and gives it back after
the last. Locks are `flock` advisory locks, so they see processes on this machine only
(not a `runs_dir` shared over NFS); on a system without `fcntl` (Windows) nothing is
locked (`SUPPORTED` is False) and no process can tell another's runs from stopped ones.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; see the module docstring
    fcntl = None  # type: ignore[assignment]

from lavida_agent.errors import BusyError

__all__ = ("SUPPORTED", "ThreadLock", "busy_message", "hold", "holder", "holders")

SUPPORTED = fcntl is not None
logger = logging.getLogger(__name__)
_DIR = ".live"
_PATIENCE_S = 0.1  # how long `hold` retries: `holder` takes the lock for a moment to look


def _path(runs_dir: str | Path, thread_id: str) -> Path:
    # Hashed: a thread id is any string a caller chose, a file name must be safe.
    name = hashlib.sha256(thread_id.encode("utf-8")).hexdigest()[:32]
    return Path(runs_dir) / _DIR / f"{name}.lock"


class ThreadLock:
    """A held thread lock: `record` says what is on it, `release()` (idempotent) gives it
    back and removes its file."""

    def __init__(self, path: Path, fd: int | None, thread_id: str) -> None:
        self.path, self._fd, self.thread_id = path, fd, thread_id

    def record(self, doing: Sequence[str], run_ids: Sequence[str]) -> None:
        """Write what holds the thread now (`doing`: 'run <id>', 'an undo'; the run ids)."""
        if self._fd is None:
            return
        data = {"pid": os.getpid(), "doing": list(doing), "run_ids": list(run_ids),
                "thread_id": self.thread_id}  # fmt: skip
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(data).encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):  # removed while held: no one can take a stale inode
            self.path.unlink()
        os.close(fd)  # closing drops the lock


def hold(runs_dir: str | Path, thread_id: str, *, doing: str, what: str,
         run_id: str | None = None) -> ThreadLock:  # fmt: skip
    """Take `thread_id`'s lock, or raise if another process holds it.

    Args:
        doing: what takes it, as a refusal names it ("run 1a2b...", "an undo").
        what: how a refusal names the thread ("session 'abc'").
        run_id: the run that takes it (None for a change that is no run: an undo).

    Raises:
        BusyError: another process holds the thread (the message names the process and
            what it does).
    """
    path = _path(runs_dir, thread_id)
    if fcntl is None:
        return ThreadLock(path, None, thread_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + _PATIENCE_S
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() < deadline:  # perhaps only a `holder` looking
                    os.close(fd)
                    time.sleep(0.005)
                    continue
                raise BusyError(busy_message(what, _read(fd))) from None
            except OSError as exc:  # a file system without flock (some FUSE mounts): run unlocked
                os.close(fd)
                _warn_unlocked(str(path.parent), str(exc))
                return ThreadLock(path, None, thread_id)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else its holder removed the file between our open and lock: anew
                lock = ThreadLock(path, fd, thread_id)
                lock.record([doing], [run_id] if run_id else [])
                return lock
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@functools.cache
def _warn_unlocked(folder: str, why: str) -> None:
    """Once per folder and reason."""
    logger.warning("runs are not locked against other processes: %s cannot be locked (%s)", folder, why)


def busy_message(what: str, info: dict[str, Any]) -> str:
    """The refusal for a thread another process (or agent) holds, naming it and its work."""
    pid = info.get("pid")
    where = (f"in this process, by another agent ({', '.join(info.get('doing') or ['a run'])})"
             if pid == os.getpid()
             else f"in another process (pid {pid}, {', '.join(info.get('doing') or ['a run'])})")  # fmt: skip
    return f"{what} is running now {where}: try again when it ends"


def holder(runs_dir: str | Path, thread_id: str) -> dict[str, Any] | None:
    """`{pid, doing, run_ids, thread_id}` of what holds `thread_id` now (this process's own
    runs too), or None when nothing does."""
    return _held(_path(runs_dir, thread_id))


def holders(runs_dir: str | Path) -> list[dict[str, Any]]:
    """What holds each thread that something holds now (as `holder` says it)."""
    found = (_held(path) for path in sorted((Path(runs_dir) / _DIR).glob("*.lock")))
    return [info for info in found if info is not None]


def _held(path: Path) -> dict[str, Any] | None:
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(fd)
    except OSError:  # no flock on this file system: nothing is locked there
        return None
    finally:
        os.close(fd)
    return None


def _read(fd: int) -> dict[str, Any]:
    """The holder's record (empty while it is being written)."""
    try:
        data = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
