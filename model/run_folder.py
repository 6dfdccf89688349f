"""What the two trainers (`training_vq`, `training`) share about a run folder.

A run folder holds one run: its checkpoint, its `metrics.jsonl` and what it exports. A
second command on the same folder resumes that run, so it must be the same run:
`check_resume` refuses other arguments (naming them) instead of training on with a new
learning rate, seed or mixture under the old run's name. The metrics log is cut back to
the checkpoint a resume starts from, so it reads as the uninterrupted run's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch


class RunFolderError(ValueError):
    """A run that cannot start or resume as asked: the arguments, not the training, are wrong."""


def load_checkpoint(path: str | Path, **kwargs: Any) -> Any:
    """`torch.load(path, **kwargs)`, with an error that names the file when it cannot be
    read (a torn copy, another program's file)."""
    try:
        return torch.load(path, **kwargs)
    except Exception as exc:  # torch raises RuntimeError, OSError, EOFError, pickle errors ...
        raise RunFolderError(f"cannot read the checkpoint {path} ({type(exc).__name__}: {exc}); it is damaged "
                         "or not a checkpoint of this trainer: restore it, or delete it to start the "
                         "run afresh") from exc  # fmt: skip


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`; a line a killed run left half-written is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def truncate_metrics(path: str | Path, step: int) -> None:
    """Keep the records of steps up to `step` (where a resume starts): drop those a run
    wrote after its last checkpoint, and any half-written line."""
    path = Path(path)
    if path.exists():
        kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def check_resume(folder: str | Path, saved: Mapping[str, Any], now: Mapping[str, Any],
                 may_change: Iterable[str] = ()) -> None:  # fmt: skip
    """Refuse (`RunFolderError`) to resume the run in `folder` with arguments other than the ones
    it was started with: `saved` and `now` map argument names to values; the names in
    `may_change` (where the run's files go, how often it logs, ...) may differ."""
    skip = set(may_change)
    changed = [k for k in sorted({*saved, *now} - skip) if saved.get(k) != now.get(k)]
    if changed:
        shown = ", ".join(f"{_flag(k)} {_show(saved.get(k))} -> {_show(now.get(k))}" for k in changed)
        raise RunFolderError(f"{folder} holds a run started with other arguments ({shown}); give the run's own "
                         "arguments to resume it, or another --out for a new run (a new stage from its "
                         "weights: --init-from with the model trainer)")  # fmt: skip


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show(value: Any) -> str:
    return "(none)" if value is None else json.dumps(value)
