"""Checkpointers for the workflows: in memory, SQLite file (sync) and SQLite (async).

All of them use `make_serde()`, a msgpack serializer that allows exactly the value types of
`state.py` (and `ImageRef`) to be loaded back, so reloading a checkpoint neither warns about
unregistered types nor accepts arbitrary classes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from lavida_agent.graphs.state import STATE_VALUE_TYPES

__all__ = (
    "async_checkpointer_from_path",
    "checkpointer_from_path",
    "compact",
    "last_written",
    "make_serde",
    "referenced_shas",
    "thread_ids",
)

MEMORY = ":memory:"
_SHA_BYTES_RE = re.compile(rb"[0-9a-f]{64}")


def make_serde() -> JsonPlusSerializer:
    """The serializer every checkpointer here uses (allow-list of the state value types)."""
    allowed = [(cls.__module__, cls.__name__) for cls in STATE_VALUE_TYPES]
    return JsonPlusSerializer(allowed_msgpack_modules=allowed)


def checkpointer_from_path(path: str | Path | None) -> BaseCheckpointSaver[str]:
    """A synchronous checkpointer: `InMemorySaver` for `None`/`":memory:"`, else a SQLite file.

    The SQLite connection is opened with `check_same_thread=False` (LangGraph writes from
    worker threads); the parent folder is created. Close it with `saver.conn.close()`.
    """
    if path is None or str(path) == MEMORY:
        return InMemorySaver(serde=make_serde())
    from langgraph.checkpoint.sqlite import SqliteSaver

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False)
    return SqliteSaver(conn, serde=make_serde())


@contextlib.asynccontextmanager
async def async_checkpointer_from_path(
    path: str | Path | None,
) -> AsyncIterator[BaseCheckpointSaver[str]]:
    """An async checkpointer (`async with ... as saver`): `AsyncSqliteSaver` on a file, or
    `InMemorySaver` for `None`/`":memory:"`. The connection closes on exit."""
    if path is None or str(path) == MEMORY:
        yield InMemorySaver(serde=make_serde())
        return
    import aiosqlite
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    async with aiosqlite.connect(str(path)) as conn:
        yield AsyncSqliteSaver(conn, serde=make_serde())


# -- what a checkpointer holds (for deleting threads and sweeping images) --------------------
# Only the two checkpointers made above are read; others raise `TypeError`.


def _is_sqlite(saver: BaseCheckpointSaver[str]) -> bool:
    return isinstance(getattr(saver, "conn", None), sqlite3.Connection)


def _check_readable(saver: BaseCheckpointSaver[str]) -> None:
    if not (_is_sqlite(saver) or isinstance(saver, InMemorySaver)):
        raise TypeError(f"cannot list what a {type(saver).__name__} holds (SqliteSaver and "
                        "InMemorySaver only)")  # fmt: skip


def thread_ids(saver: BaseCheckpointSaver[str]) -> set[str]:
    """Every thread with a checkpoint in `saver`."""
    _check_readable(saver)
    if _is_sqlite(saver):
        with saver.cursor() as cur:  # type: ignore[attr-defined]
            try:
                return {row[0] for row in cur.execute("SELECT DISTINCT thread_id FROM checkpoints")}
            except sqlite3.OperationalError:  # no table yet: nothing was ever checkpointed
                return set()
    return {t for t, namespaces in saver.storage.items() if any(namespaces.values())}  # type: ignore[attr-defined]


def _stored_bytes(value: Any) -> Iterator[bytes]:
    """Every bytes value inside the nested tuples and dicts of an `InMemorySaver`."""
    if isinstance(value, bytes | bytearray):
        yield bytes(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _stored_bytes(v)
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _stored_bytes(v)


def _blobs(saver: BaseCheckpointSaver[str], threads: Sequence[str] | None) -> Iterator[tuple[str, bytes]]:
    """`(thread id, serialized bytes)` of every checkpoint, its metadata and pending write
    (of `threads` only, if given)."""
    if _is_sqlite(saver):
        chunks = [None] if threads is None else [list(threads[i : i + 500]) for i in range(0, len(threads), 500)]
        with saver.cursor() as cur:  # type: ignore[attr-defined]
            for query in ("SELECT thread_id, checkpoint, metadata FROM checkpoints",
                          "SELECT thread_id, value FROM writes"):  # fmt: skip
                for chunk in chunks:
                    where = "" if chunk is None else f" WHERE thread_id IN ({','.join('?' * len(chunk))})"
                    try:
                        rows = cur.execute(query + where, chunk or ())  # streamed, not all in memory
                    except sqlite3.OperationalError:  # no table yet: nothing was ever checkpointed
                        continue
                    for thread, *blobs in rows:
                        for blob in blobs:
                            if blob:
                                yield thread, blob.encode() if isinstance(blob, str) else blob
        return
    wanted = None if threads is None else set(threads)
    for part in (saver.storage, saver.writes, saver.blobs):  # type: ignore[attr-defined]
        for key, value in part.items():
            thread = key if isinstance(key, str) else key[0]  # storage: thread; others: (thread, ...)
            if wanted is None or thread in wanted:
                for blob in _stored_bytes(value):
                    yield thread, blob


def referenced_shas(saver: BaseCheckpointSaver[str], *, threads: Sequence[str] | None = None,
                    ) -> dict[str, set[str]]:  # fmt: skip
    """Thread id -> every sha256 (64 lowercase hex characters) in its checkpoints and
    pending writes in `saver` (of `threads` only, if given): the images its states refer to
    (a superset: any such string counts). Read from the serialized bytes; nothing is
    deserialized.

    Raises:
        TypeError: `saver` is neither a `SqliteSaver` nor an `InMemorySaver`.
    """
    _check_readable(saver)
    found: dict[str, set[str]] = {}
    for thread, blob in _blobs(saver, threads):
        found.setdefault(thread, set()).update(m.decode() for m in _SHA_BYTES_RE.findall(blob))
    return found


def last_written(saver: BaseCheckpointSaver[str], thread_id: str) -> float | None:
    """When `thread_id`'s newest checkpoint was written (POSIX seconds), None without one."""
    tup = saver.get_tuple({"configurable": {"thread_id": thread_id}})
    if tup is None:
        return None
    return dt.datetime.fromisoformat(tup.checkpoint["ts"]).timestamp()


COMPACT_MIN_FREE = 1 << 20  # bytes of free pages below which `compact` leaves the pages for reuse


def compact(saver: BaseCheckpointSaver[str]) -> int:
    """Give the pages of deleted threads back to the file system (SQLite only): `VACUUM` when
    a quarter of the pages or `COMPACT_MIN_FREE` bytes are free (else SQLite reuses them),
    then a truncating checkpoint of the write-ahead log the saver keeps. Returns the bytes
    the database's files shrank by; 0 while another connection holds them (a server)."""
    if not _is_sqlite(saver):
        return 0
    conn: sqlite3.Connection = saver.conn  # type: ignore[attr-defined]
    name = conn.execute("PRAGMA database_list").fetchone()[2]
    files = [Path(name), Path(f"{name}-wal")] if name else []

    def size() -> int:
        return sum(f.stat().st_size for f in files if f.is_file())

    def pragma(what: str) -> int:
        return int(conn.execute(f"PRAGMA {what}").fetchone()[0])

    with saver.lock:  # type: ignore[attr-defined]
        before = size()
        try:
            conn.commit()
            free, pages = pragma("freelist_count"), pragma("page_count")
            if free * pragma("page_size") >= COMPACT_MIN_FREE or 4 * free >= pages > 0 and free:
                conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.OperationalError:  # "database is locked": another process is writing
            return 0
        return max(0, before - size())
