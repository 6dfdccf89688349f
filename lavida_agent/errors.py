"""The public exception hierarchy, and `map_exceptions()` to convert lower-layer errors into it.

Every exception lavida-agent raises on purpose is a `LavidaError`; its message is written for
the user (the CLI prints it as one `Error: ...` line, the server returns it as the error
detail). Each class carries a stable `code` and the HTTP status a server should answer with.

    LavidaError
    ├── InvalidInputError      (also a ValueError)
    │   ├── NotFoundError      (also a KeyError)
    │   └── BusyError
    ├── ModelLoadError
    ├── GenerationCancelled
    └── WorkflowError

`map_exceptions()` is used at the API boundary (`api.py`): `ImageError`, `ValueError`s from
the model and graphs, a missing artifact, a missing model package, a cancelled request and
LangGraph's recursion guard become the public types, chained (`raise ... from exc`) so the
original traceback stays available under `--debug`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
from collections.abc import Iterator, Mapping

__all__ = (
    "BusyError",
    "GenerationCancelled",
    "InvalidInputError",
    "LavidaError",
    "ModelLoadError",
    "NotFoundError",
    "WorkflowError",
    "map_exceptions",
)


class LavidaError(Exception):
    """Base of every error lavida-agent raises on purpose; the message is shown to the user."""

    code = "lavida_error"
    http_status = 500

    def __str__(self) -> str:
        # KeyError's str() adds quotes around the message; we never want them.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


# -- the caller's input -------------------------------------------------------------------


class InvalidInputError(LavidaError, ValueError):
    """An argument, image, setting or request is not acceptable (nothing was run)."""

    code = "invalid_input"
    http_status = 400


class NotFoundError(InvalidInputError, KeyError):
    """A run, session, trace or artifact id that does not exist."""

    code = "not_found"
    http_status = 404


class BusyError(InvalidInputError):
    """A session or run is taken by a run in progress (here or in another process): nothing
    was run; try again when that run ends."""

    code = "busy"
    http_status = 409


# -- the model ----------------------------------------------------------------------------


class ModelLoadError(LavidaError):
    """The model checkpoint could not be found or loaded."""

    code = "model_load_error"
    http_status = 503


class GenerationCancelled(LavidaError):
    """A run was cancelled before it finished (by the caller, a disconnect or Ctrl-C)."""

    code = "cancelled"
    http_status = 499


# -- the workflows ------------------------------------------------------------------------


class WorkflowError(LavidaError):
    """A workflow failed while running (a node raised, or a loop hit its recursion bound)."""

    code = "workflow_error"
    http_status = 500


ExceptionMapping = Mapping[type[BaseException], type[LavidaError]]


@functools.cache
def default_mapping() -> dict[type[BaseException], type[LavidaError]]:
    """Lower-layer exception -> public exception, most specific first (imported lazily)."""
    from langgraph.errors import GraphRecursionError

    from lavida_agent.graphs.engine import EngineUnavailableError
    from lavida_agent.graphs.runtime import EngineClosedError
    from lavida_agent.tools.artifacts import ArtifactNotFound
    from lavida_agent.tools.images import ImageError

    return {
        EngineUnavailableError: ModelLoadError,
        EngineClosedError: WorkflowError,
        ArtifactNotFound: NotFoundError,
        ImageError: InvalidInputError,
        concurrent.futures.CancelledError: GenerationCancelled,
        GraphRecursionError: WorkflowError,
        ValueError: InvalidInputError,
    }


@contextlib.contextmanager
def map_exceptions(mapping: ExceptionMapping | None = None) -> Iterator[None]:
    """Convert lower-layer exceptions raised in the block into public `LavidaError`s.

    The first matching entry of `mapping` (default: `default_mapping()`) wins; a
    `LavidaError` passes through unchanged, and anything unmapped (a bug) propagates as is.

    Example:
        >>> with map_exceptions():
        ...     load_image("missing.png")   # ImageError -> InvalidInputError
    """
    try:
        yield
    except LavidaError:
        raise
    except Exception as exc:
        for source, target in (mapping if mapping is not None else default_mapping()).items():
            if isinstance(exc, source):
                raise target(_message(exc)) from exc
        raise


def _message(exc: BaseException) -> str:
    """A one-line message for `exc` (pydantic errors and KeyErrors included)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(text.split())
    return text or type(exc).__name__
