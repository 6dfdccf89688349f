"""Edit sessions: a LangGraph thread of the `edit` workflow, with history, undo and branches.

A thread is a session. Each `EditSession.edit(instruction)` runs one turn of the `edit` graph
on the thread, so turns append to the same lineage (`EditState.steps`). Going back uses
LangGraph time travel: `branch(k)` finds the checkpoint written right after step `k` was
verified and writes a fork from it (`update_state(old_config, ..., as_node="commit_edit")`,
which also clears `run_id`: no run's unfinished work is left on the fork to resume)
that makes step `k`'s image the current one. The thread continues from the fork; the
original checkpoints stay in the history untouched, so any branch can be revisited.

The lineage is a DAG of images (content-addressed, so branches that share an image share a
node): an edge `parent -> result` per edit step, labelled with the instruction, seed and
verdict. `lineage_graph()` builds it with networkx, `lineage_json()` as node-link JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import networkx as nx
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import StateSnapshot

from lavida_agent.graphs.context import Context
from lavida_agent.graphs.edit import build_edit_graph
from lavida_agent.graphs.state import EditOutput, EditState, EditStep
from lavida_agent.tools.artifacts import ImageRef

__all__ = ("EditSession", "committed", "lineage_graph", "lineage_json", "step_key")


def lineage_graph(steps: Iterable[EditStep], heads: Sequence[int] = ()) -> nx.MultiDiGraph:
    """The edit lineage as a DAG of images (node = image sha256, edge = one edit step,
    keyed by `step_key`: two steps that made the same image from the same parent, a seed
    replayed on another branch, are two edges).

    Node attributes: `ref` (ImageRef dict). Edge attributes: `index`, `turn`, `round`,
    `instruction`, `seed`, `num_steps`, `verdict`, `head` (kept as the turn's result).
    """
    g = nx.MultiDiGraph()
    heads_set = set(heads)
    for s in steps:
        for ref in (s.parent, s.result):
            if ref.sha256 not in g:
                g.add_node(ref.sha256, ref=ref.to_dict())
        g.add_edge(
            s.parent.sha256, s.result.sha256, key=step_key(s), index=s.index, turn=s.turn, round=s.round,
            instruction=s.instruction, seed=s.seed, num_steps=s.num_steps,
            verdict=s.critique.verdict if s.critique else None, head=s.index in heads_set,
        )  # fmt: skip
    return g


def step_key(step: EditStep) -> str:
    """An edit step's lineage edge key: lineage indices are per branch, so two branches can
    each hold a step `#0`; the same step on two branches (before their fork) has one key."""
    return f"{step.index}:{step.turn}:{step.round}:{step.seed}:{step.instruction}"


def committed(state: EditState) -> list[EditStep]:
    """The turns that made the current image, oldest first: its step, that step's parent
    step, and so on back to an input image. A restart from a new image (`image` in a turn's
    input, or `Session.start`) begins a new history: the turns before it made another image."""
    out, i = [], state.current_step
    while i is not None:
        out.append(state.steps[i])
        i = state.steps[i].parent_step
    return out[::-1]


def lineage_json(steps: Iterable[EditStep], heads: Sequence[int] = ()) -> dict[str, Any]:
    """`lineage_graph` as node-link JSON: `{"nodes": [...], "edges": [...], ...}`."""
    data: dict[str, Any] = nx.node_link_data(lineage_graph(steps, heads), edges="edges")
    return data


class EditSession:
    """A multi-step edit session on one thread of a checkpointed `edit` graph.

    Args:
        thread_id: the session id (LangGraph thread).
        checkpointer: where the session lives (see `persistence.checkpointer_from_path`).
        context: the `Context` every turn runs with (engine, store, steps, ...).
    """

    def __init__(
        self, thread_id: str, *, checkpointer: BaseCheckpointSaver[str], context: Context
    ) -> None:
        self.thread_id = thread_id
        self.context = context
        self.graph: CompiledStateGraph[Any, Any, Any, Any] = build_edit_graph().compile(
            checkpointer=checkpointer, name="edit"
        )

    @property
    def config(self) -> RunnableConfig:
        """The thread's config (latest checkpoint)."""
        return {"configurable": {"thread_id": self.thread_id}}

    # -- running --------------------------------------------------------------------------

    def edit(
        self, instruction: str, *, image: ImageRef | None = None, seed: int | None = None
    ) -> EditOutput:
        """Run one turn: edit the current image (or `image`, which (re)starts the session)."""
        # `image` always goes in (None included): an earlier turn that restarted from an
        # image and never committed must not leave that image as this turn's source.
        payload: dict[str, Any] = {"instruction": instruction, "image": image, "run_id": None}
        if seed is not None:
            payload["seed"] = seed
        out = self.graph.invoke(payload, self.config, context=self.context)
        return EditOutput.model_validate(out)

    # -- reading --------------------------------------------------------------------------

    def state(self) -> EditState:
        """The session's state at its latest checkpoint."""
        return EditState.model_validate(self.graph.get_state(self.config).values)

    def history(self) -> list[EditStep]:
        """The turns that made the current image, oldest first (`committed`)."""
        return committed(self.state())

    def snapshots(self) -> list[StateSnapshot]:
        """Every checkpoint of the thread, all branches, newest first."""
        return list(self.graph.get_state_history(self.config))

    def lineage(self, *, all_branches: bool = False) -> nx.MultiDiGraph:
        """The lineage DAG of this branch, or of every branch the thread ever had."""
        if not all_branches:
            st = self.state()
            return lineage_graph(st.steps, st.heads)
        g = nx.MultiDiGraph()
        for snap in self.snapshots():  # newest first; a step kept as its turn's result stays kept
            st = EditState.model_validate({"instruction": "", **snap.values})
            kept = [(u, v, k) for u, v, k, head in g.edges(keys=True, data="head") if head]
            g = nx.compose(g, lineage_graph(st.steps, st.heads))
            for u, v, k in kept:
                g.edges[u, v, k]["head"] = True
        return g

    # -- time travel ----------------------------------------------------------------------

    def branch(self, step: int, *, at: RunnableConfig | None = None) -> RunnableConfig:
        """Fork the session so that lineage step `step`'s image is the current one.

        The fork is written from the checkpoint (on the current branch) taken right after
        `step` was verified, so the new branch's lineage is `steps[: step + 1]`; the next
        `edit()` continues from it.

        Args:
            step: index of the lineage step whose image becomes current.
            at: a checkpoint config on another branch (from `snapshots()`) whose lineage
                holds `step`; default: the current branch.

        Returns:
            The config of the fork's checkpoint.

        Raises:
            ValueError: no checkpoint of this thread holds lineage step `step`.
        """
        snap = self._earliest_with(step + 1, at)
        st = EditState.model_validate(snap.values)
        target = st.steps[step]
        update = {"current": target.result, "current_step": step, "heads": [step],
                  "turn": target.turn + 1, "image": None, "candidate": None,
                  "accepted": bool(target.critique and target.critique.accepted),
                  "undone": self._undone_after_move(), "run_id": None}  # fmt: skip
        return self.graph.update_state(snap.config, update, as_node="commit_edit")

    def undo(self) -> RunnableConfig:
        """Go back one turn: fork from the parent of the current head.

        When the head was made from an input image, the fork goes back to that image, from
        the checkpoint taken before the turn's first attempt.

        Raises:
            ValueError: the session has nothing to undo.
        """
        st = self.state()
        if st.current is None:
            raise ValueError("nothing to undo: the session has no image yet")
        if st.current_step is None:
            raise ValueError("nothing to undo: no edit made the current image (it is the session's input)")
        head = st.steps[st.current_step]
        if head.parent_step is not None:
            return self.branch(head.parent_step)
        # The head was drawn from an input image: fork from just before that turn started.
        first = min(s.index for s in st.steps if s.turn == head.turn)
        snap = self._latest_with(first, turn=head.turn)
        update = {"current": head.parent, "current_step": None, "image": None,
                  "candidate": None, "turn": head.turn, "accepted": False,
                  "undone": self._undone_after_move(), "run_id": None}  # fmt: skip
        return self.graph.update_state(snap.config, update, as_node="commit_edit")

    def redo(self) -> RunnableConfig:
        """Return to where the last `undo` (or `branch`) left from: its state, forked anew.

        Undo, undo, redo, redo walks back and forth; a committed edit ends the redo list.

        Returns:
            The config of the fork's checkpoint.

        Raises:
            ValueError: nothing to redo (no undo or branch since the last committed edit).
        """
        undone = self.state().undone
        if not undone:
            raise ValueError("nothing to redo: no undo or branch since the last edit")
        left = {"configurable": {**self.config["configurable"], "checkpoint_ns": "",
                                 "checkpoint_id": undone[-1]}}  # fmt: skip
        return self.graph.update_state(left, {"undone": undone[:-1], "run_id": None},
                                       as_node="commit_edit")  # fmt: skip

    def _undone_after_move(self) -> list[str]:
        """`undone` for a move away from the latest checkpoint: that checkpoint pushed."""
        snap = self.graph.get_state(self.config)
        return [*snap.values.get("undone", []), snap.config["configurable"]["checkpoint_id"]]

    def ancestry(self, at: RunnableConfig | None = None) -> list[StateSnapshot]:
        """The checkpoints of one branch (default: the current one), newest first."""
        out, snap = [], self.graph.get_state(at or self.config)
        while snap is not None and snap.config is not None:
            out.append(snap)
            parent = snap.parent_config
            snap = self.graph.get_state(parent) if parent is not None else None
        return out

    def _lineage_len(self, snap: StateSnapshot) -> int:
        return len(snap.values.get("steps", []))

    def _earliest_with(self, n_steps: int, at: RunnableConfig | None) -> StateSnapshot:
        found = [s for s in self.ancestry(at) if self._lineage_len(s) == n_steps]
        if not found:
            raise ValueError(f"no checkpoint holds lineage step {n_steps - 1}")
        return found[-1]  # history is newest first

    def _latest_with(self, n_steps: int, *, turn: int) -> StateSnapshot:
        for s in self.ancestry():
            if self._lineage_len(s) == n_steps and s.values.get("turn", 0) == turn:
                return s
        raise ValueError(f"no checkpoint before turn {turn}")
