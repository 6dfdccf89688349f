"""Checkpointers for the workflows: in memory, SQLite file (sync) and SQLite (async).

All of them use `make_serde()`, a msgpack serializer that allows exactly the value types of
`state.py` (and `ImageRef`) to be loaded back, so reloading a checkpoint neither warns about
unregistered types nor accepts arbitrary classes.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from lavida_agent.graphs.state import STATE_VALUE_TYPES

__all__ = ("async_checkpointer_from_path", "checkpointer_from_path", "make_serde")

MEMORY = ":memory:"


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
