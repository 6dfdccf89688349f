"""Verification, shared by the t2i and edit workflows.

- By grounding: the model grounds each expected object in the image (one `Engine.ground`
  call for all of them); an object passes when the box found overlaps the expected box with
  IoU >= threshold.
- Of a text-to-image prompt, by the model (`judge`): the prompt checked against the scene
  the model perceives, else the model's own critique answer.
- Of plans, before anything is drawn: `plan_problems` reads a layout against the prompt's
  ShapesWorld grammar (the objects, counts and relations it names), with no model and no
  image; a prompt outside the grammar is not checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from lavida_agent import prompts
from lavida_agent.graphs.engine import BoxList, Engine
from lavida_agent.graphs.perceive import scene_problems
from lavida_agent.graphs.state import Box, Critique, GroundingCheck, LayoutItem, Perception, Plan, Stray, box_iou
from lavida_agent.tools.artifacts import ImageRef
from lavida_agent.tools.shapes_world import language as lang

Role = Literal["planned", "target", "keep"]


def grounding_checks(
    expected: Sequence[LayoutItem], found: Sequence[BoxList], *, threshold: float, role: Role
) -> list[GroundingCheck]:
    """Compare expected objects with the boxes grounding found for them (same order)."""
    if len(found) != len(expected):
        raise ValueError(f"grounding returned {len(found)} boxes for {len(expected)} expressions")
    checks = []
    for item, raw in zip(expected, found, strict=True):
        box = Box.model_validate([float(v) for v in raw])
        iou = box_iou(item.box, box)
        checks.append(GroundingCheck(label=item.label, expected=item.box, found=box,
                                     iou=round(iou, 4), ok=iou >= threshold, role=role))  # fmt: skip
    return checks


@dataclass(frozen=True)
class Verdict:
    """The model's verdict on an image for a prompt, and how it was reached."""

    ok: bool
    reasons: list[str]
    text: str  # the caption read (judged by 'scene') or the critique answer ('model')
    judged_by: Literal["scene", "model"]
    dropped_reasons: list[str] = field(default_factory=list)


def judge(engine: Engine, image: np.ndarray, prompt: str, perception: Perception | None) -> Verdict:
    """Judge `image` against a text-to-image `prompt`.

    With a complete `perception` of the image and a prompt in the ShapesWorld grammar, the
    verdict is the world's prompt rules applied to the perceived scene (`scene_problems`),
    whose reasons are exact (`missing blue square`). Otherwise the model's critique answers;
    its reasons the prompt rules out are set apart (`split_reasons`).
    """
    if perception is not None and (problems := scene_problems(prompt, perception)) is not None:
        return Verdict(not problems, problems, perception.caption, "scene")
    answer = engine.critique(image, prompt)
    kept, dropped = split_reasons(prompt, answer.reasons)
    return Verdict(answer.ok, kept, answer.text, "model", dropped)


def fmt_box(box: Box) -> str:
    """`[x0, y0, x1, y1]` as the critique templates write boxes."""
    return "[" + ", ".join(f"{v:g}" for v in box.as_list()) + "]"


def reason_for(check: GroundingCheck) -> str:
    """A user-readable reason for a failed check (templates `critique_grounding_<role>`)."""
    return prompts.render(f"critique_grounding_{check.role}", label=check.label,
                          expected=fmt_box(check.expected), found=fmt_box(check.found),
                          iou=f"{check.iou:.2f}")  # fmt: skip


def reason_for_stray(stray: Stray) -> str:
    """A user-readable reason for a stray mark (template `critique_stray`)."""
    return prompts.render("critique_stray", box=fmt_box(stray.box), score=f"{stray.score:.1f}")


def make_critique(
    *, round: int, image: ImageRef, model_ok: bool, model_reasons: Sequence[str],
    model_text: str, checks: Sequence[GroundingCheck], gate: bool = True,
    dropped_reasons: Sequence[str] = (), fit: Sequence[float] = (), keep_fit: Sequence[float] = (),
    judged_by: Literal["scene", "model"] = "model", perception: Perception | None = None,
    strays: Sequence[Stray] = (), worst_token: float | None = None,
) -> Critique:  # fmt: skip
    """Combine the model's verdict with the grounding checks into one `Critique`.

    With `gate`, accept only when the model accepts and every check passes; without it the
    model's verdict decides and the checks only score the attempt. A rejection blames each
    failed object either way. Each of `strays` (marks off the plan) rejects the image,
    whatever `gate` says, with a reason of its own.

    `dropped_reasons` are reasons of the model's that cannot be about the prompt (see
    `split_reasons`); they are recorded, not reported. A rejection left with no reason at
    all misread the prompt: its verdict then counts for nothing and the grounding checks
    decide alone (accept when there is at least one and all pass).
    """
    failed = [c for c in checks if not c.ok]
    misread = not model_ok and not model_reasons and bool(dropped_reasons)
    if misread:
        accept = bool(checks) and not failed
    else:
        accept = model_ok and (not failed or not gate)
    accept = accept and not strays
    reasons = [str(r) for r in model_reasons] + [reason_for(c) for c in failed] + [reason_for_stray(m) for m in strays]
    if not accept and not reasons:
        reasons = [model_text or "the model rejected the image"]
    score = (int(model_ok) + sum(c.ok for c in checks)) / (1 + len(checks))
    return Critique(
        round=round,
        image=image,
        verdict="accept" if accept else "reject",
        reasons=[] if accept else reasons,
        blamed=[] if accept else [LayoutItem(label=c.label, box=c.expected) for c in failed],
        model_ok=model_ok,
        model_text=model_text,
        judged_by=judged_by,
        perception=perception,
        dropped_reasons=list(dropped_reasons),
        grounding=list(checks),
        strays=list(strays),
        worst_token=None if worst_token is None else round_score(worst_token),
        fit=[round_score(f) for f in fit],
        keep_fit=[round_score(f) for f in keep_fit],
        score=round_score(score),
    )


def plan_problems(prompt: str, plan: Plan) -> list[str] | None:
    """What is wrong with `plan` for `prompt` (`language.plan_reasons`); empty when it is
    right, None when the prompt is outside the ShapesWorld grammar (nothing to check)."""
    try:
        return lang.plan_reasons(prompt, [(i.label, i.box.as_list()) for i in plan.items])
    except lang.GrammarError:
        return None


def split_reasons(prompt: str, reasons: Sequence[str]) -> tuple[list[str], list[str]]:
    """`(kept, dropped)`: the critique's reasons that can, and cannot, be about `prompt`.

    A reason cannot be about the prompt when the checkers could never give it for that
    prompt, whatever the image (`language.reason_fits_prompt`: `missing blue circle` for a
    prompt with no blue circle). A prompt outside the ShapesWorld grammar keeps every reason.
    """
    try:
        spec = lang.parse_prompt(prompt)
    except lang.GrammarError:
        return [str(r) for r in reasons], []
    kept: list[str] = []
    dropped: list[str] = []
    for r in reasons:
        (kept if lang.reason_fits_prompt(spec, r) else dropped).append(str(r))
    return kept, dropped


def round_score(x: float) -> float:
    """Scores are rounded so they compare equal after a JSON round trip."""
    return round(float(x), 6)
