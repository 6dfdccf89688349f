"""Run one t2i thread on a SQLite checkpointer; used by `test_persistence.py` in a subprocess.

Usage: python -m tests.graphs._crash_run DB ARTIFACTS THREAD [METHOD N]
With METHOD N the fake engine kills the process (`os._exit(17)`) on the N-th call of METHOD.
Prints `{"calls": {...}, "output": {...}}` as JSON when the run finishes.
"""

from __future__ import annotations

import json
import sys

from lavida_agent.graphs import t2i
from lavida_agent.graphs.context import Context
from lavida_agent.graphs.persistence import checkpointer_from_path
from lavida_agent.graphs.state import T2IOutput
from tests.fakes import FakeEngine


def main(argv: list[str]) -> None:
    db, artifacts, thread = argv[:3]
    exit_on = (argv[3], int(argv[4])) if len(argv) > 3 else None
    engine = FakeEngine(exit_on=exit_on, drop_labels=["blue square"])
    saver = checkpointer_from_path(db)
    g = t2i.build_t2i_graph().compile(checkpointer=saver)
    cfg = {"configurable": {"thread_id": thread}}
    ctx = Context(engine=engine, artifacts=artifacts, selection="accept", num_steps=2, max_rounds=3, seed=5, grounding_check="gate")
    # Resume when the thread has a pending checkpoint, otherwise start it.
    started = g.get_state(cfg).next
    payload = None if started else {"prompt": "red circle and blue square"}
    out = g.invoke(payload, cfg, context=ctx, durability="sync")
    result = T2IOutput.model_validate(out).model_dump(mode="json")
    print(json.dumps({"calls": dict(engine.calls), "output": result}))


if __name__ == "__main__":
    main(sys.argv[1:])
