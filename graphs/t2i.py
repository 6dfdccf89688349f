"""The `t2i` workflow: plan a layout, draw it, critique the image, refine until it passes.

    plan_layout -> review_plan -> generate_image -> critique_image -+-> END
                                                      ^             |
                                                      +- refine_image <-+

- `plan_layout` asks the model for a layout (skipped when the input carries a plan) and
  checks it against the prompt (`_verify.plan_problems`: objects, counts, relations and
  room on the canvas, read from the ShapesWorld grammar without the model). A plan that
  fails is recorded in `rejected_plans` with its problems and, up to `Context.plan_retries`
  times, another is sampled (temperature `Context.plan_temperature`, seed base + k). If
  every plan fails, the one with the fewest problems is drawn (the earliest on a tie), its
  problems kept on it. Prompts outside the grammar are not checked.
- `review_plan` is a light node that pauses with `interrupt()` when `Context.review_plan`
  is set; on resume only this node re-runs, so no model work repeats.
- `critique_image` uses the model only: its verdict plus grounding of every planned object
  (a planned object not found where planned is blamed). The verdict is the prompt checked
  against the scene the model perceives in the image (its caption, each captioned object
  grounded; `_verify.judge`, as in the `critique` workflow), or, when the caption does not
  parse whole or the prompt is outside the grammar, the model's critique answer
  (`Context.critique_by`). On the shipped model the perceived scene agrees with the
  detector on 0.90 of its own drawings where the critique answer agrees on 0.70. `Context.grounding_check`
  says whether a failed check also rejects the image ('gate') or only ranks attempts and
  picks the boxes to redraw ('rank', the default: on generated images the shipped
  model's grounding failed half of the images the detector calls correct, see
  `model/weights/README.md`). Reasons the prompt rules out (`missing blue circle` for a
  prompt without one) are dropped into `Critique.dropped_reasons`; a rejection made only of
  those misread the prompt, and the grounding checks decide instead.
- `critique_image` also reads the image token by token (`Engine.surprise`: each token
  masked and predicted back from its neighbours, with the prompt and plan and without). A
  mark away from every planned box that they argue against (a faint blob, a smear) rejects
  the image (`Context.stray_check="gate"`, the default), and the next attempt is drawn
  afresh. Attempts are ranked, after their verdict, by their worst token
  (`Context.rank_by="surprise"`, the default), or by their worst planned box's fit
  (`Engine.plan_fit`, `"fit"`), then by the critique score. On the shipped model the
  model's verdict and the grounding checks hardly tell a right image from a wrong one of
  the same prompt; the fit does better ("Stop 17"), and the worst token better still: a
  wrong drawing the model accepts is mostly a ragged shape or a smear, which the fit of a
  whole box averages away (`model/weights/README.md`, "Stop 43").
- `refine_image` either regenerates the whole image with the critique as feedback, or
  re-masks and redraws only the blamed boxes (masked diffusion can inpaint). Round `r` uses
  seed `base_seed + r`, recorded in its `Attempt`.
- With `Context.selection="best"` (the default) the loop always draws `max_rounds` images
  and keeps the best ranked: accepted first, then the worst token. With
  `"accept"` it stops at the first accepting critique, else keeps the best ranked. The
  kept attempt is `best` (the earliest on a tie) and `accepted` is its verdict. On the
  shipped model stopping at the first accepted attempt keeps fewer right images: 0.875 /
  0.964 of the prompts of tuning seeds 123 / 124 against 0.946 / 0.946 for `best`, which
  draws ~2.2x the images at 3 rounds (`model/weights/README.md`, "Stop 25").
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import interrupt

from lavida_agent.graphs._verify import grounding_checks, judge, make_critique, plan_problems
from lavida_agent.graphs.context import Context
from lavida_agent.graphs.engine import AGENT_VIEWS, as_plan_items
from lavida_agent.graphs.events import emit, node_events, step_callback
from lavida_agent.graphs.perceive import PERCEIVE_CANDIDATES, prompt_in_grammar, read_scene, warn_outside_grammar
from lavida_agent.graphs.state import (
    Attempt,
    Critique,
    LayoutItem,
    Plan,
    Stray,
    T2IInput,
    T2IOutput,
    T2IState,
    given_layout,
)
from lavida_agent.tools.shapes_world import language as lang

__all__ = (
    "build_t2i_graph",
    "critique_image",
    "generate_image",
    "graph",
    "plan_layout",
    "rank",
    "refine_image",
    "refine_mode",
    "review_answer",
    "review_plan",
    "route_after_critique",
)



def _context(runtime: Runtime[Context]) -> Context:
    return runtime.context if runtime.context is not None else Context()


# ----------------------------------------------------------------------------------------
# Nodes
# ----------------------------------------------------------------------------------------


def plan_layout(state: T2IState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Resolve the run's seed and bound, and plan the layout of the prompt.

    Args:
        state: needs `prompt`; `seed` and `plan` are optional inputs.
        runtime: the run's `Context` (engine, seed, max_rounds).

    Returns:
        `plan`, `rejected_plans`, `base_seed` and `max_rounds` (recorded so the run replays
        exactly).
    """
    ctx = _context(runtime)
    with node_events("plan_layout"):
        # Step 1: the base seed comes from the input, else the context; record it.
        base_seed = state.seed if state.seed is not None else ctx.seed
        warn_outside_grammar("t2i", "prompt", state.prompt, lang.parse_prompt,
                             "neither its plan nor its images are checked against it, the "
                             "verdict is the model's own critique")  # fmt: skip
        # Step 2: a plan given as input is used as is; otherwise the model plans, and plans
        # again while the plan check finds problems and retries remain.
        rejected: list[Plan] = []
        if state.plan is not None:
            plan = state.plan.model_copy(update={"source": "input"})
        else:
            plan, rejected = _checked_plan(ctx, state.prompt, base_seed)
        emit("plan", plan=plan.model_dump(mode="json"))
    return {"plan": plan, "rejected_plans": rejected, "base_seed": base_seed,
            "max_rounds": ctx.max_rounds, "selection": ctx.selection}  # fmt: skip


def _checked_plan(ctx: Context, prompt: str, base_seed: int) -> tuple[Plan, list[Plan]]:
    """The plan to draw and the plans turned down (see the module docstring); a
    `plan_rejected` event is streamed for each plan turned down."""
    engine, tried = ctx.get_engine(), []
    chosen: Plan | None = None
    for k in range(1 + ctx.plan_retries):
        temperature = 0.0 if k == 0 else ctx.plan_temperature
        items = engine.plan_layout(prompt, seed=base_seed + k, temperature=temperature)
        plan = Plan.from_engine(as_plan_items(items) or [], source="model", seed=base_seed + k,
                                temperature=temperature)  # fmt: skip
        problems = plan_problems(prompt, plan)
        if not problems:  # right, or a prompt the check cannot read
            chosen = plan
            break
        tried.append(plan.model_copy(update={"problems": problems}))
    if chosen is None:  # every plan failed: the one with the fewest problems is drawn
        chosen = tried.pop(min(range(len(tried)), key=lambda i: len(tried[i].problems)))
    for plan in tried:
        emit("plan_rejected", plan=plan.model_dump(mode="json"))
    return chosen, tried


def review_answer(answer: Any, *, canvas: int | None = None) -> list[LayoutItem] | None:
    """A plan reviewer's answer read: None to keep the plan (`None`, `True`, `"approve"`),
    else the replacement layout (a list of `{"label", "box"}`, or a dict with `"items"`).

    Raises:
        ValueError: naming what is wrong (an answer of another kind, or a bad item).
    """
    if answer is None or answer is True or answer == "approve":
        return None
    if isinstance(answer, dict) and "items" in answer:
        answer = answer["items"]
    if not isinstance(answer, list | tuple) or not answer:
        raise ValueError(f"review_plan: cannot use the answer {answer!r}: give True (or None, "
                         '"approve") to keep the plan, or a list of {"label", "box"} to '
                         "replace it (at least one item: an empty layout draws nothing)")  # fmt: skip
    return given_layout(answer, canvas=canvas)


def review_plan(state: T2IState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Pause for a human to approve or replace the plan (only when `Context.review_plan`).

    The interrupt payload is `{"kind": "review_plan", "prompt", "plan"}`. Resume with
    `Command(resume=...)` and an answer `review_answer` reads: `None`/`True`/`"approve"`
    keeps the plan; a list of `{"label", "box"}` items or a dict with `"items"` replaces it
    (source `user`). An answer it cannot use is asked for again, the payload then carrying
    `"problem"`: LangGraph gives each `interrupt` of a node its own resume value, so a bad
    answer never blocks the thread.
    """
    ctx = _context(runtime)
    if not ctx.review_plan or state.plan_reviewed:
        return {}
    plan = state.plan or Plan()
    payload = {"kind": "review_plan", "prompt": state.prompt, "plan": plan.model_dump(mode="json")}
    answer = interrupt(payload)
    canvas = getattr(ctx.get_engine(), "canvas", None)  # an engine that says its canvas: boxes must fit it
    while True:
        try:
            items = review_answer(answer, canvas=canvas)
            break
        except ValueError as exc:
            answer = interrupt({**payload, "problem": str(exc)})
    if items is not None:
        plan = Plan(items=items, source="user", seed=plan.seed)
        emit("plan", plan=plan.model_dump(mode="json"))
    return {"plan": plan, "plan_reviewed": True}


def generate_image(state: T2IState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Draw the first image (round 0) from the prompt and the plan.

    Returns:
        `attempts`: one new `Attempt` (appended).
    """
    ctx = _context(runtime)
    store = ctx.get_store()
    with node_events("generate_image"):
        # Step 1: round 0 uses the base seed itself.
        seed = _seed_for(state, 0)
        start = time.perf_counter()
        image = ctx.get_engine().generate(
            state.prompt,
            plan=state.plan.to_engine() if state.plan else None,
            seed=seed,
            num_steps=ctx.num_steps,
            feedback=None,
            on_step=step_callback("generate_image", store, ctx.preview_every),
        )
        elapsed = time.perf_counter() - start
        # Step 2: store the pixels; the state only holds the reference.
        attempt = Attempt(round=0, image=store.put(image), seed=seed, num_steps=ctx.num_steps,
                          mode="generate", plan=state.plan, timings={"sample_s": elapsed})  # fmt: skip
        emit("image", node="generate_image", attempt=attempt.model_dump(mode="json"))
    return {"attempts": [attempt]}


def critique_image(state: T2IState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Judge the newest attempt: the model's verdict plus grounding of the planned objects.

    Returns:
        `critiques` (one appended), `accepted` (this verdict) and `best` (best so far).
    """
    ctx = _context(runtime)
    store, engine = ctx.get_store(), ctx.get_engine()
    attempt = state.attempts[-1]
    with node_events("critique_image"):
        image = store.open(attempt.image)
        # Step 1: the model's verdict: the prompt checked against the scene it perceives,
        # else (no whole caption, a prompt outside the grammar) its own critique answer.
        by_scene = ctx.critique_by == "scene" and prompt_in_grammar(state.prompt)
        seen = read_scene(engine, image, candidates=PERCEIVE_CANDIDATES) if by_scene else None
        verdict = judge(engine, image, state.prompt, seen)
        # Step 2: ground every planned object and compare with where it was planned.
        planned = attempt.plan.items if attempt.plan and ctx.grounding_check != "off" else []
        found = engine.ground(image, [i.label for i in planned], views=AGENT_VIEWS) if planned else []
        checks = grounding_checks(planned, found, threshold=ctx.iou_threshold, role="planned")
        # Step 3: read the image token by token: its worst token (ranks attempts) and the
        # marks away from every planned box that the prompt and plan argue against.
        layout = attempt.plan.to_engine() if attempt.plan else []
        read = layout and (ctx.stray_check == "gate" or ctx.rank_by == "surprise")
        surprise = engine.surprise(image, state.prompt, plan=layout) if read else None
        marks = surprise.strays if surprise and ctx.stray_check == "gate" else []
        strays = [Stray(box=m["box"], score=m["score"]) for m in marks]
        # Step 4: how well the prompt and plan explain each planned box (ranks attempts).
        fit = engine.plan_fit(image, state.prompt, plan=layout) if layout and ctx.rank_by == "fit" else []
        # Step 5: one critique of the verdict, the checks, the strays and the fit. A model
        # rejection made only of reasons the prompt rules out leaves the verdict to the checks.
        critique = make_critique(round=attempt.round, image=attempt.image, model_ok=verdict.ok,
                                 model_reasons=verdict.reasons, dropped_reasons=verdict.dropped_reasons,
                                 model_text=verdict.text, checks=checks,
                                 gate=ctx.grounding_check == "gate", fit=fit,
                                 judged_by=verdict.judged_by, perception=seen, strays=strays,
                                 worst_token=surprise.worst if surprise else None)  # fmt: skip
        # Step 6: keep the best attempt so far (`rank`).
        critiques = [*state.critiques, critique]
        best = max(range(len(critiques)), key=lambda i: rank(critiques[i], i, ctx.rank_by))
        emit("critique", critique=critique.model_dump(mode="json"))
    return {"critiques": [critique], "accepted": critiques[best].accepted,
            "best": state.attempts[best]}  # fmt: skip


def rank(
    critique: Critique, index: int, by: Literal["fit", "score", "surprise"] = "fit"
) -> tuple[bool, float, float, int]:
    """Sort key of attempt `index` (higher is better): accepted first, then (`by`) the worst
    object's fit or the worst token's score (when measured), then the critique score, then
    the earliest."""
    value = critique.worst_token if by == "surprise" else critique.fit_score
    return (critique.accepted, -math.inf if value is None else value, critique.score, -index)


def refine_mode(
    refine: Literal["auto", "regenerate", "regions"], critique: Critique
) -> Literal["generate", "regenerate_regions"]:
    """How to refine after `critique`: redraw all, or only the blamed boxes (pure).

    Under "auto" an image with a stray mark is drawn afresh: redrawing the mark's region
    from the image around it grew the mark back (weights README, "Stop 43")."""
    if refine == "regenerate" or not critique.blamed:
        return "generate"  # nothing to re-mask: a region redraw needs blamed boxes
    if refine == "auto" and critique.strays:
        return "generate"
    return "regenerate_regions"


def refine_image(state: T2IState, runtime: Runtime[Context]) -> dict[str, Any]:
    """Draw the next attempt after a rejection, with seed `base_seed + round`.

    Returns:
        `attempts`: one new `Attempt` (appended).
    """
    ctx = _context(runtime)
    store, engine = ctx.get_store(), ctx.get_engine()
    last, critique = state.attempts[-1], state.critiques[-1]
    round_ = len(state.attempts)
    with node_events("refine_image"):
        # Step 1: choose the mode and derive this round's seed.
        mode = refine_mode(ctx.refine, critique)
        seed = _seed_for(state, round_)
        plan = state.plan.to_engine() if state.plan else None
        on_step = step_callback("refine_image", store, ctx.preview_every)
        start = time.perf_counter()
        # Step 2: regenerate with the critique as feedback, or redraw the blamed boxes only.
        if mode == "generate":
            image = engine.generate(state.prompt, plan=plan, seed=seed, num_steps=ctx.num_steps,
                                    feedback=list(critique.reasons), on_step=on_step)  # fmt: skip
            regions, parent, feedback = [], None, list(critique.reasons)
        else:
            regions = [item.box for item in critique.blamed]
            image = engine.regenerate_regions(
                store.open(last.image), state.prompt, plan=plan,
                boxes=[b.as_list() for b in regions], seed=seed, num_steps=ctx.num_steps,
                on_step=on_step,
            )  # fmt: skip
            parent, feedback = last.image, []
        attempt = Attempt(round=round_, image=store.put(image), seed=seed,
                          num_steps=ctx.num_steps, mode=mode, plan=state.plan,
                          feedback=feedback, regions=regions, parent=parent,
                          timings={"sample_s": time.perf_counter() - start})  # fmt: skip
        emit("image", node="refine_image", attempt=attempt.model_dump(mode="json"))
    return {"attempts": [attempt]}


def _seed_for(state: T2IState, round_: int) -> int:
    """Seed of round `round_`: base seed + round (the base is recorded by `plan_layout`)."""
    assert state.base_seed is not None, "plan_layout records base_seed first"
    return state.base_seed + round_


# ----------------------------------------------------------------------------------------
# Routers
# ----------------------------------------------------------------------------------------


def route_after_critique(state: T2IState) -> Literal["refine_image", "__end__"]:
    """Stop on an accepting critique (selection `accept`) or once `max_rounds` images exist;
    else refine."""
    if state.accepted and state.selection == "accept":
        return END
    if len(state.attempts) >= (state.max_rounds or 1):
        return END
    return "refine_image"


# ----------------------------------------------------------------------------------------
# Wiring
# ----------------------------------------------------------------------------------------


def build_t2i_graph() -> StateGraph[T2IState, Context, T2IInput, T2IOutput]:
    """The uncompiled `t2i` builder (compile it with the checkpointer you need)."""
    builder = StateGraph(T2IState, context_schema=Context, input_schema=T2IInput,
                         output_schema=T2IOutput)  # fmt: skip
    builder.add_node(plan_layout)
    builder.add_node(review_plan)  # light: a resume re-runs only this node
    builder.add_node(generate_image)
    builder.add_node(critique_image)
    builder.add_node(refine_image)
    builder.add_edge(START, "plan_layout")
    builder.add_edge("plan_layout", "review_plan")
    builder.add_edge("review_plan", "generate_image")
    builder.add_edge("generate_image", "critique_image")
    builder.add_conditional_edges("critique_image", route_after_critique, ["refine_image", END])
    builder.add_edge("refine_image", "critique_image")
    return builder


graph = build_t2i_graph().compile(name="t2i")
"""Compiled without a checkpointer (LangGraph server / `lavida_agent` supply one)."""
