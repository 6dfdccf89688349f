"""`Context`: the per-run, immutable knobs of every workflow (LangGraph runtime context).

Run data lives in state; knobs live here. Nothing here reads environment variables: the
public surface (`lavida_agent/settings.py`) builds a `Context` and passes it as
`graph.invoke(input, context=Context(...))`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lavida_agent.graphs.engine import Engine, load_engine
from lavida_agent.tools.artifacts import ArtifactStore

__all__ = ("Context", "DEFAULT_ARTIFACTS_ROOT")

DEFAULT_ARTIFACTS_ROOT = Path("runs") / "artifacts"
"""Where images go when the context names no store (relative to the working directory)."""

_STORES: dict[str, ArtifactStore] = {}


@dataclass(frozen=True, kw_only=True)
class Context:
    """Knobs for one workflow run. Every field has a default, so `Context()` is valid."""

    engine: Any = field(
        default=None,
        metadata={
            "description": "The `Engine` to call (e.g. a `BatchingEngine`). None: load the "
            "real model lazily with `load_engine(model_path)` on first use."
        },
    )
    model_path: str | None = field(
        default=None,
        metadata={"description": "Pipeline folder for `load_engine`; None: embedded weights."},
    )
    artifacts: Any = field(
        default=None,
        metadata={
            "description": "An `ArtifactStore`, or the root folder of one. None: "
            "`runs/artifacts` under the working directory."
        },
    )
    num_steps: int = field(
        default=16, metadata={"description": "Denoising steps per image (generate/edit)."}
    )
    max_rounds: int = field(
        default=3,
        metadata={"description": "Most images per t2i run / attempts per edit turn (>= 1)."},
    )
    seed: int = field(
        default=0,
        metadata={"description": "Base seed when the input gives none; round r uses seed + r."},
    )
    refine: Literal["auto", "regenerate", "regions"] = field(
        default="auto",
        metadata={
            "description": "How t2i refines a rejected image: 'regenerate' redraws all of it "
            "with the critique as feedback and a new seed; 'regions' re-masks and redraws only "
            "the blamed boxes; 'auto' uses regions when the critique blamed boxes, else "
            "regenerate."
        },
    )
    review_plan: bool = field(
        default=False,
        metadata={"description": "Pause with `interrupt()` after planning for a human review."},
    )
    preview_every: int = field(
        default=0,
        metadata={
            "description": "Stream a partial preview (as an ImageRef) every k sampler steps; "
            "0: no previews."
        },
    )
    iou_threshold: float = field(
        default=0.5,
        metadata={"description": "Grounding check: found box vs expected box IoU to pass."},
    )
    plan_retries: int = field(
        default=2,
        metadata={
            "description": "t2i: how many more plans to sample (temperature `plan_temperature`, "
            "seeds base + 1, 2, ...) when the model's plan fails the plan check (its objects, "
            "counts and relations read against the prompt's grammar; prompts outside the "
            "ShapesWorld grammar are not checked). 0: draw the first plan unchecked."
        },
    )
    plan_temperature: float = field(
        default=0.5,
        metadata={"description": "t2i: planner temperature of the re-plans (the first is greedy)."},
    )
    selection: Literal["accept", "best"] = field(
        default="best",
        metadata={
            "description": "t2i and edit: 'best' (default) always draws max_rounds images and "
            "keeps the best ranked; 'accept' stops at the first image the critique (t2i) or "
            "the grounding checks (edit) accept: fewer images, more wrong ones kept with the "
            "shipped model. t2i keeps an accepted image, else the one whose worst planned "
            "object fits best (`rank_by`); edit keeps an accepted attempt, else the one whose "
            "worst produced object fits best."
        },
    )
    rank_by: Literal["fit", "surprise", "score"] = field(
        default="surprise",
        metadata={
            "description": "How attempts are ranked: 'fit' by `Engine.plan_fit` (t2i: how well "
            "the prompt and plan explain each planned box) or `Engine.noun_fit` with contrast "
            "(edit: how much better each produced object's noun explains its box than a "
            "look-alike one word away; an edit where a look-alike wins is also rejected), the "
            "worst object counting, then the critique score; 'surprise' (the default; t2i) by "
            "the worst image token of `Engine.surprise` instead, which skips t2i's fit call, "
            "edits ranked as under 'fit' (t2i agent at three rounds, benchmark seeds 0-3: see "
            "the weights README, \"Stop 43\"); 'score' by the critique score alone and skips "
            "the fit calls."
        },
    )
    grounding_check: Literal["rank", "gate", "off"] = field(
        default="rank",
        metadata={
            "description": "What t2i's grounding of the planned objects does: 'rank' records "
            "the checks, ranks attempts by them and blames the failed boxes for a targeted "
            "redraw, but the verdict is the model's critique; 'gate' also rejects an image "
            "whose check fails; 'off' skips the grounding call. Edits are always verified by "
            "grounding."
        },
    )
    stray_check: Literal["gate", "off"] = field(
        default="gate",
        metadata={
            "description": "t2i: 'gate' asks the engine for marks away from every planned box "
            "that the prompt and plan argue against (`Engine.surprise`: a faint blob, a "
            "smear); an image with one is rejected and the next is drawn afresh. 'off' "
            "ignores them (and skips the call unless `rank_by='surprise'` needs it). On the "
            "shipped model none of its 599 drawings the detector calls right (tuning seeds "
            "123-126) was flagged (weights README, \"Stop 43\")."
        },
    )
    critique_by: Literal["scene", "model"] = field(
        default="scene",
        metadata={
            "description": "How the model judges an image against a text-to-image prompt (the "
            "t2i critique and the `critique` workflow): 'scene' (default) perceives the image "
            "(its caption, each captioned object grounded) and checks the ShapesWorld prompt "
            "against that scene by the world's prompt rules, and asks the model's critique "
            "when the caption does not parse whole or the prompt is outside the grammar; "
            "'model' only asks the model's critique (less accurate with the shipped model: "
            "see the README)."
        },
    )
    answer_by: Literal["scene", "direct"] = field(
        default="scene",
        metadata={
            "description": "understand: 'scene' (default) answers a ShapesWorld question about "
            "objects (count, color, shape, exist, relation) from the scene the model perceives "
            "(its caption of the image, each captioned object grounded to a box) by the "
            "world's question rules, and asks the question directly when the caption does not "
            "parse whole or the perceived scene lacks the object the question presupposes; "
            "'direct' only asks the model the question (one call instead of two, less "
            "accurate with the shipped model: see the README)."
        },
    )
    ground_by: Literal["scene", "direct"] = field(
        default="scene",
        metadata={
            "description": "ground: 'scene' (default) perceives the image first (the model's "
            "caption, each captioned object grounded) and checks each ShapesWorld expression's "
            "box against it: a side or relation expression takes the object the perceived "
            "scene picks out, any other the perceived box its head noun fits clearly better "
            "(`graphs/ground.py`); 'direct' returns the model's own boxes (one call instead "
            "of three or four, less accurate with the shipped model: see the README)."
        },
    )

    def __post_init__(self) -> None:
        for name in ("max_rounds", "num_steps", "plan_retries", "preview_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.refine not in ("auto", "regenerate", "regions"):
            raise ValueError(f"refine must be auto|regenerate|regions, got {self.refine!r}")
        if self.selection not in ("accept", "best"):
            raise ValueError(f"selection must be accept|best, got {self.selection!r}")
        if self.rank_by not in ("fit", "surprise", "score"):
            raise ValueError(f"rank_by must be fit|surprise|score, got {self.rank_by!r}")
        if self.grounding_check not in ("rank", "gate", "off"):
            raise ValueError(f"grounding_check must be rank|gate|off, got {self.grounding_check!r}")
        if self.stray_check not in ("gate", "off"):
            raise ValueError(f"stray_check must be gate|off, got {self.stray_check!r}")
        if self.critique_by not in ("scene", "model"):
            raise ValueError(f"critique_by must be scene|model, got {self.critique_by!r}")
        if self.answer_by not in ("scene", "direct"):
            raise ValueError(f"answer_by must be scene|direct, got {self.answer_by!r}")
        if self.ground_by not in ("scene", "direct"):
            raise ValueError(f"ground_by must be scene|direct, got {self.ground_by!r}")
        if self.plan_retries < 0:
            raise ValueError(f"plan_retries must be >= 0, got {self.plan_retries}")
        if not isinstance(self.review_plan, bool):
            raise ValueError(f"review_plan must be True or False, got {self.review_plan!r}")
        for name in ("iou_threshold", "plan_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0 < self.iou_threshold <= 1:
            raise ValueError(f"iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if self.plan_temperature <= 0:
            raise ValueError(f"plan_temperature must be > 0, got {self.plan_temperature}")
        if self.engine is not None and not any(callable(getattr(self.engine, m, None))
                                               for m in ("plan_layout", "generate", "ground", "answer", "edit")):  # fmt: skip
            raise ValueError(f"engine must be an Engine (plan_layout, generate, ground, ...), got "
                             f"{type(self.engine).__name__}")  # fmt: skip
        if self.artifacts is not None and not isinstance(self.artifacts, ArtifactStore | str | Path):
            raise ValueError(f"artifacts must be an ArtifactStore or a folder, got {type(self.artifacts).__name__}")
        if self.preview_every < 0:
            raise ValueError(f"preview_every must be >= 0, got {self.preview_every}")

    def get_engine(self) -> Engine:
        """The engine to call: the one given, else the lazily loaded real model."""
        if self.engine is not None:
            engine: Engine = self.engine
            return engine
        return load_engine(self.model_path)

    def get_store(self) -> ArtifactStore:
        """The artifact store: the one given, or one (cached per root) at the given root."""
        if isinstance(self.artifacts, ArtifactStore):
            return self.artifacts
        root = str(self.artifacts if self.artifacts is not None else DEFAULT_ARTIFACTS_ROOT)
        if root not in _STORES:
            _STORES[root] = ArtifactStore(root)
        return _STORES[root]
