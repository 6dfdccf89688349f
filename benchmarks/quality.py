"""ShapesWorld quality benchmark: held-out suites scored by the classical detector only.

    python -m lavida_agent.benchmarks.quality --out bench_out/quality [--n 32] [--quick]
        [--suites t2i,edit,...] [--model-path DIR] [--agent-rounds 1,2,4]

Every number comes from `tools/shapes_world` (detector, `check_prompt`, `check_edit`,
`grounding_correct`, `answer_correct`); the model is never asked to judge anything except in
the `critique` suite (whose *subject* is the model's verdict) and inside the agent loop
(whose critique is part of the system under test). The suites:

- `vq`: VQ round trip (`training_vq.evaluate_vq`): the detector finds the same scene on
  `decode(encode(render(scene)))` as on `render(scene)` (`8 n` scenes); and how local the
  codes are (`training_vq.edit_locality`, `8 n` object edits): the share of codes outside
  an edit's touched cells that change, where no pixel does (0 for a local tokenizer).
- `t2i`: `n` prompts per GenEval-style category; single shot (`generate`) and with the
  model's own plan (`plan`, then `generate(plans=...)`), same sampler seeds. Also whether
  the plan itself, read as a scene, satisfies the prompt.
- `edit`: `n` instructions per ImgEdit-style category on rendered scenes; `check_edit`
  correctness and PSNR outside the touched boxes; single shot (`edit`) and with the model's
  own edit plan (`plan_edit`, then `edit(plans=..., regions=...)`), and with the true plan
  and regions (the drawer alone: the edit analogue of t2i from the true layout), same seeds.
  Also whether the model's edit plan, applied to the source scene, makes the edit
  (`edit_plan_correct`).
- `ground`: `5 n` scenes with up to 3 unambiguous referring expressions each; Acc@0.5 with
  one expression per call row (`single`) and all of a scene's expressions in one row
  (`multi`).
- `vqa`: `n` questions per kind; exact answers after normalisation.
- `critique`: the model's verdict (`critique().ok`) vs the detector's (`check_prompt`) on
  `7 n` `sample_critique` renders (about half correct, half corrupted), and on the model's own
  single-shot t2i images when the `t2i` suite ran; each also through the `critique` workflow
  (`workflow_*`: the prompt checked against the scene the model perceives).
- `agent`: the LangGraph `t2i` workflow (plan, generate, model critique, refine) and `edit`
  workflow (plan, edit, model verify, re-edit) through a `BatchingEngine`, for each
  `max_rounds` in `agent_rounds`; the final image is scored by the detector and compared
  with single shot on the same prompts and base seeds.
- `ask`: the LangGraph `understand` workflow (what `lavida-agent ask` runs) on the `vqa`
  suite's questions: object questions read off the scene the model perceives (its caption,
  each object grounded), the others answered directly; per kind, with the share answered
  from the scene and the `vqa` suite's direct accuracy beside it when that suite ran.
- `agent_ground`: the LangGraph `ground` workflow (what `lavida-agent ground` runs) on the
  `ground` suite's expressions, single and multi, Acc@0.5; and whether it says each referent
  is in the image (`present`): for those expressions (all present), and for expressions
  naming nothing in the image (`absent_expressions`: an absent colour and shape, shape, size
  class, and relation head; all of an image's in one run).
- `session`: multi-turn editing. `n` chains of `session_turns` edits (`session_items`: each a
  random edit of the scene the chain should hold by then), run through the pipeline alone
  (single shot; with the model's edit plan) and as an `EditSession` (the agent, what
  `lavida-agent session edit` runs). Each turn is judged by `check_edit` on the image it
  edited; reported per turn: accuracy, accuracy on the chains right so far, and the chains
  right through it; and drift: the untouched objects' PSNR after the last turn.

Held-out data: training draws `numpy.random.default_rng([seed, step])` with small seeds;
here item `i` of suite `s` draws from `default_rng([10**9 + 1000 * seed + index(s), *key])`,
a stream disjoint from training's. Sampler seeds are `100 * seed_index` (room for agent
rounds, which use `base + round`). Items are prefix-stable: a larger `n` extends a smaller
one.

Outputs in `out_dir`: `quality.json` (every number, settings, command, seeds, timings),
`quality.md` (one table per suite), `samples_t2i.png`, `samples_edit.png` and
`samples_session.png`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import math
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lavida_agent.tools.boxes import iou
from lavida_agent.tools.draw import make_grid
from lavida_agent.tools.images import save_image
from lavida_agent.tools.shapes_world.checkers import (
    answer_correct,
    check_edit,
    check_prompt,
    grounding_correct,
    psnr,
)
from lavida_agent.tools.shapes_world.language import (
    EDIT_CATEGORIES,
    PROMPT_CATEGORIES,
    QUESTION_KINDS,
    REF_FORMS,
    GrammarError,
    parse_edit,
    parse_verdict,
    plan_items,
    plan_objects,
    plan_reasons,
    referable,
    sample_critique,
    sample_edit,
    sample_edit_on_new_scene,
    sample_prompt,
    sample_question,
    sample_refexp,
    scene_for_prompt,
)
from lavida_agent.tools.shapes_world.render import render
from lavida_agent.tools.shapes_world.sampler import sample_scene
from lavida_agent.tools.shapes_world.scene import COLORS, RELATIONS, SHAPES, Scene, valid_scene

logger = logging.getLogger(__name__)

__all__ = [
    "HELDOUT_BASE",
    "SUITES",
    "PSNR_CAP",
    "suite_seed",
    "item_rng",
    "t2i_items",
    "edit_items",
    "ground_items",
    "vqa_items",
    "critique_items",
    "plan_correct",
    "edit_plan_correct",
    "score_t2i",
    "score_plans",
    "score_edit",
    "score_ground",
    "score_vqa",
    "score_critique",
    "score_agent_t2i",
    "score_agent_edit",
    "score_agent_ask",
    "score_agent_ground",
    "session_items",
    "judge_chain",
    "kept_mask",
    "score_session",
    "score_agent_session",
    "absent_expressions",
    "run",
    "main",
]

HELDOUT_BASE = 10**9
"""First element of every held-out seed sequence (training uses small seeds)."""
SUITES: tuple[str, ...] = (
    "vq", "t2i", "edit", "ground", "vqa", "critique", "agent", "ask", "agent_ground", "session"
)  # fmt: skip
# (new suites go last: an index into this tuple seeds each suite's held-out items)
AGENT_TASKS: tuple[str, ...] = ("t2i", "edit")
"""The agent suite's workflows; `agent_tasks` runs a subset (an edit change needs no t2i run)."""
PSNR_CAP = 100.0
"""PSNR of identical pixels (inf) is reported as this many dB, as `evaluate_vq` does."""
SEED_STRIDE = 100
"""Sampler base seeds are `SEED_STRIDE * (k + 1) + 10**6 * seed`: room for `base + round`."""
MULTI_EXPRESSIONS = 3
"""Most referring expressions per ground scene."""
DEFAULT_N = 32
QUICK_N = 1
QUICK_STEPS = 4
"""Sampler steps of a quick run when none are given (a smoke run, not a measurement)."""
VQ_PER_N = 8
"""The vq suite round-trips `VQ_PER_N * n` scenes (it is cheap)."""
SESSION_TURNS = 5
"""Edits per chain in the session suite (multi-turn editing)."""
QUICK_TURNS = 2
"""Edits per chain of a quick run when no turns are given."""


# =========================================================================== seeds and items


def suite_seed(seed: int, suite: str) -> int:
    """The held-out entropy of `suite` for run seed `seed` (>= 10**9, disjoint from training)."""
    return HELDOUT_BASE + 1000 * int(seed) + SUITES.index(suite)


def item_rng(seed: int, suite: str, *key: int) -> np.random.Generator:
    """The generator of one item: `default_rng([suite_seed(seed, suite), *key])`."""
    return np.random.default_rng([suite_seed(seed, suite), *(int(k) for k in key)])


def sampler_seed(seed: int, k: int) -> int:
    """Sampler base seed of the `k`-th item of a suite (agent round r uses base + r)."""
    return 10**6 * int(seed) + SEED_STRIDE * (int(k) + 1)


def t2i_items(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` held-out prompts per category: `{category, index, prompt, seed, true_plan}`."""
    items = []
    for ci, cat in enumerate(PROMPT_CATEGORIES):
        for i in range(n):
            text, spec = sample_prompt(item_rng(seed, "t2i", ci, i), cat)
            scene = scene_for_prompt(item_rng(seed, "t2i", ci, i, 1), spec)  # its own stream
            items.append(
                {
                    "category": cat,
                    "index": i,
                    "prompt": text,
                    "seed": sampler_seed(seed, ci * 10_000 + i),
                    # a layout that satisfies the prompt: drawing from it measures the drawer
                    # apart from the planner
                    "true_plan": [(label, tuple(int(v) for v in box)) for label, box in plan_items(scene, order="scene")],
                }
            )
    return items


def edit_items(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` held-out edits per category: `{category, index, scene, instruction, target, seed}`."""
    items = []
    for ci, cat in enumerate(EDIT_CATEGORIES):
        for i in range(n):
            scene, text, _, target = sample_edit_on_new_scene(item_rng(seed, "edit", ci, i), cat)
            items.append(
                {
                    "category": cat,
                    "index": i,
                    "scene": scene,
                    "instruction": text,
                    "target": target,
                    "seed": sampler_seed(seed, ci * 10_000 + i),
                }
            )
    return items


def session_items(n: int, seed: int = 0, turns: int = SESSION_TURNS) -> list[dict[str, Any]]:
    """`n` held-out edit chains: `{index, scene, instructions, categories, targets, seeds}`.

    Each chain starts from a random scene; every turn is a random edit (`sample_edit`: a
    category drawn uniformly and drawn again when it does not apply, so `add` and `move`,
    which need room, come less often) of the scene the chain is expected to hold by then,
    so each instruction names objects the earlier turns left unique. Turn `t` of chain `i`
    samples with `sampler_seed(seed, 100 * i + t)` (the seeds the other suites give their
    first category's items; the inputs differ). Prefix-stable in `n` and in `turns`.
    """
    if not 1 <= turns < SEED_STRIDE:
        raise ValueError(f"turns must be in 1..{SEED_STRIDE - 1}, got {turns}")
    items = []
    for i in range(n):
        rng = item_rng(seed, "session", i)
        scene = expected = sample_scene(rng)
        instructions, categories, targets = [], [], []
        for _ in range(turns):
            text, spec, expected = sample_edit(rng, expected)
            instructions.append(text)
            categories.append(spec.category)
            targets.append(expected)
        items.append({"index": i, "scene": scene, "instructions": instructions, "categories": categories,
                      "targets": targets, "seeds": [sampler_seed(seed, 100 * i + t) for t in range(turns)]})  # fmt: skip
    return items


def ground_items(
    n: int, seed: int = 0, max_expressions: int = MULTI_EXPRESSIONS
) -> list[dict[str, Any]]:
    """`n` held-out scenes with up to `max_expressions` distinct unambiguous expressions.

    Each item: `{index, scene, expressions: [text], forms: [form], boxes: [true box]}`.
    """
    items = []
    for i in range(n):
        rng = item_rng(seed, "ground", i)
        scene = sample_scene(rng)
        while not referable(scene):  # never at the published seeds; kept for any other
            scene = sample_scene(rng)
        texts, forms, boxes = [], [], []
        for _ in range(4 * max_expressions):
            if len(texts) == max_expressions:
                break
            text, spec, idx = sample_refexp(rng, scene)
            if text not in texts:
                texts.append(text)
                forms.append(spec.form)
                boxes.append(tuple(scene.objects[idx].box))
        items.append(
            {"index": i, "scene": scene, "expressions": texts, "forms": forms, "boxes": boxes}
        )
    return items


ABSENT_FORMS: tuple[str, ...] = ("color", "shape", "size", "relation")
"""How an absent referent is named (`absent_expressions`)."""


def absent_expressions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """`(form, expression)` pairs naming nothing in `scene`, one per `ABSENT_FORMS` form the
    scene allows: a colour and shape no object has; a shape no object has; an object's colour
    and shape in the other size class; a relation whose anchor is a present object and whose
    head is the first form's absent noun."""
    objs = scene.objects
    have = {(o.color, o.shape) for o in objs}
    combos = [(c, sh) for c in COLORS for sh in SHAPES if (c, sh) not in have]
    color, shape = combos[rng.integers(len(combos))]
    out = [("color", f"the {color} {shape}")]
    if shapes := [sh for sh in SHAPES if sh not in {o.shape for o in objs}]:
        out.append(("shape", f"the {shapes[rng.integers(len(shapes))]}"))
    for o in objs:
        other = "large" if o.size == "small" else "small"
        if not any((p.color, p.shape, p.size) == (o.color, o.shape, other) for p in objs):
            out.append(("size", f"the {other} {o.color} {o.shape}"))
            break
    anchor = objs[rng.integers(len(objs))]
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    out.append(("relation", f"the {color} {shape} {relation} the {anchor.color} {anchor.shape}"))
    return out


def vqa_items(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` held-out questions per kind: `{kind, index, scene, question, answer}`."""
    items = []
    for ki, kind in enumerate(QUESTION_KINDS):
        for i in range(n):
            rng = item_rng(seed, "vqa", ki, i)
            found = None
            while found is None:
                scene = sample_scene(rng)
                for _ in range(50):  # kinds are drawn uniformly; keep the one asked for
                    q, spec, ans = sample_question(rng, scene)
                    if spec.kind == kind:
                        found = (scene, q, ans)
                        break
            scene, q, ans = found
            items.append({"kind": kind, "index": i, "scene": scene, "question": q, "answer": ans})
    return items


def critique_items(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` held-out `sample_critique` triples: `{index, prompt, scene, label}` (label = verdict)."""
    items = []
    for i in range(n):
        prompt, scene, label = sample_critique(item_rng(seed, "critique", i))
        items.append({"index": i, "prompt": prompt, "scene": scene, "label": label})
    return items


# =========================================================================== helpers


def _chunks(n: int, size: int) -> list[slice]:
    size = max(1, int(size))
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


def _mean(values: Sequence[float]) -> float | None:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(vals) / len(vals) if vals else None


def _acc_by(
    records: Sequence[dict], group: str, keys: Sequence[str], field: str = "correct"
) -> dict:
    """`{key: accuracy}` over `keys` (groups with no records are left out) plus `overall`."""
    out: dict[str, Any] = {}
    for k in keys:
        vals = [r[field] for r in records if r[group] == k]
        if vals:
            out[k] = _mean(vals)
    out["overall"] = _mean([r[field] for r in records])
    return out


def _psnr(value: float) -> float:
    return PSNR_CAP if math.isinf(value) else float(value)


def _gen_kwargs(num_steps: int | None) -> dict[str, Any]:
    return {} if num_steps is None else {"num_steps": int(num_steps)}


def _canvas(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


# =========================================================================== scorers


def plan_correct(prompt: str, plan: Sequence[tuple[str, Sequence[int]]] | None) -> bool:
    """Does a plan, read as a scene, satisfy the prompt? (`language.plan_reasons`: the check
    the t2i workflow runs on its own plans; background not judged.)"""
    return not plan_reasons(prompt, plan)


def edit_plan_correct(source: Scene, instruction: str, plan: Sequence[tuple[str, Sequence[int]]] | None) -> bool:
    """Does an edit plan, applied to the source scene, make the edit `check_edit` asks for?

    The edit analogue of `plan_correct`. Each `removed` item takes away the source object
    its box overlaps most (IoU >= 0.5, else the plan is wrong); every other item must read
    `{size} {color} {shape}` and is put in at its box; the result must be a scene the world
    can hold and pass `check_edit` against the source. Any valid answer counts (an added
    object may sit anywhere the instruction allows), not only the benchmark's own target. A
    background edit touches no box: its plan is right when empty.
    """
    plan = list(plan or [])
    if parse_edit(instruction).category == "background":
        return not plan
    kept = list(source.objects)
    new = plan_objects([item for item in plan if item[0] != "removed"])
    if not plan or new is None:
        return False
    for _, box in (item for item in plan if item[0] == "removed"):
        overlap = [iou(box, o.box) for o in kept]
        if not overlap or max(overlap) < 0.5:
            return False
        kept.pop(int(np.argmax(overlap)))
    result = Scene(source.background, tuple(kept + new))
    return valid_scene(result) and check_edit(source, instruction, result).correct


def score_plans(
    pipeline: Any, prompts: Sequence[str], seeds: Sequence[int], *, batch_size: int = 16
) -> list[dict[str, Any]]:
    """Plan every prompt (`pipeline.plan`, batched); `{prompt, seed, plan, plan_correct}` each."""
    out: list[dict[str, Any]] = []
    for sl in _chunks(len(prompts), batch_size):
        res = pipeline.plan(list(prompts[sl]), seed=[int(s) for s in seeds[sl]])
        for p, s, plan in zip(prompts[sl], seeds[sl], res.plans, strict=True):
            out.append(
                {
                    "prompt": p,
                    "seed": int(s),
                    "plan": list(plan),
                    "plan_correct": plan_correct(p, plan),
                }
            )
    return out


def score_t2i(
    pipeline: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    plans: Sequence[Any] | None = None,
    *,
    batch_size: int = 16,
    num_steps: int | None = None,
) -> list[dict[str, Any]]:
    """Generate each prompt (batched, one seed each) and judge it with `check_prompt`.

    Args:
        pipeline: anything with `generate(prompts, plans=..., seed=[...])` returning `.images`.
        prompts, seeds: one sampler seed per prompt.
        plans: one plan per prompt (as `pipeline.plan` returns them) or None (single shot).

    Returns:
        One `{prompt, seed, correct, reasons, image}` per prompt.
    """
    if len(seeds) != len(prompts) or (plans is not None and len(plans) != len(prompts)):
        raise ValueError("prompts, seeds and plans must have the same length")
    out: list[dict[str, Any]] = []
    for sl in _chunks(len(prompts), batch_size):
        kw = _gen_kwargs(num_steps)
        if plans is not None:
            kw["plans"] = list(plans[sl])
        res = pipeline.generate(list(prompts[sl]), seed=[int(s) for s in seeds[sl]], **kw)
        for p, s, image in zip(prompts[sl], seeds[sl], res.images, strict=True):
            verdict = check_prompt(p, _canvas(image))
            out.append(
                {
                    "prompt": p,
                    "seed": int(s),
                    "correct": verdict.correct,
                    "reasons": list(verdict.reasons),
                    "image": _canvas(image),
                }
            )
    return out


def _edit_images(
    pipeline: Any,
    images: Sequence[np.ndarray],
    instructions: Sequence[str],
    seeds: Sequence[int],
    *,
    batch_size: int = 16,
    num_steps: int | None = None,
    with_plan: bool = False,
    true_plans: Sequence[Any] | None = None,
) -> tuple[list[np.ndarray], list[Any]]:
    """The pipeline's edits of `images` (batched), as `score_edit` describes them: the
    edited images and, per edit, the plan it was given (None for a single shot)."""
    edited: list[np.ndarray] = []
    plans_out: list[Any] = []
    for sl in _chunks(len(images), batch_size):
        seed_list = [int(s) for s in seeds[sl]]
        kw: dict[str, Any] = {}
        plans: list[Any] = [None] * len(seed_list)
        if with_plan or true_plans is not None:
            plans = (list(true_plans[sl]) if true_plans is not None
                     else pipeline.plan_edit(images[sl], list(instructions[sl]), seed=seed_list).plans)  # fmt: skip
            kw = {"plans": [pl or None for pl in plans],
                  "regions": [[box for _, box in pl] if pl else None for pl in plans]}  # fmt: skip
        res = pipeline.edit(images[sl], list(instructions[sl]), seed=seed_list, **kw, **_gen_kwargs(num_steps))
        edited += [_canvas(image) for image in res.images]
        plans_out += plans
    return edited, plans_out


def score_edit(
    pipeline: Any,
    sources: Sequence[Scene],
    instructions: Sequence[str],
    seeds: Sequence[int],
    *,
    batch_size: int = 16,
    num_steps: int | None = None,
    with_plan: bool = False,
    true_plans: Sequence[Any] | None = None,
) -> list[dict[str, Any]]:
    """Edit the renders of `sources` (batched) and judge with `check_edit`.

    With `with_plan` the model first plans each edit (`pipeline.plan_edit`, same seed), then
    edits with that plan as its condition and the plan's boxes as the regions to redraw
    (`edit(plans=..., regions=...)`); an empty plan (a background edit) redraws the whole
    image. Single shot (`with_plan=False`) is one `edit` call with neither. `true_plans`
    (one `touched_plan` per edit) does the same with the true plan instead of the model's:
    the drawer alone, told what changes where (the edit analogue of "t2i from the true
    layout").

    Returns:
        One `{instruction, seed, correct, reasons, psnr_outside, image}` per edit (and `plan`
        with `with_plan`); PSNR in dB over the pixels outside the touched boxes, identical
        pixels reported as `PSNR_CAP`.
    """
    planned = with_plan or true_plans is not None
    edited, plans = _edit_images(pipeline, [render(s) for s in sources], instructions, seeds,
                                 batch_size=batch_size, num_steps=num_steps, with_plan=with_plan,
                                 true_plans=true_plans)  # fmt: skip
    out: list[dict[str, Any]] = []
    for src, ins, s, image, plan in zip(sources, instructions, seeds, edited, plans, strict=True):
        rec = {"instruction": ins, "seed": int(s), **_judge_edit(src, ins, image), "image": image}
        if planned:
            rec["plan"] = [[label, list(box)] for label, box in plan]
        out.append(rec)
    return out


def _judge_edit(source: Any, instruction: str, image: np.ndarray) -> dict[str, Any]:
    """`check_edit`'s verdict as a record: `{correct, reasons, psnr_outside}` (capped PSNR)."""
    verdict = check_edit(source, instruction, image)
    return {"correct": verdict.correct, "reasons": list(verdict.reasons),
            "psnr_outside": _psnr(verdict.psnr_outside)}  # fmt: skip


def score_ground(
    pipeline: Any,
    images: Sequence[np.ndarray],
    expressions: Sequence[Sequence[str]],
    true_boxes: Sequence[Sequence[Sequence[int]]],
    *,
    multi: bool = True,
    batch_size: int = 16,
) -> list[list[dict[str, Any]]]:
    """Ground every expression and judge Acc@0.5 (`grounding_correct`).

    Args:
        multi: all of an image's expressions in one row (one call for a batch of images);
            False: one row per expression (the image repeated).

    Returns:
        Per image, one `{expression, box, correct}` per expression.
    """
    calls = _ground_calls(expressions, multi)
    found: list[list[dict[str, Any]]] = []
    for sl in _chunks(len(calls), batch_size):
        chunk = calls[sl]
        res = pipeline.ground([images[i] for i, _ in chunk],
                              [[expressions[i][k] for k in idx] for i, idx in chunk])  # fmt: skip
        for (_, idx), boxes in zip(chunk, res.boxes, strict=True):
            if len(boxes) != len(idx):
                raise RuntimeError(f"ground returned {len(boxes)} boxes for {len(idx)} expressions")
            found.append([{"box": None if b is None else [int(v) for v in b]} for b in boxes])
    return _judge_ground(expressions, true_boxes, calls, found)


def _ground_calls(expressions: Sequence[Sequence[str]], multi: bool) -> list[tuple[int, list[int]]]:
    """`(image, indices of the expressions it grounds)` per call: all of an image's
    expressions in one call (`multi`), or one call each."""
    calls: list[tuple[int, list[int]]] = []
    for i, exprs in enumerate(expressions):
        idx = list(range(len(exprs)))
        calls += [(i, idx)] if multi else [(i, [k]) for k in idx]
    return calls


def _judge_ground(
    expressions: Sequence[Sequence[str]],
    true_boxes: Sequence[Sequence[Sequence[int]]],
    calls: Sequence[tuple[int, list[int]]],
    found: Sequence[Sequence[dict[str, Any]]],
) -> list[list[dict[str, Any]]]:
    """Per image, `{expression, box, ..., correct}` per expression, from each call's
    records (`{box: [int x 4] or None, ...}`, one per expression of the call)."""
    out: list[list[dict[str, Any]]] = [[{} for _ in exprs] for exprs in expressions]
    for (i, idx), records in zip(calls, found, strict=True):
        for k, rec in zip(idx, records, strict=True):
            out[i][k] = {"expression": expressions[i][k], **rec,
                         "correct": grounding_correct(rec["box"], true_boxes[i][k])}  # fmt: skip
    return out


def score_vqa(
    pipeline: Any,
    images: Sequence[np.ndarray],
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Answer each question (`pipeline.understand`, batched); exact match via `answer_correct`."""
    out: list[dict[str, Any]] = []
    for sl in _chunks(len(questions), batch_size):
        res = pipeline.understand(list(images[sl]), list(questions[sl]))
        for q, a, pred in zip(questions[sl], answers[sl], res.texts, strict=True):
            out.append(
                {"question": q, "answer": a, "prediction": pred, "correct": answer_correct(pred, a)}
            )
    return out


def _parses(text: str) -> bool:
    """Whether a critique text is a well-formed verdict (with its reasons)."""
    try:
        parse_verdict(text)
    except ValueError:
        return False
    return True


def _norm_reasons(reasons: Sequence[str]) -> set[str]:
    try:
        return set(parse_verdict("no: " + "; ".join(reasons))[1]) if reasons else set()
    except GrammarError:
        return {r.strip().lower() for r in reasons}


def score_critique(
    pipeline: Any,
    images: Sequence[np.ndarray],
    prompts: Sequence[str],
    *,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """The model's verdict vs the detector's on each (image, prompt).

    Returns:
        One `{prompt, detector_ok, model_ok, agree, parsed, reasons_match, model_text}` each.
        `parsed`: the model's text was a well-formed verdict. `reasons_match`: both reject
        and the model names exactly the detector's reasons (None unless both reject).
    """
    out: list[dict[str, Any]] = []
    for sl in _chunks(len(prompts), batch_size):
        res = pipeline.critique(list(images[sl]), list(prompts[sl]))
        for p, image, ok, reasons, text in zip(
            prompts[sl], images[sl], res.ok, res.reasons, res.texts, strict=True
        ):
            out.append(_critique_record(p, image, bool(ok), reasons, text, parsed=_parses(text)))
    return out


def _critique_record(
    prompt: str, image: np.ndarray, ok: bool, reasons: Sequence[str], text: str, *, parsed: bool
) -> dict[str, Any]:
    """One verdict judged against the detector's (`score_critique`'s record)."""
    det = check_prompt(prompt, _canvas(image))
    both_reject = not ok and not det.correct
    match = (
        (_norm_reasons(reasons) == _norm_reasons(det.reasons))
        if both_reject and parsed
        else (False if both_reject else None)
    )
    return {
        "prompt": prompt,
        "detector_ok": det.correct,
        "model_ok": ok,
        "agree": ok == det.correct,
        "parsed": parsed,
        "reasons_match": match,
        "model_text": text,
    }


def score_critique_workflow(
    pipeline: Any,
    images: Sequence[np.ndarray],
    prompts: Sequence[str],
    *,
    backend: Any = None,
    batch_size: int = 16,
    critique_by: str = "scene",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Judge each (image, prompt) through the `critique` workflow (`Context.critique_by`).

    Returns:
        `score_critique`'s records plus `judged_by` (a workflow verdict always parses), and
        totals as `score_agent_t2i`.
    """
    from lavida_agent.graphs import critique
    from lavida_agent.graphs.state import CritiqueOutput

    def one(i: int, ctx: Any, store: Any) -> dict[str, Any]:
        raw = critique.graph.invoke({"image": store.put(images[i]), "prompt": prompts[i]}, context=ctx)
        out = CritiqueOutput.model_validate(raw)
        rec = _critique_record(prompts[i], images[i], out.verdict == "accept", out.reasons,
                               out.model_text, parsed=True)  # fmt: skip
        return {**rec, "judged_by": out.judged_by}

    return _through_workflow(pipeline, len(prompts), one, backend=backend,
                             batch_size=batch_size, critique_by=critique_by)  # fmt: skip


def _critique_summary(records: Sequence[dict]) -> dict[str, Any]:
    pos = [r for r in records if r["detector_ok"]]
    neg = [r for r in records if not r["detector_ok"]]
    tpr = _mean([r["model_ok"] for r in pos])
    tnr = _mean([not r["model_ok"] for r in neg])
    balanced = None if tpr is None or tnr is None else (tpr + tnr) / 2
    matches = [r["reasons_match"] for r in records if r["reasons_match"] is not None]
    return {
        "n": len(records),
        "agreement": _mean([r["agree"] for r in records]),
        "accept_rate_on_correct": tpr,
        "reject_rate_on_incorrect": tnr,
        "balanced_agreement": balanced,
        "detector_correct_rate": _mean([r["detector_ok"] for r in records]),
        "model_accept_rate": _mean([r["model_ok"] for r in records]),
        "parse_rate": _mean([r["parsed"] for r in records]),
        "reasons_exact_when_both_reject": _mean(matches),
        **({"judged_by_scene": _mean([r["judged_by"] == "scene" for r in records])}
           if records and "judged_by" in records[0] else {}),
    }


# =========================================================================== the agent loop


class _MinimalPipelineBackend:
    """A `BatchedBackend` over a pipeline, used until `graphs.pipeline_backend` exists (or for
    pipeline stand-ins that are not a `LavidaPipeline`).

    One pipeline call per batch, one seed per row. `feedback` is not a pipeline input (a new
    seed per round is what changes); `plan_edit` plans nothing (the edit graph then grounds
    no targets and relies on the model's verdict), so no judge knowledge enters the loop.
    """

    def __init__(self, pipeline: Any, num_steps: int | None = None) -> None:
        self.pipeline = pipeline
        self.num_steps = num_steps

    @staticmethod
    def _plan_in(plan: Any) -> list | None:
        if not plan:  # an empty plan carries no layout: generate without one
            return None
        return [(str(i["label"]), tuple(int(round(float(v))) for v in i["box"])) for i in plan]

    @staticmethod
    def _plan_out(plan: Any) -> list[dict[str, Any]]:
        return [{"label": str(label), "box": [float(v) for v in box]} for label, box in plan]

    def plan_layout(self, requests):
        res = self.pipeline.plan([r.prompt for r in requests], seed=[r.seed for r in requests],
                                 temperature=requests[0].temperature)
        return [self._plan_out(p) for p in res.plans]

    def generate(self, requests):
        res = self.pipeline.generate(
            [r.prompt for r in requests],
            plans=[self._plan_in(r.plan) for r in requests],
            seed=[r.seed for r in requests],
            num_steps=requests[0].num_steps,
        )
        return list(res.images)

    def regenerate_regions(self, requests):
        res = self.pipeline.regenerate_regions(
            [r.image for r in requests],
            [r.prompt for r in requests],
            [[tuple(int(round(float(v))) for v in b) for b in r.boxes] for r in requests],
            plans=[self._plan_in(r.plan) for r in requests],
            seed=[r.seed for r in requests],
            num_steps=requests[0].num_steps,
        )
        return list(res.images)

    def critique(self, requests):
        from lavida_agent.graphs.engine import CritiqueResult

        res = self.pipeline.critique([r.image for r in requests], [r.prompt for r in requests])
        return [
            CritiqueResult(ok=bool(ok), reasons=list(why), text=text)
            for ok, why, text in zip(res.ok, res.reasons, res.texts, strict=True)
        ]

    def plan_fit(self, requests):
        if not hasattr(self.pipeline, "region_fit"):  # a stand-in without it: no signal
            return [[0.0] * len(r.plan) for r in requests]
        plans = [self._plan_in(r.plan) for r in requests]
        return self.pipeline.region_fit([r.image for r in requests], [r.prompt for r in requests],
                                        [[b for _, b in p or []] for p in plans], plans=plans)  # fmt: skip

    def surprise(self, requests):
        from lavida_agent.graphs.engine import Surprise

        if not hasattr(self.pipeline, "surprise"):  # a stand-in without it: no signal
            return [Surprise(worst=0.0) for _ in requests]
        images, prompts = [r.image for r in requests], [r.prompt for r in requests]
        plans = [self._plan_in(r.plan) for r in requests]
        scores = self.pipeline.surprise(images, prompts, plans)
        marks = self.pipeline.stray_marks(images, prompts, plans, scores=scores)
        return [Surprise.read(row, found) for row, found in zip(scores, marks)]

    def noun_fit(self, requests):  # the benchmark's stand-ins read no labels: no signal
        return [[0.0] * len(r.items) for r in requests]

    def ground(self, requests):  # a stand-in reads its one box: `candidates` is not passed
        res = self.pipeline.ground(
            [r.image for r in requests], [list(r.expressions) for r in requests]
        )
        return [
            [[0.0, 0.0, 0.0, 0.0] if b is None else [float(v) for v in b] for b in boxes]
            for boxes in res.boxes
        ]

    def answer(self, requests):
        return list(
            self.pipeline.understand(
                [r.image for r in requests], [r.question for r in requests]
            ).texts
        )

    def plan_edit(self, requests):
        from lavida_agent.graphs.engine import EditPlanResult

        return [EditPlanResult() for _ in requests]

    def edit(self, requests):
        res = self.pipeline.edit(
            [r.image for r in requests],
            [r.instruction for r in requests],
            seed=[r.seed for r in requests],
            num_steps=requests[0].num_steps,
        )
        return list(res.images)


def make_backend(pipeline: Any) -> Any:
    """`graphs.pipeline_backend.PipelineBackend(pipeline, preview_every=0)` for a
    `LavidaPipeline` when that module exists; otherwise the benchmark's minimal adapter."""
    try:
        from lavida_agent.model.pipeline_lavida import LavidaPipeline

        if isinstance(pipeline, LavidaPipeline):
            from lavida_agent.graphs.pipeline_backend import PipelineBackend  # type: ignore[import-not-found]

            try:  # no step previews: the benchmark streams nothing, and a preview costs a decode
                return PipelineBackend(pipeline, preview_every=0)
            except TypeError:
                return PipelineBackend(pipeline)
    except ImportError:
        pass
    return _MinimalPipelineBackend(pipeline)


def _default_steps(pipeline: Any, num_steps: int | None) -> int:
    if num_steps is not None:
        return int(num_steps)
    return int(getattr(pipeline, "defaults", {}).get("num_steps", 16))


def _run_threads(fn: Callable[[int], Any], n: int, workers: int) -> list[Any]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers, n))) as pool:
        return list(pool.map(fn, range(n)))


def _through_workflow(
    pipeline: Any,
    n: int,
    run_one: Callable[[int, Any, Any], dict[str, Any]],
    *,
    backend: Any,
    batch_size: int,
    **context: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run `run_one(i, ctx, store)` for `i < n` on `batch_size` threads through one
    `BatchingEngine` (so the pipeline sees batches), with a `Context` of `context` fields
    and a temporary artifact store.

    Returns:
        The records, and totals `{forwards, forwards_per_request, seconds, backend_calls}`
        (forwards: the `pipeline.forward_count` delta over the whole run; a batched forward
        serves every row of its batch, so the per-request figure is amortised over the
        batching the engine achieved).
    """
    from lavida_agent.graphs.context import Context
    from lavida_agent.graphs.runtime import BatchingEngine
    from lavida_agent.tools.artifacts import ArtifactStore

    f0, t0 = getattr(pipeline, "forward_count", 0), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quality-agent-") as tmp:
        store = ArtifactStore(tmp)
        engine = BatchingEngine(backend or make_backend(pipeline), max_batch=batch_size,
                                max_wait_ms=20)  # fmt: skip
        try:
            ctx = Context(engine=engine, artifacts=store, **context)
            records = _run_threads(lambda i: run_one(i, ctx, store), n, batch_size)
        finally:
            engine.close()
        batches = engine.calls
    forwards = getattr(pipeline, "forward_count", 0) - f0
    return records, {
        "forwards": forwards,
        "forwards_per_request": forwards / max(1, n),
        "seconds": time.perf_counter() - t0,
        "backend_calls": batches,
    }


def score_agent_t2i(
    pipeline: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    max_rounds: int,
    backend: Any = None,
    batch_size: int = 16,
    num_steps: int | None = None,
    plan: bool = True,
    grounding_check: str = "rank",
    context: Mapping[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the `t2i` workflow (plan, generate, model critique, refine) on every prompt.

    Requests run concurrently (`batch_size` threads) through one `BatchingEngine`, so the
    pipeline sees batches. Base seed = `seeds[i]`; round r uses `seeds[i] + r`. With
    `plan=False` the workflow gets an empty layout: no planner, no grounding checks, the
    critique is the model's verdict alone (reflection without planning). `grounding_check`
    is the workflow's `Context.grounding_check` (rank / gate / off); `context` holds any other
    `Context` fields to set (`plan_retries`, `selection`, `rank_by`, ...).

    Returns:
        Per prompt `{prompt, seed, correct, reasons, rounds, accepted, attempts_correct,
        attempts_accepted, image}` (`attempts_correct`: each attempt judged, in order;
        `attempts_accepted`: the workflow's own verdict on each; the rest: the
        workflow's `best` attempt judged by `check_prompt`), and totals `{forwards,
        forwards_per_request, seconds, backend_calls}` (see `_through_workflow`).
    """
    from lavida_agent.graphs import t2i
    from lavida_agent.graphs.state import Plan, T2IOutput

    layout = {} if plan else {"plan": Plan(items=[], source="input")}

    def one(i: int, ctx: Any, store: Any) -> dict[str, Any]:
        raw = t2i.graph.invoke({"prompt": prompts[i], "seed": int(seeds[i]), **layout}, context=ctx)
        out = T2IOutput.model_validate(raw)
        assert out.best is not None
        # every attempt judged once; the kept one is among them
        verdicts = {a.image: check_prompt(prompts[i], store.open(a.image)) for a in out.attempts}
        image = store.open(out.best.image)
        verdict = verdicts.get(out.best.image) or check_prompt(prompts[i], image)
        return {
            "prompt": prompts[i],
            "seed": int(seeds[i]),
            "correct": verdict.correct,
            "reasons": list(verdict.reasons),
            "rounds": len(out.attempts),
            "accepted": bool(out.accepted),
            "attempts_correct": [verdicts[a.image].correct for a in out.attempts],
            "attempts_accepted": [c.accepted for c in out.critiques],
            "image": image,
        }

    return _through_workflow(pipeline, len(prompts), one, backend=backend, batch_size=batch_size,
                             num_steps=_default_steps(pipeline, num_steps), max_rounds=max_rounds,
                             grounding_check=grounding_check, **dict(context or {}))  # fmt: skip


def score_agent_edit(
    pipeline: Any,
    sources: Sequence[Scene],
    instructions: Sequence[str],
    seeds: Sequence[int],
    *,
    max_rounds: int,
    backend: Any = None,
    batch_size: int = 16,
    num_steps: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the `edit` workflow (plan, edit, model verify, re-edit) on every instruction.

    Returns:
        Per edit `{instruction, seed, correct, reasons, psnr_outside, rounds, accepted,
        attempts_correct, attempts_accepted, attempts_fit, attempts_score, attempts_keep_fit,
        image}` (the committed image judged by `check_edit`; `attempts_correct`: each attempt
        of the turn judged, in order; the workflow's own verdict, worst fit, grounding score
        and worst kept object's contrast of each beside it), and totals as `score_agent_t2i`.
    """
    from lavida_agent.graphs import edit
    from lavida_agent.graphs.state import EditOutput

    def one(i: int, ctx: Any, store: Any) -> dict[str, Any]:
        ref = store.put(render(sources[i]))
        raw = edit.graph.invoke(
            {"instruction": instructions[i], "image": ref, "seed": int(seeds[i])}, context=ctx
        )
        out = EditOutput.model_validate(raw)
        assert out.current is not None
        # every attempt judged once; the committed one is among them
        verdicts = {s.result: check_edit(sources[i], instructions[i], store.open(s.result)) for s in out.steps}
        image = store.open(out.current)
        verdict = verdicts.get(out.current) or check_edit(sources[i], instructions[i], image)
        return {
            "instruction": instructions[i],
            "seed": int(seeds[i]),
            "correct": verdict.correct,
            "reasons": list(verdict.reasons),
            "psnr_outside": _psnr(verdict.psnr_outside),
            "rounds": len(out.steps),
            "accepted": bool(out.accepted),
            "attempts_correct": [verdicts[s.result].correct for s in out.steps],
            "attempts_accepted": [bool(s.critique and s.critique.accepted) for s in out.steps],
            "attempts_fit": [s.critique.fit_score if s.critique else None for s in out.steps],
            "attempts_score": [s.critique.score if s.critique else None for s in out.steps],
            "attempts_keep_fit": [s.critique.keep_fit_score if s.critique else None for s in out.steps],
            "image": image,
        }

    return _through_workflow(pipeline, len(sources), one, backend=backend, batch_size=batch_size,
                             num_steps=_default_steps(pipeline, num_steps), max_rounds=max_rounds)  # fmt: skip


def kept_mask(item: Mapping[str, Any]) -> np.ndarray:
    """`(H, W)` bool: the pixels of a chain's first scene that no turn may change, the shapes
    of the objects every expected scene of the chain still holds exactly (same shape,
    colour, size and box). Background pixels are left out (a background edit repaints them)."""
    scene: Scene = item["scene"]
    kept = tuple(o for o in scene.objects if all(o in t.objects for t in item["targets"]))
    blank = render(Scene(background=scene.background))
    return (render(Scene(background=scene.background, objects=kept)) != blank).any(axis=-1)


def judge_chain(item: Mapping[str, Any], images: Sequence[np.ndarray]) -> dict[str, Any]:
    """Judge one chain of edits turn by turn.

    Each turn is judged by `check_edit` against the image it edited (the previous turn's
    result, whatever that was), so a turn whose instruction no longer applies (its object
    was lost earlier) is wrong. `chain[t]`: every turn up to `t` right. `kept_psnr`: PSNR
    of the last image against the first over `kept_mask` (the untouched objects' pixels;
    `PSNR_CAP` when identical, None when every object was touched): drift over the turns.
    """
    first = render(item["scene"])
    prev, turns = first, []
    for ins, image in zip(item["instructions"], images, strict=True):
        turns.append(_judge_edit(prev, ins, image))
        prev = _canvas(image)
    chain = np.logical_and.accumulate([t["correct"] for t in turns]).tolist()
    mask = kept_mask(item)
    kept = _psnr(psnr(first, prev, mask)) if mask.any() else None
    return {"turns": turns, "chain": chain, "kept_psnr": kept}


def score_session(
    pipeline: Any,
    items: Sequence[Mapping[str, Any]],
    *,
    with_plan: bool = False,
    batch_size: int = 16,
    num_steps: int | None = None,
) -> list[dict[str, Any]]:
    """Run every chain of `session_items` through the pipeline alone: turn `t` of every
    chain is one batched `edit` (single shot, or with the model's own edit plan as in
    `score_edit`) of that chain's turn `t - 1` result.

    Returns:
        Per chain, `judge_chain`'s record with `images` (one per turn).
    """
    current = [render(it["scene"]) for it in items]
    images: list[list[np.ndarray]] = [[] for _ in items]
    for t in range(len(items[0]["instructions"]) if items else 0):
        current, _ = _edit_images(pipeline, current, [it["instructions"][t] for it in items],
                                  [it["seeds"][t] for it in items], batch_size=batch_size,
                                  num_steps=num_steps, with_plan=with_plan)  # fmt: skip
        for row, image in zip(images, current, strict=True):
            row.append(image)
    return [dict(judge_chain(it, ims), images=ims) for it, ims in zip(items, images, strict=True)]


def score_agent_session(
    pipeline: Any,
    items: Sequence[Mapping[str, Any]],
    *,
    max_rounds: int | None = None,
    backend: Any = None,
    batch_size: int = 16,
    num_steps: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run every chain as one `EditSession` (the checkpointed `edit` workflow that
    `lavida-agent session edit` runs): the first turn gives the rendered scene, every later
    turn edits the session's current image. Chains run concurrently (`batch_size` threads)
    through one `BatchingEngine`.

    Returns:
        Per chain, `judge_chain`'s record with `images`, `rounds`, `accepted` and
        `attempts_correct` (per turn: each attempt judged on the image the turn edited), and
        totals as `score_agent_t2i`.
    """
    from lavida_agent.graphs.persistence import checkpointer_from_path
    from lavida_agent.graphs.session import EditSession

    saver = checkpointer_from_path(None)

    def one(i: int, ctx: Any, store: Any) -> dict[str, Any]:
        it = items[i]
        session = EditSession(f"chain-{i}", checkpointer=saver, context=ctx)
        prev = render(it["scene"])
        images: list[np.ndarray] = []
        rounds: list[int] = []
        accepted: list[bool] = []
        attempts: list[list[bool]] = []
        for t, (ins, s) in enumerate(zip(it["instructions"], it["seeds"], strict=True)):
            out = session.edit(ins, image=store.put(prev) if t == 0 else None, seed=int(s))
            assert out.current is not None
            number = out.steps[out.heads[-1]].turn  # the lineage holds every turn's attempts
            turn = [step for step in out.steps if step.turn == number]
            attempts.append([check_edit(prev, ins, store.open(step.result)).correct for step in turn])
            rounds.append(len(turn))
            accepted.append(bool(out.accepted))
            prev = store.open(out.current)
            images.append(prev)
        return dict(judge_chain(it, images), images=images, rounds=rounds, accepted=accepted,
                    attempts_correct=attempts)  # fmt: skip

    context = {} if max_rounds is None else {"max_rounds": int(max_rounds)}
    return _through_workflow(pipeline, len(items), one, backend=backend, batch_size=batch_size,
                             num_steps=_default_steps(pipeline, num_steps), **context)  # fmt: skip


def score_agent_ask(
    pipeline: Any,
    images: Sequence[np.ndarray],
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    backend: Any = None,
    batch_size: int = 16,
    answer_by: str = "scene",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Ask each question through the `understand` workflow (`Context.answer_by`).

    Returns:
        Per question `{question, answer, prediction, correct, answered_by, caption}`, and
        totals as `score_agent_t2i`.
    """
    from lavida_agent.graphs import understand
    from lavida_agent.graphs.state import UnderstandOutput

    def one(i: int, ctx: Any, store: Any) -> dict[str, Any]:
        raw = understand.graph.invoke(
            {"image": store.put(images[i]), "question": questions[i]}, context=ctx
        )
        out = UnderstandOutput.model_validate(raw)
        pred = out.answer or ""
        return {
            "question": questions[i],
            "answer": answers[i],
            "prediction": pred,
            "correct": answer_correct(pred, answers[i]),
            "answered_by": out.answered_by,
            "caption": out.perception.caption if out.perception else None,
        }

    return _through_workflow(pipeline, len(questions), one, backend=backend,
                             batch_size=batch_size, answer_by=answer_by)  # fmt: skip


def score_agent_ground(
    pipeline: Any,
    images: Sequence[np.ndarray],
    expressions: Sequence[Sequence[str]],
    true_boxes: Sequence[Sequence[Sequence[int]]],
    *,
    multi: bool = True,
    backend: Any = None,
    batch_size: int = 16,
    ground_by: str = "scene",
) -> tuple[list[list[dict[str, Any]]], dict[str, Any]]:
    """Ground every expression through the `ground` workflow (`Context.ground_by`) and
    judge Acc@0.5, as `score_ground` does.

    Args:
        multi: one run per image with all its expressions; False: one run per expression.

    Returns:
        Per image, one `{expression, box, correct, found_by, present}` per expression, and
        totals as `score_agent_t2i`.
    """
    calls = _ground_calls(expressions, multi)
    found, totals = _ground_workflow(pipeline, images, expressions, calls, backend=backend,
                                     batch_size=batch_size, ground_by=ground_by)  # fmt: skip
    return _judge_ground(expressions, true_boxes, calls, found), totals


def _ground_workflow(
    pipeline: Any, images: Sequence[np.ndarray], expressions: Sequence[Sequence[str]],
    calls: Sequence[tuple[int, list[int]]], *, backend: Any, batch_size: int, ground_by: str,
) -> tuple[list[list[dict[str, Any]]], dict[str, Any]]:  # fmt: skip
    """Run the `ground` workflow once per call; per call, one `{box, found_by, present}` per
    expression (`box`: whole pixels, None when not found)."""
    from lavida_agent.graphs import ground
    from lavida_agent.graphs.state import GroundOutput

    def one(c: int, ctx: Any, store: Any) -> list[dict[str, Any]]:
        i, idx = calls[c]
        exprs = [expressions[i][k] for k in idx]
        raw = ground.graph.invoke({"image": store.put(images[i]), "expressions": exprs}, context=ctx)
        out = GroundOutput.model_validate(raw)
        present = out.present or [None] * len(exprs)
        return [{"box": None if b.box.area <= 0 else [int(round(v)) for v in b.box.as_list()],
                 "found_by": by, "present": here}
                for b, by, here in zip(out.boxes, out.found_by, present, strict=True)]  # fmt: skip

    return _through_workflow(pipeline, len(calls), one, backend=backend, batch_size=batch_size,
                             ground_by=ground_by)  # fmt: skip


# =========================================================================== suites


def _suite_vq(pipeline: Any, n: int, seed: int, batch_size: int, **_: Any) -> dict[str, Any]:
    from lavida_agent.model.training_vq import edit_locality, evaluate_vq

    vq_seed = suite_seed(seed, "vq")
    vq, size = _OnVQDevice(pipeline.vq), max(1, batch_size)
    res = evaluate_vq(vq, n_scenes=VQ_PER_N * n, seed=vq_seed, batch_size=size)
    res.update(edit_locality(vq, n_edits=VQ_PER_N * n, seed=vq_seed, batch_size=size))
    return {"seed": vq_seed, **res}


class _OnVQDevice:
    """`evaluate_vq` builds its pixel batches on the CPU; move them to the tokenizer's device
    (a no-op on CPU) so the suite also runs with a pipeline on a GPU."""

    def __init__(self, vq: Any) -> None:
        self.vq = vq

    def eval(self) -> _OnVQDevice:
        self.vq.eval()
        return self

    def _device(self) -> Any:
        params = getattr(self.vq, "parameters", None)
        try:
            return next(params()).device if params is not None else None
        except StopIteration:
            return None

    def encode(self, pixels: Any) -> Any:
        device = self._device()
        return self.vq.encode(pixels.to(device) if device is not None else pixels)

    def decode(self, codes: Any, *args: Any, **kwargs: Any) -> Any:
        return self.vq.decode(codes, *args, **kwargs)


def _suite_t2i(
    pipeline: Any, n: int, seed: int, batch_size: int, num_steps: int | None, state: dict, **_: Any
) -> dict[str, Any]:
    items = t2i_items(n, seed)
    prompts, seeds = [it["prompt"] for it in items], [it["seed"] for it in items]
    single = score_t2i(pipeline, prompts, seeds, batch_size=batch_size, num_steps=num_steps)
    planned = score_plans(pipeline, prompts, seeds, batch_size=batch_size)
    # An empty plan carries no layout: that row is generated without one (as the agent's
    # backend does), so `with_plan` differs from single shot only where a plan exists.
    with_plan = score_t2i(
        pipeline,
        prompts,
        seeds,
        [p["plan"] or None for p in planned],
        batch_size=batch_size,
        num_steps=num_steps,
    )
    true_plan = score_t2i(
        pipeline, prompts, seeds, [it["true_plan"] for it in items], batch_size=batch_size, num_steps=num_steps
    )
    for it, a, b, p, c in zip(items, single, with_plan, planned, true_plan, strict=True):
        a["category"] = b["category"] = p["category"] = c["category"] = it["category"]
    state["t2i"] = {"items": items, "single": single, "with_plan": with_plan}
    acc_single = _acc_by(single, "category", PROMPT_CATEGORIES)
    acc_plan = _acc_by(with_plan, "category", PROMPT_CATEGORIES)
    return {
        "n_per_category": n,
        "single_shot": acc_single,
        "with_plan": acc_plan,
        "plan_lift": {k: acc_plan[k] - acc_single[k] for k in acc_single},
        "plan_correct": _acc_by(planned, "category", PROMPT_CATEGORIES, "plan_correct"),
        "with_true_plan": _acc_by(true_plan, "category", PROMPT_CATEGORIES),
        "items": [
            {
                "category": it["category"],
                "prompt": it["prompt"],
                "seed": it["seed"],
                "single_correct": a["correct"],
                "single_reasons": a["reasons"],
                "plan": [[lab, list(box)] for lab, box in p["plan"]],
                "plan_correct": p["plan_correct"],
                "with_plan_correct": b["correct"],
                "with_plan_reasons": b["reasons"],
                "with_true_plan_correct": c["correct"],
            }
            for it, a, b, p, c in zip(items, single, with_plan, planned, true_plan, strict=True)
        ],
    }


def _suite_edit(
    pipeline: Any, n: int, seed: int, batch_size: int, num_steps: int | None, state: dict, **_: Any
) -> dict[str, Any]:
    items = edit_items(n, seed)
    args = ([it["scene"] for it in items], [it["instruction"] for it in items], [it["seed"] for it in items])
    recs = score_edit(pipeline, *args, batch_size=batch_size, num_steps=num_steps)
    planned = (score_edit(pipeline, *args, batch_size=batch_size, num_steps=num_steps, with_plan=True)
               if hasattr(pipeline, "plan_edit") else None)  # fmt: skip
    from lavida_agent.model.training import touched_plan

    true_plans = [touched_plan(it["scene"], it["target"]) for it in items]
    true = score_edit(pipeline, *args, batch_size=batch_size, num_steps=num_steps, true_plans=true_plans)
    for it, t in zip(items, true, strict=True):
        t["category"] = it["category"]
    for it, r, q in zip(items, recs, planned or recs, strict=True):
        r["category"] = q["category"] = it["category"]
    state["edit"] = {"items": items, "single": recs, "with_plan": planned}
    out = {
        "n_per_category": n,
        "accuracy": _acc_by(recs, "category", EDIT_CATEGORIES),
        "psnr_outside_db": _acc_by(recs, "category", EDIT_CATEGORIES, "psnr_outside"),
    }
    if planned is not None:
        out["with_plan"] = _acc_by(planned, "category", EDIT_CATEGORIES)
        out["psnr_outside_db_with_plan"] = _acc_by(planned, "category", EDIT_CATEGORIES, "psnr_outside")
        for it, q in zip(items, planned, strict=True):
            q["plan_correct"] = edit_plan_correct(it["scene"], it["instruction"], q["plan"])
        out["plan_correct"] = _acc_by(planned, "category", EDIT_CATEGORIES, "plan_correct")
    out["with_true_plan"] = _acc_by(true, "category", EDIT_CATEGORIES)
    out["items"] = [
        {
            "category": it["category"],
            "instruction": it["instruction"],
            "seed": it["seed"],
            "source": it["scene"].to_dict(),
            "correct": r["correct"],
            "reasons": r["reasons"],
            "psnr_outside": r["psnr_outside"],
            **({"plan": q["plan"], "plan_correct": q["plan_correct"], "with_plan_correct": q["correct"],
                "with_plan_reasons": q["reasons"]} if planned is not None else {}),
            "with_true_plan_correct": t["correct"],
        }
        for it, r, q, t in zip(items, recs, planned or recs, true, strict=True)
    ]
    return out


def _with_forms(scored: Sequence[Sequence[dict]], items: Sequence[dict]) -> list[dict[str, Any]]:
    """Every expression's record, flat, with its form (for `_acc_by`)."""
    return [dict(r, form=f) for rows, it in zip(scored, items, strict=True)
            for r, f in zip(rows, it["forms"], strict=True)]  # fmt: skip


def _suite_ground(
    pipeline: Any, n: int, seed: int, batch_size: int, state: dict, **_: Any
) -> dict[str, Any]:
    items = ground_items(len(REF_FORMS) * n, seed)
    images = [render(it["scene"]) for it in items]
    exprs = [it["expressions"] for it in items]
    boxes = [it["boxes"] for it in items]
    result: dict[str, Any] = {"n_images": len(items), "n_expressions": sum(len(e) for e in exprs)}
    per_item: dict[str, list] = {}
    for mode, multi in (("single", False), ("multi", True)):
        scored = score_ground(pipeline, images, exprs, boxes, multi=multi, batch_size=batch_size)
        flat = _with_forms(scored, items)
        result[f"acc@0.5_{mode}"] = _acc_by(flat, "form", REF_FORMS)
        per_item[mode] = scored
    state["ground"] = {k: result[k] for k in ("acc@0.5_single", "acc@0.5_multi")}
    result["items"] = [
        {
            "scene": it["scene"].to_dict(),
            "expressions": it["expressions"],
            "forms": it["forms"],
            "true_boxes": [list(b) for b in it["boxes"]],
            "single": [r["box"] for r in s],
            "multi": [r["box"] for r in m],
        }
        for it, s, m in zip(items, per_item["single"], per_item["multi"], strict=True)
    ]
    return result


def _suite_vqa(
    pipeline: Any, n: int, seed: int, batch_size: int, state: dict, **_: Any
) -> dict[str, Any]:
    items = vqa_items(n, seed)
    recs = score_vqa(
        pipeline,
        [render(it["scene"]) for it in items],
        [it["question"] for it in items],
        [it["answer"] for it in items],
        batch_size=batch_size,
    )
    for it, r in zip(items, recs, strict=True):
        r["kind"] = it["kind"]
    state["vqa"] = {"accuracy": _acc_by(recs, "kind", QUESTION_KINDS)}
    return {
        "n_per_kind": n,
        "accuracy": state["vqa"]["accuracy"],
        "items": [
            {
                "kind": r["kind"],
                "question": r["question"],
                "answer": r["answer"],
                "prediction": r["prediction"],
                "correct": r["correct"],
            }
            for r in recs
        ],
    }


def _suite_critique(
    pipeline: Any, n: int, seed: int, batch_size: int, state: dict, **_: Any
) -> dict[str, Any]:
    items = critique_items(len(PROMPT_CATEGORIES) * n, seed)
    images = [render(it["scene"]) for it in items]
    recs = score_critique(pipeline, images, [it["prompt"] for it in items], batch_size=batch_size)
    labels_agree = _mean(
        [r["detector_ok"] == (it["label"] == "yes") for r, it in zip(recs, items, strict=True)]
    )
    result: dict[str, Any] = {
        "n": len(items),
        "rendered": _critique_summary(recs),
        "detector_vs_sample_label": labels_agree,
        "items": [
            {
                "prompt": r["prompt"],
                "label": it["label"],
                "detector_ok": r["detector_ok"],
                "model_ok": r["model_ok"],
                "model_text": r["model_text"],
            }
            for r, it in zip(recs, items, strict=True)
        ],
    }
    # The `critique` workflow (the prompt checked against the perceived scene) on the same.
    flow, totals = score_critique_workflow(pipeline, images, [it["prompt"] for it in items],
                                           batch_size=batch_size)  # fmt: skip
    result["workflow_rendered"] = _critique_summary(flow)
    result["workflow_totals"] = totals
    for r, rec in zip(result["items"], flow, strict=True):
        r.update(workflow_ok=rec["model_ok"], judged_by=rec["judged_by"])
    t2i = state.get("t2i")
    if t2i:  # the model's own single-shot generations, already judged by the detector
        own = ([r["image"] for r in t2i["single"]], [r["prompt"] for r in t2i["single"]])
        result["own_generations"] = _critique_summary(score_critique(pipeline, *own, batch_size=batch_size))
        flow, _ = score_critique_workflow(pipeline, *own, batch_size=batch_size)
        result["workflow_own_generations"] = _critique_summary(flow)
    return result


def _suite_agent(
    pipeline: Any,
    n: int,
    seed: int,
    batch_size: int,
    num_steps: int | None,
    state: dict,
    agent_rounds: Sequence[int],
    backend: Any = None,
    agent_plan: Sequence[bool] = (True, False),
    grounding_check: str = "rank",
    agent_context: Mapping[str, Any] | None = None,
    agent_tasks: Sequence[str] = AGENT_TASKS,
    **_: Any,
) -> dict[str, Any]:
    # The same prompts, sampler seeds and edits as the t2i / edit suites (their single-shot
    # results are reused when those suites ran; otherwise measured here).
    out: dict[str, Any] = {
        "n_per_category": n,
        "backend": type(backend or make_backend(pipeline)).__name__,
    }
    t2i = state.get("t2i") or {}
    items = t2i.get("items") or t2i_items(n, seed)
    prompts, seeds = [it["prompt"] for it in items], [it["seed"] for it in items]
    with_plan = t2i.get("with_plan")
    if "t2i" in agent_tasks:
        single = t2i.get("single") or score_t2i(
            pipeline, prompts, seeds, batch_size=batch_size, num_steps=num_steps
        )
        base = _acc_by(
            [dict(r, category=it["category"]) for r, it in zip(single, items, strict=True)],
            "category",
            PROMPT_CATEGORIES,
        )
        out["t2i"] = {"single_shot": base}
    ed = state.get("edit") or {}
    eitems = ed.get("items") or edit_items(n, seed)
    if "edit" in agent_tasks:
        esingle = ed.get("single") or score_edit(
            pipeline,
            [it["scene"] for it in eitems],
            [it["instruction"] for it in eitems],
            [it["seed"] for it in eitems],
            batch_size=batch_size,
            num_steps=num_steps,
        )
        ebase = _acc_by(
            [dict(r, category=it["category"]) for r, it in zip(esingle, eitems, strict=True)],
            "category",
            EDIT_CATEGORIES,
        )
        out["edit"] = {"single_shot": ebase}
    if with_plan is not None and "t2i" in agent_tasks:
        out["t2i"]["with_plan"] = _acc_by(
            [dict(r, category=it["category"]) for r, it in zip(with_plan, items, strict=True)],
            "category",
            PROMPT_CATEGORIES,
        )
    def t2i_run(max_rounds: int, planned: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        recs, totals = score_agent_t2i(
            pipeline,
            prompts,
            seeds,
            max_rounds=max_rounds,
            backend=backend,
            batch_size=batch_size,
            num_steps=num_steps,
            plan=planned,
            grounding_check=grounding_check,
            context=agent_context,
        )
        for rec, it in zip(recs, items, strict=True):
            rec["category"] = it["category"]
        acc = _acc_by(recs, "category", PROMPT_CATEGORIES)
        return recs, {
            "accuracy": acc,
            "lift_over_single_shot": {k: acc[k] - base[k] for k in acc},
            "mean_rounds": _mean([x["rounds"] for x in recs]),
            "accepted_rate": _mean([x["accepted"] for x in recs]),
            **_attempt_rates(recs),
            **totals,
            "items": [
                {
                    "category": x["category"],
                    "prompt": x["prompt"],
                    "seed": x["seed"],
                    "correct": x["correct"],
                    "rounds": x["rounds"],
                    "accepted": x["accepted"],
                    "attempts_correct": x["attempts_correct"],
                    "attempts_accepted": x["attempts_accepted"],
                }
                for x in recs
            ],
        }

    def edit_run(max_rounds: int) -> list[dict[str, Any]]:
        erecs, etotals = score_agent_edit(
            pipeline,
            [it["scene"] for it in eitems],
            [it["instruction"] for it in eitems],
            [it["seed"] for it in eitems],
            max_rounds=max_rounds,
            backend=backend,
            batch_size=batch_size,
            num_steps=num_steps,
        )
        for rec, it in zip(erecs, eitems, strict=True):
            rec["category"] = it["category"]
        eacc = _acc_by(erecs, "category", EDIT_CATEGORIES)
        out["edit"][f"max_rounds={max_rounds}"] = {
            "accuracy": eacc,
            "lift_over_single_shot": {k: eacc[k] - ebase[k] for k in eacc},
            "psnr_outside_db": _mean([x["psnr_outside"] for x in erecs]),
            "mean_rounds": _mean([x["rounds"] for x in erecs]),
            "accepted_rate": _mean([x["accepted"] for x in erecs]),
            **_attempt_rates(erecs),
            **etotals,
            "items": [
                {
                    "category": x["category"],
                    "instruction": x["instruction"],
                    "seed": x["seed"],
                    "correct": x["correct"],
                    "rounds": x["rounds"],
                    "accepted": x["accepted"],
                    **{k: x[k] for k in ("attempts_correct", "attempts_accepted", "attempts_fit",
                                         "attempts_score", "attempts_keep_fit")},
                    "reasons": x["reasons"],
                }
                for x in erecs
            ],
        }
        return erecs

    samples: dict[str, Any] = {}
    for r in agent_rounds:
        recs: list[dict[str, Any]] = []
        erecs: list[dict[str, Any]] = []
        if "t2i" in agent_tasks:
            # With the model's plan (planning + reflection) and without (reflection alone).
            runs = {planned: t2i_run(int(r), planned) for planned in agent_plan}
            for planned, (_, block) in runs.items():
                out["t2i"][f"max_rounds={r}" + ("" if planned else ", no plan")] = block
            recs = runs[True][0] if True in runs else runs[False][0]  # the grid prefers planned
        if "edit" in agent_tasks:
            erecs = edit_run(int(r))
        samples = {"t2i": recs, "edit": erecs, "max_rounds": int(r)}
    state["agent"] = samples
    return out


def _agent_tasks(value: Sequence[str] | str) -> tuple[str, ...]:
    """`agent_tasks` as a tuple (a comma string is split); ValueError names a bad one."""
    tasks = [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else list(value)
    tasks = list(dict.fromkeys(tasks))
    if not tasks or not set(tasks) <= set(AGENT_TASKS):
        raise ValueError(f"agent tasks must be one or more of {', '.join(AGENT_TASKS)}; got {tasks}")
    return tuple(tasks)


def _attempt_rates(recs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """How often the workflow's first attempt was right, and any of its attempts: what the
    kept one scores against is between the two (1 round: all three are equal)."""
    return {
        "first_attempt_rate": _mean([x["attempts_correct"][0] for x in recs]),
        "any_attempt_rate": _mean([any(x["attempts_correct"]) for x in recs]),
    }


def _suite_ask(
    pipeline: Any, n: int, seed: int, batch_size: int, state: dict, backend: Any = None, **_: Any
) -> dict[str, Any]:
    items = vqa_items(n, seed)
    recs, totals = score_agent_ask(
        pipeline,
        [render(it["scene"]) for it in items],
        [it["question"] for it in items],
        [it["answer"] for it in items],
        backend=backend,
        batch_size=batch_size,
    )
    for it, r in zip(items, recs, strict=True):
        r["kind"] = it["kind"]
        r["scene"] = r["answered_by"] == "scene"
    out: dict[str, Any] = {
        "n_per_kind": n,
        "accuracy": _acc_by(recs, "kind", QUESTION_KINDS),
        "answered_from_scene": _acc_by(recs, "kind", QUESTION_KINDS, field="scene"),
        **totals,
        "items": [
            {k: r[k] for k in ("kind", "question", "answer", "prediction", "correct",
                               "answered_by", "caption")}  # fmt: skip
            for r in recs
        ],
    }
    if "vqa" in state:  # the model asked directly, same questions
        out["direct_accuracy"] = state["vqa"]["accuracy"]
    return out


def _suite_agent_ground(
    pipeline: Any, n: int, seed: int, batch_size: int, state: dict, backend: Any = None, **_: Any
) -> dict[str, Any]:
    items = ground_items(len(REF_FORMS) * n, seed)  # the ground suite's items
    images = [render(it["scene"]) for it in items]
    exprs = [it["expressions"] for it in items]
    result: dict[str, Any] = {"n_images": len(items), "n_expressions": sum(len(e) for e in exprs)}
    per_item: dict[str, list] = {}
    for mode, multi in (("single", False), ("multi", True)):
        scored, totals = score_agent_ground(pipeline, images, exprs, [it["boxes"] for it in items],
                                            multi=multi, backend=backend, batch_size=batch_size)  # fmt: skip
        flat = [dict(r, perceived=r["found_by"] != "direct", said_present=r["present"] is True)
                for r in _with_forms(scored, items)]  # fmt: skip
        result[f"acc@0.5_{mode}"] = _acc_by(flat, "form", REF_FORMS)
        result[f"not_direct_{mode}"] = _acc_by(flat, "form", REF_FORMS, field="perceived")
        result[f"present_{mode}"] = _acc_by(flat, "form", REF_FORMS, field="said_present")
        result[f"totals_{mode}"] = totals
        per_item[mode] = scored
    # Expressions naming nothing in the image, all of an image's in one run: said absent?
    absent = [absent_expressions(it["scene"], item_rng(seed, "agent_ground", it["index"])) for it in items]
    texts = [[text for _, text in pairs] for pairs in absent]
    found, result["totals_absent"] = _ground_workflow(
        pipeline, images, texts, _ground_calls(texts, True), backend=backend,
        batch_size=batch_size, ground_by="scene")  # fmt: skip
    flat = [{"form": form, "said_absent": rec["present"] is False}
            for pairs, recs in zip(absent, found, strict=True)
            for (form, _), rec in zip(pairs, recs, strict=True)]  # fmt: skip
    result["absent"] = _acc_by(flat, "form", ABSENT_FORMS, field="said_absent")
    if "ground" in state:  # the model's own boxes, same expressions
        g = state["ground"]
        result["direct"] = {"single": g["acc@0.5_single"], "multi": g["acc@0.5_multi"]}
    result["items"] = [
        {"expressions": it["expressions"], "forms": it["forms"],
         "true_boxes": [list(b) for b in it["boxes"]],
         **{m: [{k: r[k] for k in ("box", "found_by", "present")} for r in per_item[m][j]] for m in per_item},
         "absent": [{"expression": text, **rec} for text, rec in zip(texts[j], found[j], strict=True)]}
        for j, it in enumerate(items)
    ]  # fmt: skip
    return result


def _session_summary(recs: Sequence[dict[str, Any]], items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per turn: accuracy, accuracy of the chains right so far, and chains right through it;
    per category over every turn; PSNR outside the touched boxes of the turns whose source
    was right; drift (`kept_*`, over the `kept_chains` chains with an untouched object;
    identical pixels count as `PSNR_CAP` dB)."""
    n_turns = len(items[0]["instructions"]) if items else 0
    flat = [dict(turn, category=cat) for r, it in zip(recs, items, strict=True)
            for turn, cat in zip(r["turns"], it["categories"], strict=True)]  # fmt: skip
    after_right = [_mean([r["turns"][t]["correct"] for r in recs if t == 0 or r["chain"][t - 1]])
                   for t in range(n_turns)]  # fmt: skip
    kept = [r["kept_psnr"] for r in recs if r["kept_psnr"] is not None]
    # PSNR outside a turn's boxes only where its source was right: a wrecked image kept
    # as it is would otherwise score the cap
    on_right = [turn["psnr_outside"] for r in recs
                for t, turn in enumerate(r["turns"]) if t == 0 or r["chain"][t - 1]]  # fmt: skip
    return {
        "turn_accuracy": [_mean([r["turns"][t]["correct"] for r in recs]) for t in range(n_turns)],
        "turn_accuracy_after_right": after_right,
        "chain_success": [_mean([r["chain"][t] for r in recs]) for t in range(n_turns)],
        "accuracy": _acc_by(flat, "category", EDIT_CATEGORIES),
        "psnr_outside_db": _mean(on_right),
        "kept_chains": len(kept),
        "kept_psnr_db": _mean(kept),
        "kept_exact": _mean([k == PSNR_CAP for k in kept]),
    }


def _suite_session(
    pipeline: Any,
    n: int,
    seed: int,
    batch_size: int,
    num_steps: int | None,
    state: dict,
    backend: Any = None,
    session_turns: int = SESSION_TURNS,
    session_rounds: int | None = None,
    **_: Any,
) -> dict[str, Any]:
    from lavida_agent.graphs.context import Context

    items = session_items(n, seed, session_turns)
    systems = {"single": score_session(pipeline, items, batch_size=batch_size, num_steps=num_steps)}
    if hasattr(pipeline, "plan_edit"):
        systems["planned"] = score_session(pipeline, items, with_plan=True, batch_size=batch_size,
                                             num_steps=num_steps)  # fmt: skip
    rounds = session_rounds or Context().max_rounds
    systems["agent"], totals = score_agent_session(pipeline, items, max_rounds=rounds, backend=backend,
                                                   batch_size=batch_size, num_steps=num_steps)  # fmt: skip
    state["session"] = {"items": items, **systems}
    agent = systems["agent"]
    return {
        "n_chains": n,
        "turns": session_turns,
        "agent_max_rounds": rounds,
        **{name: _session_summary(recs, items) for name, recs in systems.items()},
        "agent_mean_rounds": _mean([x for r in agent for x in r["rounds"]]),
        "agent_accepted_rate": _mean([x for r in agent for x in r["accepted"]]),
        "agent_any_attempt_rate": _mean([any(x) for r in agent for x in r["attempts_correct"]]),
        "agent_totals": totals,
        "items": [
            {
                "index": it["index"],
                "source": it["scene"].to_dict(),
                "instructions": it["instructions"],
                "categories": it["categories"],
                "seeds": it["seeds"],
                **{name: {"correct": [t["correct"] for t in recs[k]["turns"]],
                          "reasons": [t["reasons"] for t in recs[k]["turns"]],
                          "kept_psnr": recs[k]["kept_psnr"]}
                   for name, recs in systems.items()},
                "agent_rounds": agent[k]["rounds"],
                "agent_attempts_correct": agent[k]["attempts_correct"],
            }
            for k, it in enumerate(items)
        ],  # fmt: skip
    }


_SUITE_FNS: dict[str, Callable[..., dict[str, Any]]] = {
    "vq": _suite_vq,
    "t2i": _suite_t2i,
    "edit": _suite_edit,
    "ground": _suite_ground,
    "vqa": _suite_vqa,
    "critique": _suite_critique,
    "agent": _suite_agent,
    "ask": _suite_ask,
    "agent_ground": _suite_agent_ground,
    "session": _suite_session,
}


# =========================================================================== reports


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cat_rows(keys: Sequence[str], columns: Sequence[dict]) -> list[list[Any]]:
    return [[k, *(c.get(k) for c in columns)] for k in [*keys, "overall"]]


def render_markdown(result: dict[str, Any]) -> str:
    """`quality.md`: one table per suite that ran."""
    s, suites = result["settings"], result["suites"]
    out = [
        "# ShapesWorld quality benchmark",
        "",
        f"Model: `{s['model']}`; n = {s['n']} per category/kind; seed {s['seed']} (held-out "
        f"base {HELDOUT_BASE}); sampler steps {s['num_steps'] or 'pipeline default'}; "
        f"quick = {s['quick']}. Scored by the classical detector only. Command: "
        f"`{result['command']}`.",
    ]
    if "vq" in suites:
        v = suites["vq"]
        out += [
            "",
            "## vq: reconstruction",
            "",
            _table(["metric", "value"], [[k, v[k]] for k in v if k != "seed"]),
        ]
    if "t2i" in suites:
        t = suites["t2i"]
        out += [
            "",
            "## t2i: accuracy per category",
            "",
            _table(
                ["category", "single shot", "with plan", "plan lift", "plan correct", "with true layout"],
                _cat_rows(
                    PROMPT_CATEGORIES,
                    [t["single_shot"], t["with_plan"], t["plan_lift"], t["plan_correct"],
                     t.get("with_true_plan", {})],
                ),
            ),
        ]
    if "edit" in suites:
        e = suites["edit"]
        out += [
            "",
            "## edit: accuracy per category",
            "",
            _table(
                ["category", "single shot", "PSNR outside (dB)", "with the model's plan", "PSNR outside (dB)",
                 "with the true plan", "edit plan correct"],
                _cat_rows(EDIT_CATEGORIES, [e["accuracy"], e["psnr_outside_db"], e.get("with_plan", {}),
                                            e.get("psnr_outside_db_with_plan", {}), e.get("with_true_plan", {}),
                                            e.get("plan_correct", {})]),  # fmt: skip
            ),
        ]
    if "ground" in suites:
        g = suites["ground"]
        out += [
            "",
            f"## ground: Acc@0.5 ({g['n_expressions']} expressions on {g['n_images']} images)",
            "",
            _table(
                ["form", "single-expression", "multi-expression"],
                _cat_rows(REF_FORMS, [g["acc@0.5_single"], g["acc@0.5_multi"]]),
            ),
        ]
    if "vqa" in suites:
        q = suites["vqa"]
        out += [
            "",
            "## vqa: accuracy per question kind",
            "",
            _table(["kind", "accuracy"], _cat_rows(QUESTION_KINDS, [q["accuracy"]])),
        ]
    if "ask" in suites:
        a = suites["ask"]
        cols = [a["accuracy"], a["answered_from_scene"]] + (
            [a["direct_accuracy"]] if "direct_accuracy" in a else []
        )
        out += [
            "",
            "## ask: the `understand` workflow (perceive, then answer) per question kind",
            "",
            _table(
                ["kind", "accuracy", "answered from the scene"]
                + (["model asked directly (vqa)"] if "direct_accuracy" in a else []),
                _cat_rows(QUESTION_KINDS, cols),
            ),
        ]
    if "agent_ground" in suites:
        a = suites["agent_ground"]
        cols = [a["acc@0.5_single"], a["acc@0.5_multi"], a["not_direct_single"], a["not_direct_multi"]]
        head = ["form", "single-expression", "multi-expression", "not the model's own box (single)",
                "(multi)"]  # fmt: skip
        if "direct" in a:
            cols += [a["direct"]["single"], a["direct"]["multi"]]
            head += ["model's own boxes (ground), single", "multi"]
        out += [
            "",
            "## agent_ground: the `ground` workflow (perceive, then check each box), Acc@0.5",
            "",
            _table(head, _cat_rows(REF_FORMS, cols)),
        ]
        if "absent" in a:
            out += [
                "",
                "Is the referent in the image (`present`)? Said present for the expressions above "
                "(all present), and said absent for expressions naming nothing in the image "
                "(`absent_expressions`, one run per image):",
                "",
                _table(["form", "present: said present (single)", "(multi)"],
                       _cat_rows(REF_FORMS, [a["present_single"], a["present_multi"]])),
                "",
                _table(["form", "absent: said absent"], _cat_rows(ABSENT_FORMS, [a["absent"]])),
            ]
    if "critique" in suites:
        c = suites["critique"]
        cols = [k for k in ("rendered", "own_generations", "workflow_rendered", "workflow_own_generations")
                if k in c]  # fmt: skip
        metrics = list(dict.fromkeys(m for k in cols for m in c[k]))
        names = {"workflow_rendered": "rendered, workflow", "workflow_own_generations": "own_generations, workflow"}
        out += [
            "",
            "## critique: model verdict vs detector verdict",
            "",
            "Asked directly (`pipeline.critique`), and through the `critique` workflow (the prompt "
            "checked against the scene the model perceives; the model's critique when its caption "
            "does not parse whole).",
            "",
            _table(["metric", *(names.get(k, k) for k in cols)],
                   [[m, *(c[k].get(m, "-") for k in cols)] for m in metrics]),  # fmt: skip
            "",
            f"Detector vs sample_critique label: {_fmt(c['detector_vs_sample_label'])}.",
        ]
    if "agent" in suites:
        a = suites["agent"]
        for task, keys in (("t2i", PROMPT_CATEGORIES), ("edit", EDIT_CATEGORIES)):
            if task not in a:
                continue  # not in `agent_tasks`
            block = a[task]
            runs = [k for k in block if k.startswith("max_rounds=")]
            base_cols = [k for k in ("single_shot", "with_plan") if k in block]
            header = ["category", *base_cols, *(f"agent {k} (lift)" for k in runs)]
            rows = []
            for k in [*keys, "overall"]:
                row = [k, *(block[b].get(k) for b in base_cols)]
                for rk in runs:
                    acc, lift = (
                        block[rk]["accuracy"].get(k),
                        block[rk]["lift_over_single_shot"].get(k),
                    )
                    row.append("-" if acc is None else f"{acc:.3f} ({lift:+.3f})")
                rows.append(row)
            cost = [
                [
                    rk,
                    block[rk]["mean_rounds"],
                    block[rk]["accepted_rate"],
                    block[rk].get("first_attempt_rate", "-"),  # absent in older result files
                    block[rk].get("any_attempt_rate", "-"),
                    block[rk]["forwards_per_request"],
                    block[rk]["seconds"],
                ]
                for rk in runs
            ]
            out += [
                "",
                f"## agent: {task} workflow vs single shot (backend {a['backend']}"
                + (f", grounding check {s.get('grounding_check', 'gate')}{_knobs_text(s)})" if task == "t2i" else ")"),
                "",
                _table(header, rows),
                "",
                _table(
                    [
                        "setting",
                        "mean rounds",
                        "accepted by model",
                        "first attempt right",
                        "any attempt right",
                        "forwards / request",
                        "seconds",
                    ],
                    cost,
                ),
            ]
    if "session" in suites:
        out += _session_markdown(suites["session"])
    out += [
        "",
        "## timings (s)",
        "",
        _table(["suite", "seconds"], list(result["timings"].items())),
        "",
    ]
    return "\n".join(out)


_SESSION_SYSTEMS = {"single": "single shot", "planned": "with the model's plan", "agent": "agent"}


def _session_markdown(se: Mapping[str, Any]) -> list[str]:
    """The session suite's tables: chains right per turn, turn accuracy, categories, drift."""
    names = [k for k in _SESSION_SYSTEMS if k in se]
    labels = [_SESSION_SYSTEMS[k] for k in names]
    turns = range(se["turns"])
    per_turn = [[t + 1, *(f"{_fmt(se[k]['turn_accuracy'][t])} ({_fmt(se[k]['turn_accuracy_after_right'][t])})"
                          for k in names)] for t in turns]  # fmt: skip
    return [
        "",
        f"## session: multi-turn editing ({se['n_chains']} chains of {se['turns']} edits; the agent "
        f"at most {se['agent_max_rounds']} attempts a turn, {_fmt(se['agent_mean_rounds'])} on average, "
        f"some attempt right in {_fmt(se['agent_any_attempt_rate'])} of its turns)",
        "",
        "Chains right through each turn:",
        "",
        _table(["turn", *labels], [[t + 1, *(se[k]["chain_success"][t] for k in names)] for t in turns]),
        "",
        "Each turn judged on the image it edited (in brackets: on the chains right so far):",
        "",
        _table(["turn", *labels], per_turn),
        "",
        _table(["category (every turn)", *labels], _cat_rows(EDIT_CATEGORIES, [se[k]["accuracy"] for k in names])),
        "",
        _table(["", *labels], [
            ["PSNR outside the touched boxes, turns on chains right so far (dB)",
             *(se[k]["psnr_outside_db"] for k in names)],
            [f"untouched objects after the last turn, PSNR (dB; {se['agent']['kept_chains']} chains have one, "
             f"identical = {PSNR_CAP:.0f})", *(se[k]["kept_psnr_db"] for k in names)],
            ["untouched objects exactly kept", *(se[k]["kept_exact"] for k in names)],
        ]),  # fmt: skip
    ]


def _tile(image: np.ndarray, width: int = 136) -> np.ndarray:
    """The 64 px image centred on a wider white strip, so the caption under it fits."""
    image = _canvas(image)
    h, w = image.shape[:2]
    out = np.full((h, max(width, w), 3), 255, np.uint8)
    x = (out.shape[1] - w) // 2
    out[:, x : x + w] = image
    return out


def _mark(ok: bool) -> str:
    return "OK" if ok else "FAIL"


def _save_samples(out_dir: Path, state: dict, per_category: int = 2) -> list[str]:
    """`samples_t2i.png` / `samples_edit.png`: a few items per category, each with its verdict;
    `samples_session.png`: the agent's first chains of edits, turn by turn."""
    written = []
    agent = state.get("agent") or {}
    t2i = state.get("t2i")
    if t2i:
        by_prompt = {(r["prompt"], r["seed"]): r for r in agent.get("t2i", [])}
        images, labels, ncols = [], [], 0
        for cat in PROMPT_CATEGORIES:
            for it, a, b in zip(t2i["items"], t2i["single"], t2i["with_plan"], strict=True):
                if it["category"] != cat or it["index"] >= per_category:
                    continue
                row = [
                    (a["image"], f"{_mark(a['correct'])} single: {it['prompt']}"),
                    (b["image"], f"{_mark(b['correct'])} plan: {it['prompt']}"),
                ]
                ag = by_prompt.get((it["prompt"], it["seed"]))
                if ag is not None:
                    row.append(
                        (
                            ag["image"],
                            f"{_mark(ag['correct'])} agent r<={agent['max_rounds']} "
                            f"({ag['rounds']} rounds)",
                        )
                    )
                ncols = max(ncols, len(row))
                images += [_tile(im) for im, _ in row]
                labels += [lab for _, lab in row]
        if images:
            grid = make_grid(images, ncols=ncols, pad=6, labels=labels, scale=4, font_scale=0.42)
            save_image(grid, out_dir / "samples_t2i.png")
            written.append("samples_t2i.png")
    ed = state.get("edit")
    if ed:
        by_ins = {(r["instruction"], r["seed"]): r for r in agent.get("edit", [])}
        images, labels, ncols = [], [], 0
        planned = ed.get("with_plan") or [None] * len(ed["items"])
        for cat in EDIT_CATEGORIES:
            for it, r, q in zip(ed["items"], ed["single"], planned, strict=True):
                if it["category"] != cat or it["index"] >= per_category:
                    continue
                row = [
                    (render(it["scene"]), f"source: {it['instruction']}"),
                    (render(it["target"]), "an expected result"),
                    (r["image"], f"{_mark(r['correct'])} edit, PSNR out {r['psnr_outside']:.1f}"),
                ]
                if q is not None:
                    row.append((q["image"], f"{_mark(q['correct'])} with its plan"))
                ag = by_ins.get((it["instruction"], it["seed"]))
                if ag is not None:
                    row.append(
                        (
                            ag["image"],
                            f"{_mark(ag['correct'])} agent r<={agent['max_rounds']} "
                            f"({ag['rounds']} rounds)",
                        )
                    )
                ncols = max(ncols, len(row))
                images += [_tile(im) for im, _ in row]
                labels += [lab for _, lab in row]
        if images:
            grid = make_grid(images, ncols=ncols, pad=6, labels=labels, scale=4, font_scale=0.42)
            save_image(grid, out_dir / "samples_edit.png")
            written.append("samples_edit.png")
    se = state.get("session")
    if se:
        images, labels = [], []
        for it, rec in list(zip(se["items"], se["agent"], strict=True))[:per_category * 2]:
            images.append(_tile(render(it["scene"])))
            labels.append(f"chain {it['index']}: source")
            for t, (ins, image) in enumerate(zip(it["instructions"], rec["images"], strict=True)):
                images.append(_tile(image))
                labels.append(f"{_mark(rec['turns'][t]['correct'])} {t + 1}. {ins}")
        grid = make_grid(images, ncols=1 + len(se["items"][0]["instructions"]), pad=6, labels=labels,
                         scale=4, font_scale=0.42)  # fmt: skip
        save_image(grid, out_dir / "samples_session.png")
        written.append("samples_session.png")
    return written


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        f = float(x)
        return None if math.isnan(f) else (PSNR_CAP if math.isinf(f) else f)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# =========================================================================== entry points


def run(
    *,
    model_path: str | Path | None = None,
    out_dir: str | Path = "bench_out/quality",
    n: int | None = None,
    seed: int = 0,
    quick: bool = False,
    suites: Sequence[str] | str | None = None,
    agent_rounds: Sequence[int] = (1, 2, 4),
    agent_plan: Sequence[bool] = (True, False),
    grounding_check: str = "rank",
    agent_context: Mapping[str, Any] | None = None,
    agent_tasks: Sequence[str] | str = AGENT_TASKS,
    session_turns: int | None = None,
    session_rounds: int | None = None,
    batch_size: int = 16,
    num_steps: int | None = None,
    pipeline: Any = None,
    backend: Any = None,
    device: str | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the held-out quality suites and write `quality.json`, `quality.md` and sample grids.

    Args:
        model_path: pipeline folder; None: the embedded weights (ignored when `pipeline` given).
        out_dir: output folder (created).
        n: items per category (t2i, edit, agent) or question kind (vqa); the vq suite
            round-trips `VQ_PER_N * n` scenes, ground uses `5 * n` scenes (one per
            expression form), critique `7 * n` pairs (one per prompt category). Default
            `DEFAULT_N`, or `QUICK_N` with `quick`.
        seed: run seed; held-out streams are `10**9 + 1000 * seed + suite index`.
        quick: tiny n and `QUICK_STEPS` sampler steps unless given (a smoke run: its
            fractions of a handful of items mean little).
        suites: names from `SUITES` (list or comma string); None: all.
        agent_rounds: `max_rounds` values of the agent suite.
        agent_plan: the agent's t2i runs with the model's plan (True) and/or without a plan
            (False: reflection alone, no grounding checks), to separate the two lifts.
        grounding_check: the agent's t2i `Context.grounding_check`: `rank` (the default:
            the model's verdict decides), `gate` (a failed check also rejects) or `off`.
        agent_context: other fields of the agent's t2i `Context` (`plan_retries`,
            `plan_temperature`, `selection`, `rank_by`); unset ones keep their defaults.
        agent_tasks: the agent suite's workflows, from `AGENT_TASKS` (list or comma
            string); default both.
        session_turns: edits per chain of the session suite (default `SESSION_TURNS`, or
            `QUICK_TURNS` with `quick`).
        session_rounds: the session suite's agent `max_rounds` (default: `Context`'s, what
            `lavida-agent session edit` runs).
        batch_size: rows per pipeline call (and concurrent workflow runs in the agent suite).
        num_steps: sampler steps for generate/edit (None: the pipeline's default).
        pipeline: a ready pipeline (tests pass a tiny random one, or a stand-in with the same
            methods); else loaded with `LavidaPipeline.from_pretrained(model_path)`.
        backend: the agent suite's `BatchedBackend` (default: `make_backend(pipeline)`).
        device: where to load the model (default cuda when available, else cpu).
        command: recorded as the command line (default: this process's argv).

    Returns:
        The dict written to `quality.json`.
    """
    t_start = time.perf_counter()
    if isinstance(suites, str):
        suites = [s.strip() for s in suites.split(",") if s.strip()]
    chosen = list(SUITES) if not suites else list(suites)
    unknown = [s for s in chosen if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suites {unknown}; expected some of {SUITES}")
    chosen = [s for s in SUITES if s in chosen]  # fixed order: t2i/edit before critique/agent
    n = int(n) if n is not None else (QUICK_N if quick else DEFAULT_N)
    if quick and num_steps is None:
        num_steps = QUICK_STEPS
    if session_turns is None:
        session_turns = QUICK_TURNS if quick else SESSION_TURNS
    bad_rounds = session_rounds is not None and not 1 <= int(session_rounds) < SEED_STRIDE
    if "session" in chosen and (not 1 <= int(session_turns) < SEED_STRIDE or bad_rounds):
        raise ValueError(f"session turns and rounds must be in 1..{SEED_STRIDE - 1}")
    if n < 1 or batch_size < 1 or not agent_rounds or min(agent_rounds) < 1:
        raise ValueError("n, batch_size and every agent round must be >= 1")
    agent_plan = tuple(dict.fromkeys(bool(p) for p in agent_plan))
    if not agent_plan:
        raise ValueError("agent_plan needs True (with the plan), False (without) or both")
    if grounding_check not in ("rank", "gate", "off"):
        raise ValueError(f"grounding_check must be rank|gate|off, got {grounding_check!r}")
    agent_context = dict(agent_context or {})
    _check_agent_context(agent_context)
    agent_tasks = _agent_tasks(agent_tasks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    timings: dict[str, float] = {}
    model_name = "pipeline argument"
    if pipeline is None:
        import torch
        from lavida_agent.model.pipeline_lavida import LavidaPipeline, default_weights_path

        t0 = time.perf_counter()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipeline = LavidaPipeline.from_pretrained(model_path, device=device)
        timings["load"] = time.perf_counter() - t0
        model_name = str(model_path or default_weights_path())
    elif model_path is not None:
        model_name = str(model_path)

    state: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for name in chosen:
        t0 = time.perf_counter()
        logger.info("quality suite %s (n=%d)", name, n)
        results[name] = _SUITE_FNS[name](
            pipeline,
            n=n,
            seed=seed,
            batch_size=batch_size,
            num_steps=num_steps,
            state=state,
            agent_rounds=tuple(int(r) for r in agent_rounds),
            agent_plan=agent_plan,
            grounding_check=grounding_check,
            agent_context=agent_context,
            agent_tasks=agent_tasks,
            session_turns=int(session_turns),
            session_rounds=None if session_rounds is None else int(session_rounds),
            backend=backend,
        )
        timings[name] = time.perf_counter() - t0

    written = _save_samples(out, state)
    timings["total"] = time.perf_counter() - t_start
    result = {
        "benchmark": "quality",
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "settings": {
            "model": model_name,
            "pipeline": type(pipeline).__name__,
            "pipeline_defaults": dict(getattr(pipeline, "defaults", {}) or {}),
            "n": n,
            "seed": seed,
            "quick": quick,
            "suites": chosen,
            "agent_rounds": [int(r) for r in agent_rounds],
            "agent_plan": list(agent_plan),
            "grounding_check": grounding_check,
            "agent_context": _agent_context_record(agent_context),
            "agent_tasks": list(agent_tasks),
            "session_turns": int(session_turns),
            "session_rounds": session_rounds,
            "batch_size": batch_size,
            "num_steps": num_steps,
            "device": str(getattr(pipeline, "device", device)),
            "python": platform.python_version(),
            "git_commit": _git_commit(),
        },
        "seeds": {
            "heldout_base": HELDOUT_BASE,
            "scheme": "item rng = numpy default_rng([10**9 + 1000*seed + suite_index, *key]); "
            "key = (category_index, i) for t2i/edit/vqa, (i,) for ground/critique/session; "
            "sampler base seed = 10**6*seed + 100*(category_index*10000 + i + 1), "
            "for session turn t of chain i 10**6*seed + 100*(100*i + t + 1); "
            "agent round r uses base + r",
            "suite_seeds": {s: suite_seed(seed, s) for s in chosen},
        },
        "suites": results,
        "timings": timings,
        "files": ["quality.json", "quality.md", *written],
    }
    result = _jsonable(result)
    (out / "quality.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    (out / "quality.md").write_text(render_markdown(result))
    return result


_AGENT_KNOBS = ("plan_retries", "plan_temperature", "selection", "rank_by", "stray_check")


def _check_agent_context(fields: Mapping[str, Any]) -> None:
    """Refuse unknown or invalid agent `Context` fields before any model work."""
    from lavida_agent.graphs.context import Context

    unknown = sorted(set(fields) - set(_AGENT_KNOBS))
    if unknown:
        raise ValueError(f"unknown agent context fields {unknown}; expected some of {_AGENT_KNOBS}")
    Context(**fields)  # its own checks: a bad value is a ValueError naming the field


def _agent_context_record(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Every agent knob as the run used it (the given value, else `Context`'s default)."""
    from lavida_agent.graphs.context import Context

    ctx = Context(**fields)
    return {k: getattr(ctx, k) for k in _AGENT_KNOBS}


def _knobs_text(settings: Mapping[str, Any]) -> str:
    knobs = settings.get("agent_context") or {}
    return "".join(f", {k.replace('_', ' ')} {v}" for k, v in knobs.items())


def _summary_lines(result: dict[str, Any]) -> list[str]:
    s = result["suites"]
    lines = []
    if "vq" in s:
        lines.append(f"vq detector_exact {_fmt(s['vq']['detector_exact'])}")
    if "t2i" in s:
        lines.append(
            f"t2i single {_fmt(s['t2i']['single_shot']['overall'])} "
            f"with plan {_fmt(s['t2i']['with_plan']['overall'])} "
            f"(plan correct {_fmt(s['t2i']['plan_correct']['overall'])}; "
            f"with the true layout {_fmt(s['t2i']['with_true_plan']['overall'])})"
        )
    if "edit" in s:
        e = s["edit"]
        line = f"edit {_fmt(e['accuracy']['overall'])} psnr {_fmt(e['psnr_outside_db']['overall'])} dB"
        if "plan_correct" in e:
            line += f" (edit plan correct {_fmt(e['plan_correct']['overall'])})"
        lines.append(line)
    if "ground" in s:
        lines.append(
            f"ground acc@0.5 single {_fmt(s['ground']['acc@0.5_single']['overall'])} "
            f"multi {_fmt(s['ground']['acc@0.5_multi']['overall'])}"
        )
    if "agent_ground" in s:
        lines.append(
            f"agent_ground (ground workflow) acc@0.5 single "
            f"{_fmt(s['agent_ground']['acc@0.5_single']['overall'])} "
            f"multi {_fmt(s['agent_ground']['acc@0.5_multi']['overall'])}"
        )
    if "vqa" in s:
        lines.append(f"vqa {_fmt(s['vqa']['accuracy']['overall'])}")
    if "ask" in s:
        lines.append(f"ask (understand workflow) {_fmt(s['ask']['accuracy']['overall'])}")
    if "critique" in s:
        c = s["critique"]
        flow = c.get("workflow_rendered")  # absent in older result files
        lines.append(f"critique agreement {_fmt(c['rendered']['agreement'])}"
                     + (f" (critique workflow {_fmt(flow['agreement'])})" if flow else ""))  # fmt: skip
    if "session" in s:
        se = s["session"]
        lines.append(
            f"session ({se['n_chains']} chains of {se['turns']} edits) right through the last turn: "
            + ", ".join(f"{label} {_fmt(se[k]['chain_success'][-1])}"
                        for k, label in _SESSION_SYSTEMS.items() if k in se)  # fmt: skip
        )
    if "agent" in s:
        for task in ("t2i", "edit"):
            for k, v in s["agent"].get(task, {}).items():  # absent: not in `agent_tasks`
                if k.startswith("max_rounds="):
                    lines.append(
                        f"agent {task} {k} {_fmt(v['accuracy']['overall'])} "
                        f"(lift {_fmt(v['lift_over_single_shot']['overall'])})"
                    )
    return lines


def _on_off(text: str, parser: argparse.ArgumentParser) -> tuple[bool, ...]:
    """`"on,off"` -> `(True, False)`; anything else is a usage error."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words or any(w not in ("on", "off") for w in words):
        parser.error(f"--agent-plan: expected on, off or on,off; got {text!r}")
    return tuple(w == "on" for w in words)


def main(argv: Sequence[str] | None = None, prog: str | None = None,
         default_out: str = "bench_out/quality") -> int:  # fmt: skip
    """Command line: `python -m lavida_agent.benchmarks.quality --out DIR [...]` (also
    `lavida-agent bench quality`, which passes its `prog` and `default_out`). Prints one
    summary line per suite, or with `--json` the whole report."""
    prog = prog or "python -m lavida_agent.benchmarks.quality"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--out", "-o", default=default_out, help=f"output folder (default {default_out})")
    p.add_argument("--model-path", default=None, help="pipeline folder (default: embedded weights)")
    p.add_argument(
        "--n",
        type=int,
        default=None,
        help=f"items per category (default {DEFAULT_N}, quick {QUICK_N})",
    )
    p.add_argument("--seed", type=int, default=0, help="run seed (held-out streams derive from it)")
    p.add_argument("--quick", action="store_true", help="tiny n: a smoke run")
    p.add_argument("--suites", default=None, help=f"comma list of {','.join(SUITES)} (default all)")
    p.add_argument("--agent-rounds", default="1,2,4", help="max_rounds values for the agent suite (default 1,2,4)")
    p.add_argument("--agent-tasks", default=",".join(AGENT_TASKS),
                   help="the agent suite's workflows: t2i, edit or both")  # fmt: skip
    p.add_argument("--agent-plan", default="on,off",
                   help="agent t2i with the model's plan (on), without (off: reflection alone), or both")  # fmt: skip
    p.add_argument("--grounding-check", choices=("rank", "gate", "off"), default="rank",
                   help="agent t2i: grounding ranks attempts (rank), also rejects (gate), or is skipped")  # fmt: skip
    p.add_argument("--plan-retries", type=int, default=None,
                   help="agent t2i: re-plans after a plan fails its check (default: Context's)")  # fmt: skip
    p.add_argument("--selection", choices=("accept", "best"), default=None,
                   help="agent t2i: stop at the first accepted image, or draw every round and keep the best")  # fmt: skip
    p.add_argument("--rank-by", choices=("fit", "surprise", "score"), default=None,
                   help="agent t2i: rank attempts by plan fit, the worst image token, or the "
                        "critique score alone")  # fmt: skip
    p.add_argument("--stray-check", choices=("gate", "off"), default=None,
                   help="agent t2i: reject an attempt with a mark off the plan (gate; the next round "
                        "draws afresh), or skip the check (default: the settings')")  # fmt: skip
    p.add_argument("--session-turns", type=int, default=None,
                   help=f"session suite: edits per chain (default {SESSION_TURNS}, quick {QUICK_TURNS})")  # fmt: skip
    p.add_argument("--session-rounds", type=int, default=None,
                   help="session suite: the agent's attempts per turn (default: the agent's, 3)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16, help="rows per pipeline call")
    p.add_argument(
        "--num-steps", type=int, default=None, help="sampler steps (default: pipeline's)"
    )
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the whole report (quality.json) instead of a summary")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress log")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")  # fmt: skip
    cmd = f"{prog} " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    knobs = {"plan_retries": args.plan_retries, "selection": args.selection, "rank_by": args.rank_by,
             "stray_check": args.stray_check}
    try:
        _check_agent_context({k: v for k, v in knobs.items() if v is not None})
        _agent_tasks(args.agent_tasks)
    except ValueError as e:
        p.error(str(e))
    result = run(
        model_path=args.model_path,
        out_dir=args.out,
        n=args.n,
        seed=args.seed,
        quick=args.quick,
        suites=args.suites,
        agent_rounds=tuple(int(r) for r in args.agent_rounds.split(",") if r.strip()),
        agent_plan=_on_off(args.agent_plan, p),
        grounding_check=args.grounding_check,
        agent_context={k: v for k, v in knobs.items() if v is not None},
        agent_tasks=args.agent_tasks,
        session_turns=args.session_turns,
        session_rounds=args.session_rounds,
        batch_size=args.batch_size,
        num_steps=args.num_steps,
        device=args.device,
        command=cmd,
    )
    if args.json:
        print(json.dumps(result, allow_nan=False))
        return 0
    for line in _summary_lines(result):
        print(line)
    print(f"wrote {', '.join(result['files'])} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
