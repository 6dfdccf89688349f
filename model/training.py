"""Multi-task masked-diffusion training of the Elastic-MoT model on ShapesWorld.

Data is generated on the fly: the batch of step `s` is drawn from
`np.random.default_rng([seed, s])`, so there is no dataset on disk and a resumed run sees
exactly the batches an uninterrupted run would. Every batch holds one task (the grouped
sampler of FACTS §3.6), drawn by `TASK_WEIGHTS`; `tasks_per_step` such batches share one
optimizer step, as they do across the devices of a data-parallel run (one task per step
made each update pull the shared weights toward one task: measured worse for all but
grounding). A run from scratch starts with stage 0, the dense pretraining of the vision
encoder (`training_vision`), the stand-in for Lavida-O's pretrained SigLIP.

Objective (FACTS §3.1-3.5): per row an independent mask ratio for the text answer and
for the target image (t = cos(pi u / 2), mask where r <= max(p, min r)), cross-entropy on
masked positions only; condition dropout for CFG (10% of image-generating rows lose their
whole prompt, 50% of edit rows lose the source codes); 80% of plan+image rows keep the
plan clean (plans list the objects in the order the prompt names them); micro-conditions (`objects : N ;`) dropped 30%. Half of the images that the
understanding tasks see are VQ reconstructions, the pixels the agent loop feeds them.

Run: `python -m lavida_agent.model.training --out DIR --vq model/weights/vq --steps N`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from lavida_agent.tools.shapes_world import language as lang
from lavida_agent.tools.shapes_world.render import core_box, render
from lavida_agent.tools.shapes_world.sampler import sample_scene
from lavida_agent.tools.shapes_world.scene import COLORS, SHAPES

from .configuration_lavida import PRESETS, LavidaConfig
from .modeling_lavida import LavidaForMaskedDiffusion
from .run_folder import RunFolderError, check_resume, load_checkpoint, truncate_metrics
from .tasks import (
    CRITIQUE_LEN,
    Batch,
    Example,
    box_cells,
    inner_cells,
    build_critique,
    build_edit,
    build_ground,
    build_t2i,
    build_understand,
    drop_conditions,
    images_to_pixels,
    plan_item_boxes,
    pack,
)
from .tokenization_lavida import build_tokenizer
from .training_vision import patch_targets, vq_roundtrip

logger = logging.getLogger(__name__)

TASK_WEIGHTS: dict[str, float] = {
    "t2i": 0.18,  # prompt -> image
    "t2i_plan": 0.12,  # prompt -> plan -> image (plan clean 80%, masked 20%)
    "plan": 0.05,  # prompt -> plan only
    "edit": 0.15,  # source + instruction -> image (25% with the edit plan)
    "edit_plan": 0.05,  # source + instruction -> the edit plan only
    "ground": 0.20,  # slowest to learn: precise locations from image features
    "understand": 0.15,  # questions 75%, captions 25%
    "critique": 0.15,
}
TRAINABLE = ("all", "understanding", "generation")
IMAGE_ONLY_TASKS = ("t2i", "edit")  # rows whose only loss is on image codes
TEXT_ONLY_TASKS = ("plan", "ground", "understand", "critique")  # rows no image position enters
EOS_LOSS_WEIGHT = 0.2  # [EOS] padding targets count a fifth of an answer token
PROMPT_DROP = 0.1
SOURCE_DROP = 0.5
MICRO_DROP = 0.3
PLAN_CLEAN = 0.8
RECONSTRUCT_P = 0.5  # understanding inputs seen through the VQ decoder


@dataclass
class TrainConfig:
    """Knobs of one training run (saved with every checkpoint)."""

    out: str = "checkpoints/model"
    # The VQ tokenizer whose codes the model learns (default: the shipped one). A run keeps
    # its own copy (`out/vq/`), which its resume and export read.
    vq: str = str(Path(__file__).resolve().parent / "weights" / "vq")
    preset: str = "shapes"  # the architecture (`configuration_lavida.PRESETS`: tiny, shapes, lavida-o)
    model_overrides: dict = field(default_factory=dict)
    steps: int = 6000  # optimizer steps of the multi-task run (0: stage 0 alone, or --init-from's weights)
    tokens_per_batch: int = 4096  # positions per optimizer step, split among its tasks
    max_rows: int = 48  # the most rows one task's batch holds
    lr: float = 1e-3  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # where the cosine ends, relative to lr
    warmup: int = 200  # linear warmup steps
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # the largest gradient norm
    seed: int = 0  # seeds the weights and every step's data
    tokenizer_corpus: int = 3000  # sampled texts whose words build the tokenizer
    log_every: int = 25  # steps between metrics.jsonl records
    eval_rows: int = 16  # held-out rows per task of each evaluation
    init_from: str = ""  # a run folder or pipeline folder whose weights start this run (fresh optimizer)
    eval_every: int = 500  # steps between evaluations of the held-out loss
    save_every: int = 250  # steps between checkpoints (state.pt; one is always written at the end)
    # Stage 0 (`training_vision`): dense per-patch pretraining of the vision encoder before
    # the multi-task run; skipped when resuming or starting from other weights.
    vision_pretrain_steps: int = 1000
    vision_pretrain_batch: int = 64  # scenes per stage-0 step
    # With `init_from`: drop its vision encoder and start a fresh one (the preset's stem,
    # then stage 0), keeping every other weight, e.g. to move old weights off the linear stem.
    reset_vision: bool = False
    vision_lr_scale: float = 0.2  # the vision encoder's learning rate relative to `lr`
    tasks_per_step: int = 4  # tasks drawn per optimizer step, splitting `tokens_per_batch`
    # Per image of an understanding row (ground, questions, critique): how many of its object
    # patches are labelled, through the LM head at their `img_enc` position, with the word of
    # their object's colour or shape (`TaskSampler.label_patches`). 0: off (stages 1-11).
    patch_words: int = 0
    # The share of plan-only rows whose noise masks exactly one plan item's four coordinates
    # (all else visible) instead of a random share of the plan (`add_noise`). 0: off.
    plan_item_mask: float = 0.0
    # The share of grounding rows whose noise masks every coordinate (`add_noise`). 0: off.
    ground_full_mask: float = 0.0
    # Weight of stage 0's dense per-patch loss (`training_vision.probe_loss`: colour, shape,
    # size, centre, box, background under every patch) on `vision_aux_batch` fresh scenes at
    # every step, so the vision encoder keeps those features while the mixture trains it.
    # (Stages 9-11 had it only before the mixture: by stage 11 a linear probe read the colour
    # of the object under a patch 20% of the time, chance 17%, from 99%; shape stayed 77%.)
    # 0: off. Its read-out head lives in `state.pt` (`vision_aux_head`), not in the export.
    vision_aux: float = 0.0
    vision_aux_batch: int = 16  # fresh scenes per step of the vision-aux loss
    # For its first steps the aux loss trains only its fresh read-out head (features
    # detached): at step 0 it is ~15 and its gradient disturbed the encoder (grounding loss
    # 2.0 -> 5.4 in 4 steps).
    vision_aux_warmup: int = 100
    # Relative weight of each question kind in the `understand` rows that ask a question
    # (`lang.sample_question`); empty: uniform over `QUESTION_KINDS` (stages 1-12).
    question_weights: dict = field(default_factory=dict)
    # The share of critique rows whose image the model drew itself (`own_generation_pool`:
    # `own_pool` images drawn once, at the start of the run, from its starting weights, and
    # judged by the detector). Synthetic corruptions alone taught a critique that agreed
    # with the detector 0.82 on rendered scenes but 0.55 on its own drawings. 0: off.
    own_critique: float = 0.0
    own_pool: int = 512  # images in the own-drawing pool (own_critique)
    # The share of edit rows (with a touched box) whose noise masks only cells the edit
    # touches, every other cell holding the *source's* code: the state of the pipeline's
    # region edit (`edit(..., regions=)`, used by the agent), with the loss on the change
    # alone. (Under full-image noise ~90% of an edit's loss is copying the source: stage 13
    # edited 0.52 even from the true plan and regions.) 0: off (stages 1-15).
    edit_region_mask: float = 0.0
    # Background edit rows get a region too: every cell but the objects' cores (`core_box`),
    # the state of the agent's background edit (`edit(..., keep=)`). Off: those rows keep the
    # full-image state (stage 16 was trained so).
    edit_region_background: bool = False
    # The loss weight of an edit row's touched cells (its `edit_region`) against 1 for every
    # other code, normalised per row so the row keeps its share of the loss: Lavida-O's
    # edit-area re-weighting (FACTS §3.2, `mm_edit_area_weight`, 5 there; its region is the
    # pixels that change, ours the touched boxes' cells). Under full-image noise ~90% of an
    # edit row's loss is copying the source. 1: off (stages 1-26).
    edit_area_weight: float = 1.0
    # The share of edit rows conditioned on their edit plan (the rest: instruction alone).
    edit_with_plan: float = 0.25
    # Edit rows that touch no box (background edits) take no plan segment even when drawn
    # with the plan, as the pipeline and the agent send them (an empty plan is sent as
    # none). Off: such rows drawn with the plan hold an empty plan segment, a state nothing
    # at inference makes (stages 1-30, which replay so).
    background_edit_without_plan: bool = False
    # An edit row's target image holds the *source's* codes outside the touched boxes' cells
    # (the target's inside them). The VQ encoder's GroupNorm makes every code depend on the
    # whole image: an object edit changes ~30% of the codes outside the cells it touches,
    # where no pixel changes (`training_vq.edit_locality`), so the whole-image target asked
    # the single shot for changes it could not see. The mixed codes decode to a correct edit
    # as often as the target's own (0.98 vs 0.99, 112 tuning edits). Rows that touch no box (background edits) keep the target's
    # codes. Off: stages 1-32, which replay so.
    edit_local_targets: bool = False
    # The share of grounding and question rows drawn as a look-alike scene
    # (`look_alike_scene`): two objects of one shape in different colours, or of one colour
    # in different shapes. Stage 16 found the named object's shape but took its same-shape
    # neighbour on 14 of 72 colour-form expressions (`the orange diamond` -> the green one).
    # 0: off (stages 1-16).
    hard_scenes: float = 0.0
    # The share of edit-plan rows whose every box coordinate is masked and nothing else: the
    # labels shown, the boxes to find. Under the random share an edit plan's items repeat
    # each other's boxes (a recolour lists one box twice), so a coordinate is mostly copied,
    # never found: stage 16 named the right objects in 68-73% of its edit plans, but its boxes
    # met the true ones at a mean IoU of 0.10. 0: off (stages 1-16).
    edit_plan_loc_mask: float = 0.0
    # The share of edit-plan rows that take an object away (and produce one) whose every box
    # coordinate is masked but the first `removed` item's: the state of `plan_edit`'s second
    # step, which shows the model its grounding of that object and asks for the other boxes
    # (a recolour's box equal to it, a move's elsewhere). A share of the rows that
    # `edit_plan_loc_mask`, drawn first, leaves: with both, (1 - loc_mask) x this of them.
    # 0: off (stages 1-26).
    edit_plan_given_removed: float = 0.0
    # The share of text-to-image rows without a plan whose scene has a canonical layout
    # (`language.canonical_scene_for_prompt`: the objects in the order the prompt names
    # them, side by side or on a grid) instead of a uniform one. Without a plan the first
    # codes an image reveals must agree on one of very many layouts, each drawn on its own
    # (the shipped stage 20 drew two objects with each other's colour or shape); a
    # canonical layout leaves only the attributes to draw. Rows with a plan keep uniform
    # layouts: the plan carries the layout. 0: off (stages 1-24; stage 25, not shipped, used 1.0).
    canonical_t2i: float = 0.0
    # Relative weight of each prompt category (`language.PROMPT_CATEGORIES`) in the t2i,
    # t2i-plan and plan rows, e.g. more of the two-object ones a drawer binds worst; empty:
    # uniform, as every stage before it (with no extra draw, so those runs replay).
    t2i_categories: dict = field(default_factory=dict)
    # Relative weight of each edit category (`language.EDIT_CATEGORIES`) in the edit and
    # edit-plan rows, e.g. more of the moves and resizes whose new object a drawer draws
    # worst; empty: uniform over the categories a scene allows, as every stage before it
    # (with no extra draw, so those runs replay).
    edit_categories: dict = field(default_factory=dict)
    task_weights: dict = field(default_factory=lambda: dict(TASK_WEIGHTS))
    # Which weights learn. "all"; or "understanding": only the parameters no image depends on
    # (`LavidaForMaskedDiffusion.text_only_parameter_names`: the und sets of the split layers,
    # the LM head, the copy head), the rest frozen, so answers, boxes, verdicts and plans learn
    # while every image drawn from given conditions stays bit-identical. It needs a mixture
    # without the image-only tasks (`t2i`, `edit`) and `vision_aux` 0 (the encoder is frozen).
    # "generation": the converse (`image_only_parameter_names`: the gen sets, the image
    # embedding and head), so the drawing learns and every answer, box, verdict and t2i plan
    # stays bit-identical (edit plans read the source's codes and may change); it needs a
    # mixture without the text-only tasks (plan, ground, understand, critique) and
    # `vision_aux` 0.
    trainable: str = "all"
    # Comma-separated parameter-name prefixes (`"layers.5.,lm_head"`): only the parameters
    # of `trainable`'s side whose names start with one of them learn ("": all of that side).
    # A fine-tune that changes a few tensors ships small (`attach_weights`).
    train_only: str = ""
    # Processes that build the coming steps' batches (`step_data`) while the model trains:
    # on an accelerator the single-process data draw, not the model, bounds the step rate.
    # 0: built in the training process. The batches are the same either way (each step's
    # draw is a pure function of the seed and step); on CUDA with `data_device="cpu"` the
    # workers' VQ encoding runs on the CPU, so a code can differ where two codebook entries
    # tie to float rounding.
    data_workers: int = 0
    # Where the data workers run the VQ tokenizer (encoding targets, the round trip of
    # understanding inputs): ~70% of a worker's time on the CPU. "cuda" puts each worker's
    # copy on the accelerator (one CUDA context per worker); its codes are then the ones
    # the training process draws on CUDA. Unused without data workers.
    data_device: str = "cpu"
    # "auto": bf16 autocast on CUDA, fp32 elsewhere; "bf16": autocast on any device (on this
    # CPU ~100x slower, for checks); "fp32": fp32 everywhere.
    precision: str = "auto"


# ----------------------------------------------------------------------------- data


def micro_conditions(scene, rng: np.random.Generator) -> str:
    """Universal text conditioning (FACTS §3.5): `objects : N ;`, dropped 30% of the time."""
    return "" if rng.random() < MICRO_DROP else f"objects : {len(scene.objects)} ;"


def touched_plan(source, target) -> list[tuple[str, tuple[int, int, int, int]]]:
    """The edit plan: the regions an edit changes, as plan items.

    Objects of the target that are not in the source (added, moved, recoloured, ...) are
    listed with their target label and box; objects of the source that are gone are
    listed as `removed` at their source box. A background edit touches no box.
    """
    src, tgt = set(source.objects), set(target.objects)
    items = [(f"{o.size} {o.color} {o.shape}", o.box) for o in target.sorted_left_to_right() if o not in src]
    items += [("removed", o.box) for o in source.sorted_left_to_right() if o not in tgt]
    return items[:4]


def look_alike_scene(rng: np.random.Generator):
    """A scene of 2-4 objects in which two share a shape (in different colours) or, a fair
    coin later, a colour (in different shapes): the scenes where naming an object needs
    both of its words."""
    n = int(rng.integers(2, 5))
    palette, forms = list(COLORS), list(SHAPES)
    shapes: list = [None] * n
    colors: list = [None] * n
    if rng.random() < 0.5:
        shapes[0] = shapes[1] = str(rng.choice(forms))
        colors[0], colors[1] = (str(c) for c in rng.choice(palette, size=2, replace=False))
    else:
        colors[0] = colors[1] = str(rng.choice(palette))
        shapes[0], shapes[1] = (str(c) for c in rng.choice(forms, size=2, replace=False))
    return sample_scene(rng, n_objects=n, shapes=shapes, colors=colors)


class TaskSampler:
    """Builds training examples of each task from seeded ShapesWorld draws."""

    def __init__(self, tokenizer, config: LavidaConfig, vq, patch_words: int = 0, plan_item_mask: float = 0.0,
                 question_weights: dict | None = None, ground_full_mask: float = 0.0,
                 own_pool: dict | None = None, own_critique: float = 0.0,
                 edit_region_mask: float = 0.0, edit_region_background: bool = False,
                 hard_scenes: float = 0.0, edit_plan_loc_mask: float = 0.0, edit_plan_given_removed: float = 0.0,
                 canonical_t2i: float = 0.0, t2i_categories: dict | None = None,
                 edit_area_weight: float = 1.0, edit_with_plan: float = 0.25,
                 edit_categories: dict | None = None, background_edit_without_plan: bool = False,
                 edit_local_targets: bool = False):  # fmt: skip
        self.tok, self.cfg, self.vq = tokenizer, config, vq
        if own_critique and not own_pool:
            raise ValueError("own_critique needs an own_pool (see own_generation_pool)")
        self.own_pool, self.own_critique = own_pool, own_critique
        self.edit_region_mask, self.edit_region_background = edit_region_mask, edit_region_background
        self.hard_scenes, self.edit_plan_loc_mask = hard_scenes, edit_plan_loc_mask
        self.edit_plan_given_removed = edit_plan_given_removed
        self.removed_id = tokenizer.convert_tokens_to_ids("removed")  # an edit plan's taken-away label
        self.edit_area_weight, self.edit_with_plan = edit_area_weight, edit_with_plan
        self.background_edit_without_plan = background_edit_without_plan
        self.edit_local_targets = edit_local_targets
        self.canonical_t2i = canonical_t2i
        self.t2i_categories = dict(t2i_categories) if t2i_categories else None
        if self.t2i_categories:
            lang.prompt_category_weights(self.t2i_categories)  # fail now, not mid-run
        self.edit_categories = lang.edit_category_weights(edit_categories) if edit_categories else None
        self.patch_words, self.plan_item_mask, self.ground_full_mask = patch_words, plan_item_mask, ground_full_mask
        self.question_weights = dict(question_weights) if question_weights else None
        if self.question_weights:
            lang.question_kind_weights(self.question_weights)  # fail now, not mid-run
        if patch_words:
            word = lambda w: tokenizer.convert_tokens_to_ids(w)  # noqa: E731
            self._colour_ids = np.array([word(c) for c in COLORS])
            self._shape_ids = np.array([word(s) for s in SHAPES])

    def label_patches(self, ex: Example, scene, rng: np.random.Generator) -> Example:
        """Label `patch_words` object patches of the row's (first) image with their object's
        colour or shape word (a fair coin each), as text targets at their `img_enc` positions.

        Why: the LM head's six colour rows had collapsed onto one vector (mean cosine 0.94),
        and colour questions sat at chance: a colour row gets no gradient that tells it apart
        while no answer slot holds colour, and no slot learns to while the rows are alike.
        Where the vision features hold colour (keep them with `vision_aux`: stage 11's did
        not), labelling a few patches through the same head gives the rows that gradient.
        The image stays the input: these positions are never masked (`add_noise`).
        """
        if not self.patch_words:
            return ex
        targets = patch_targets(scene, self.cfg.vision_patch_size)
        objects = np.nonzero(targets["color"] >= 0)[0]
        if not len(objects):
            return ex
        enc = [i for i, t in enumerate(ex.input_ids) if t == self.cfg.img_enc_token_id]
        enc = enc[: self.cfg.vision_tokens_per_image]  # the first image's positions, raster order
        if len(enc) != len(targets["color"]):
            raise ValueError(f"{len(enc)} image positions for {len(targets['color'])} patches: the model's "
                             "image size or patch size does not match the ShapesWorld canvas")  # fmt: skip
        picked = rng.choice(objects, size=min(self.patch_words, len(objects)), replace=False)
        text_targets = list(ex.text_targets)
        for t in picked:
            colour = rng.random() < 0.5
            text_targets[enc[t]] = int(self._colour_ids[targets["color"][t]] if colour
                                       else self._shape_ids[targets["shape"][t]])  # fmt: skip
        return replace(ex, text_targets=text_targets)

    @torch.no_grad()
    def encode(self, images: list[np.ndarray]) -> list[np.ndarray]:
        if not images:
            return []
        codes = self.vq.encode(images_to_pixels(images).to(self.vq_device)).codes
        return list(codes.cpu().numpy())

    @property
    def vq_device(self):
        return next(self.vq.parameters()).device

    @torch.no_grad()
    def reconstruct(self, images: list[np.ndarray], rng: np.random.Generator, p: float) -> list[np.ndarray]:
        """Replace each image, with probability `p`, by its VQ reconstruction.

        In the agent loop the understanding tasks (critique, grounding, questions) look at the
        model's own decoded images, so they also train on decoder-styled pixels.
        """
        pick = [i for i in range(len(images)) if rng.random() < p]
        if not pick:
            return images
        decoded = vq_roundtrip(self.vq, [images[i] for i in pick], self.vq_device)
        out = list(images)
        for i, im in zip(pick, decoded):
            out[i] = im
        return out

    def examples(self, task: str, rng: np.random.Generator, n: int) -> list[Example]:
        make = getattr(self, f"_{task}")
        return make(rng, n)

    def _t2i(self, rng, n, plan: str = "none"):
        drafts = []
        for _ in range(n):
            text, spec = lang.sample_prompt(rng, weights=self.t2i_categories)
            # No draw at all when off, so runs without `canonical_t2i` replay as before.
            canonical = plan == "none" and self.canonical_t2i and rng.random() < self.canonical_t2i
            layout = lang.canonical_scene_for_prompt if canonical else lang.scene_for_prompt
            scene = layout(rng, spec)
            drafts.append((text, scene, micro_conditions(scene, rng)))
        codes = self.encode([render(s) for _, s, _ in drafts]) if plan != "only" else [None] * n
        out = []
        for (text, scene, micro), c in zip(drafts, codes):
            if plan == "none":
                ex = build_t2i(self.tok, self.cfg, text, codes=c, micro_conditions=micro)
            else:
                ex = build_t2i(
                    self.tok, self.cfg, text, codes=c, plan=lang.plan_items(scene, order="scene"),
                    plan_is_target=True, with_image=plan != "only", micro_conditions=micro,
                )  # fmt: skip
            out.append(ex)
        return out

    def _t2i_plan(self, rng, n):
        return self._t2i(rng, n, plan="with_image")

    def _plan(self, rng, n):
        return self._t2i(rng, n, plan="only")

    def _edit_draft(self, rng) -> tuple:
        """One `(source scene, instruction, target scene)`: the category by `edit_categories`,
        on a new scene until one allows it; without weights, uniform over those the first
        scene allows."""
        if self.edit_categories is None:
            source = sample_scene(rng)
            instruction, _, target = lang.sample_edit(rng, source)
            return source, instruction, target
        w = self.edit_categories
        category = lang.EDIT_CATEGORIES[int(rng.choice(len(w), p=w / w.sum()))]
        source, instruction, _, target = lang.sample_edit_on_new_scene(rng, category)
        return source, instruction, target

    def _edit(self, rng, n):
        drafts = [(*self._edit_draft(rng), rng.random() < self.edit_with_plan) for _ in range(n)]
        images = [render(s) for s, _, _, _ in drafts] + [render(t) for _, _, t, _ in drafts]
        codes = self.encode(images)
        out = []
        for i, (source, instruction, target, with_plan) in enumerate(drafts):
            touched = touched_plan(source, target)
            if not touched and self.background_edit_without_plan:
                with_plan = False
            if touched:
                region = box_cells([b for _, b in touched], self.cfg)
            elif self.edit_region_background and target.background != source.background:
                # everything but the objects' cores
                region = ~inner_cells([core_box(o.shape, o.box) for o in source.objects], self.cfg)
            else:
                region = None
            goal = codes[n + i]
            if touched and self.edit_local_targets:
                goal = np.where(region, goal, codes[i])
            ex = build_edit(
                self.tok, self.cfg, instruction, images[i], codes[i], codes=goal,
                plan=touched if with_plan else None, plan_is_target=True,
            )  # fmt: skip
            out.append(replace(ex, edit_region=region))
        return out

    def _edit_plan(self, rng, n):
        """Source + instruction -> the edit plan alone (`touched_plan`), the layout step of an
        edit as `plan` is of t2i. (In `edit` rows the plan is a clean condition 80% of the
        time and in only a quarter of the rows: stage 13 wrote the right labels for 6 edits
        in 10 but no box within IoU 0.5 of the truth.)"""
        drafts = [self._edit_draft(rng) for _ in range(n)]
        images = [render(s) for s, _, _ in drafts]
        codes = self.encode(images)
        return [build_edit(self.tok, self.cfg, instruction, im, c, plan=touched_plan(source, target),
                           plan_is_target=True, with_plan=True, with_image=False)
                for (source, instruction, target), im, c in zip(drafts, images, codes)]  # fmt: skip

    def _scene(self, rng, n_objects=None):
        # No draw at all when off, so runs without `hard_scenes` replay as before.
        if self.hard_scenes and rng.random() < self.hard_scenes:
            return look_alike_scene(rng)
        return sample_scene(rng, n_objects=n_objects)

    def _ground(self, rng, n):
        drafts = []
        for _ in range(n):
            scene = self._scene(rng)
            while not lang.referable(scene):  # rare (stage 17 met one at step 2519): draw again
                scene = self._scene(rng)
            k = int(rng.integers(1, len(scene.objects) + 1))
            exprs, boxes = [], []
            for _ in range(k):
                text, _, idx = lang.sample_refexp(rng, scene)
                exprs.append(text)
                boxes.append(scene.objects[idx].box)
            drafts.append((render(scene), exprs, boxes, scene))
        images = self.reconstruct([d[0] for d in drafts], rng, RECONSTRUCT_P)
        return [self.label_patches(build_ground(self.tok, self.cfg, im, e, b), scene, rng)
                for im, (_, e, b, scene) in zip(images, drafts)]  # fmt: skip

    def _understand(self, rng, n):
        drafts = []
        for _ in range(n):
            scene = self._scene(rng, n_objects=None)
            if rng.random() < 0.25:
                question, ans = "describe the image.", lang.caption(scene)
            else:
                try:
                    question, _, ans = lang.sample_question(rng, scene, self.question_weights)
                except ValueError:  # weights that name only kinds this scene cannot ask
                    question, ans = "describe the image.", lang.caption(scene)
            drafts.append((render(scene), question, ans, scene))
        images = self.reconstruct([d[0] for d in drafts], rng, RECONSTRUCT_P)
        return [self.label_patches(build_understand(self.tok, self.cfg, im, q, a), scene, rng)
                for im, (_, q, a, scene) in zip(images, drafts)]  # fmt: skip

    def _critique(self, rng, n):
        # No draw at all without a pool, so runs without `own_critique` replay as before.
        n_own = int(rng.binomial(n, self.own_critique)) if self.own_critique else 0
        drafts = [lang.sample_critique(rng) for _ in range(n - n_own)]
        images = self.reconstruct([render(scene) for _, scene, _ in drafts], rng, RECONSTRUCT_P)
        out = [self.label_patches(build_critique(self.tok, self.cfg, im, p, v), scene, rng)
               for im, (p, scene, v) in zip(images, drafts)]  # fmt: skip
        pool = self.own_pool
        for j in rng.integers(len(pool["prompts"]), size=n_own) if n_own else ():
            out.append(build_critique(self.tok, self.cfg, pool["images"][j], pool["prompts"][j], pool["verdicts"][j]))
        return out


# ----------------------------------------------------------------------------- own generations


def critique_verdict(tokenizer, reasons: list[str], max_tokens: int = CRITIQUE_LEN - 1) -> str:
    """The verdict a critique row trains on, for the detector's `reasons` on an image.

    `extra unknown object` (a blob the detector cannot name) is not in the vocabulary the
    critique speaks, so it is dropped from the text (the verdict stays `no`); then as many
    whole reasons as fit in `max_tokens` are kept, so the text always parses.
    """
    if not reasons:
        return "yes"
    unknown = lang.reason("extra", noun=lang.UNKNOWN_OBJECT)
    kept: list[str] = []
    for r in (r for r in reasons if r != unknown):
        text = lang.verdict_text(kept + [r])
        if len(tokenizer(text.lower(), add_special_tokens=False)["input_ids"]) > max_tokens:
            break
        kept.append(r)
    return lang.verdict_text(kept) if kept else "no"


@torch.no_grad()
def own_generation_pool(model, vq, tokenizer, n: int, seed: int, *, batch_size: int = 32, progress: bool = False) -> dict:
    """`n` images the model draws itself, judged by the detector (`check_prompt`).

    Held-out-style prompts (`sample_prompt`); even rows drawn from the prompt alone (mostly
    wrong: the single-shot drawer), odd rows from the scene's true layout (mostly right), so
    the critique sees both verdicts on its own pixels. Deterministic for given weights and
    seed. Returns `{images (n, H, W, 3) uint8, prompts, verdicts}`.
    """
    from tqdm import tqdm

    from lavida_agent.tools.shapes_world.checkers import check_prompt

    from .pipeline_lavida import LavidaPipeline

    was_training = model.training
    pipe = LavidaPipeline(model, vq, tokenizer)
    rng = np.random.default_rng([seed, 0x0C])
    prompts, plans = [], []
    for i in range(n):
        text, spec = lang.sample_prompt(rng)
        prompts.append(text)
        plans.append(lang.plan_items(lang.scene_for_prompt(rng, spec), order="scene") if i % 2 else None)
    images = []
    for s in tqdm(range(0, n, batch_size), disable=not progress, desc="own pool", dynamic_ncols=True):
        sl = slice(s, min(n, s + batch_size))
        images += pipe.generate(prompts[sl], plans=plans[sl], seed=[seed * 7919 + i for i in range(sl.start, sl.stop)]).images
    model.train(was_training)
    verdicts = [critique_verdict(tokenizer, check_prompt(p, im).reasons) for p, im in zip(prompts, images)]
    return {"images": np.stack(images).astype(np.uint8), "prompts": prompts, "verdicts": verdicts}


def _own_pool(path: Path, build) -> dict:
    """Load the run's pool from `path`, or build and save it (a resume reuses it exactly)."""
    if path.exists():
        with np.load(path) as z:
            return {"images": z["images"], "prompts": [str(x) for x in z["prompts"]],
                    "verdicts": [str(x) for x in z["verdicts"]]}  # fmt: skip
    pool = build()
    np.savez(path, images=pool["images"], prompts=np.array(pool["prompts"]), verdicts=np.array(pool["verdicts"]))
    return pool


def corpus_for_tokenizer(n: int = 3000, seed: int = 12345) -> list[str]:
    """Sample texts of every grammar so the tokenizer knows every word they use."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        text, spec = lang.sample_prompt(rng)
        scene = lang.scene_for_prompt(rng, spec)
        texts += [text, lang.caption(scene), lang.sample_edit(rng, scene)[0]]
        texts += [lang.sample_refexp(rng, scene)[0], *lang.sample_question(rng, scene)[::2]]
        texts.append(lang.sample_critique(rng)[2])
    from lavida_agent import prompts

    texts += [prompts.load(name) for name in prompts.names()]
    return texts


# ----------------------------------------------------------------------------- noise


def _mask_draw(rng: np.random.Generator, n: int, eps: float = 1e-3) -> np.ndarray:
    """Which of `n` positions to mask: t = cos(pi u / 2), at least one (FACTS §3.1)."""
    t = math.cos(math.pi * rng.random() / 2)
    p = (1 - eps) * t + eps
    r = rng.random(n)
    return r <= max(p, r.min())


def add_noise(
    ex: Example, rng: np.random.Generator, config: LavidaConfig, item_mask: float = 0.0,
    ground_full_mask: float = 0.0, edit_region_mask: float = 0.0, edit_plan_loc_mask: float = 0.0,
    edit_plan_given_removed: float = 0.0, removed_id: int | None = None,
) -> tuple[Example, list[np.ndarray]]:
    """Mask an example for training; returns it (targets = labels) and its image labels.

    With probability `ground_full_mask` a grounding row masks every coordinate, the state
    inference starts from (under the random share alone, a box is entirely masked in ~1/5
    of the rows and the rest train completing a box from some of its coordinates).

    With probability `item_mask` a plan-only row of two or more items masks exactly one
    item's four coordinates, the rest of the plan visible: the planner then learns where an
    object goes *given* the others and the prompt's relation. (Under the random share alone
    the stage-11 planner drew each box from its own marginal: `benchmarks.plan_relations`.)

    With probability `edit_region_mask` an edit row with an `edit_region` masks a random
    share of the region's cells only, and every cell outside it shows the source's code, as
    the pipeline's region edit does (its loss is then on the change alone).

    With probability `edit_plan_loc_mask` an edit-plan row masks the four coordinates of
    every item and nothing else: the boxes are found from the image, not copied between
    items.

    With probability `edit_plan_given_removed` an edit-plan row with a `removed` item
    (labelled with the token `removed_id`) and at least one other item masks every box
    coordinate but the first `removed` item's, and nothing else.
    """
    cfg = config
    ids = list(ex.input_ids)
    labels = [-100] * len(ids)
    codes, is_target = list(ex.gen_codes), list(ex.gen_is_target)
    makes_image = any(is_target)

    # Text answer: independent ratio. Plan+image rows keep the plan clean 80% of the time.
    # Targets at image-feature positions (`TaskSampler.label_patches`) are always labelled
    # and never masked: the image is the input there.
    enc = [p for p in ex.target_positions() if ids[p] == cfg.img_enc_token_id]
    for pos in enc:
        labels[pos] = ex.text_targets[pos]
    targets = [p for p in ex.target_positions() if ids[p] != cfg.img_enc_token_id]
    # (Edit plans keep the random share: an edit plan's items repeat each other's boxes.)
    items = ([p for p in targets if ids[p] == cfg.loc_begin_token_id]
             if item_mask and not makes_image and ex.task != "edit_plan" else [])  # fmt: skip
    if edit_plan_given_removed and removed_id is None:
        raise ValueError("edit_plan_given_removed needs removed_id (the token id of the word `removed`)")
    answer = set(targets)
    spans = ([(p, r) for p, r in plan_item_boxes(ids, cfg, removed_id) if p - 1 in answer]
             if edit_plan_given_removed and ex.task == "edit_plan" else [])  # fmt: skip
    begins = [p for p in targets if ids[p] == cfg.loc_begin_token_id] if ex.task == "edit_plan" else []
    if ground_full_mask and ex.loc_only and targets and rng.random() < ground_full_mask:
        for pos in targets:
            labels[pos] = ids[pos]
            ids[pos] = cfg.mask_token_id
    elif edit_plan_loc_mask and begins and rng.random() < edit_plan_loc_mask:
        for pos in (b + k for b in begins for k in range(1, 5)):
            labels[pos] = ids[pos]
            ids[pos] = cfg.mask_token_id
    elif (edit_plan_given_removed and len(spans) >= 2 and any(r for _, r in spans)
          and rng.random() < edit_plan_given_removed):  # fmt: skip
        # (a remove's plan is its one removed box: nothing to hide, so it takes the random share)
        shown = next(p for p, r in spans if r)
        for pos in (p + k for p, _ in spans if p != shown for k in range(4)):
            labels[pos] = ids[pos]
            ids[pos] = cfg.mask_token_id
    elif len(items) >= 2 and rng.random() < item_mask:
        begin = items[int(rng.integers(len(items)))]
        for pos in range(begin + 1, begin + 5):
            labels[pos] = ids[pos]
            ids[pos] = cfg.mask_token_id
    elif targets and not (makes_image and rng.random() < PLAN_CLEAN):
        for pos, m in zip(targets, _mask_draw(rng, len(targets))):
            if m:
                labels[pos] = ids[pos]
                ids[pos] = cfg.mask_token_id

    # Target image: its own independent ratio over the VQ grid (within the edit's region,
    # the source's codes outside it, for a region row). No draw without `edit_region_mask`,
    # so earlier runs replay.
    region = None
    if edit_region_mask and ex.edit_region is not None and rng.random() < edit_region_mask:
        region = ex.edit_region
        source = next(c for c, t in zip(codes, is_target) if not t)
    image_labels = []
    for k, tgt in enumerate(is_target):
        if not tgt:
            continue
        c = codes[k].copy()
        m = _mask_draw(rng, c.size).reshape(c.shape)
        if region is not None:
            m = (m & region) if (m & region).any() else region.copy()
            c = np.where(region, c, source)
        image_labels.append(np.where(m, c, -100))
        c[m] = cfg.image_mask_code
        codes[k] = c

    noisy = Example(ids, list(ex.segment_ids), labels, codes, is_target, list(ex.images), ex.task, ex.loc_only)
    # Condition dropout for classifier-free guidance (FACTS §3.4); the source's codes
    # are dropped on their own draw, not with the prompt.
    if makes_image:
        drop_prompt, drop_source = rng.random() < PROMPT_DROP, rng.random() < SOURCE_DROP
        if drop_prompt or drop_source:
            noisy = drop_conditions(noisy, cfg, prompt=drop_prompt, source=drop_source)
    return noisy, image_labels


# ----------------------------------------------------------------------------- loop


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = min(1.0, (step - tc.warmup) / max(1, tc.steps - tc.warmup))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def rows_for(task: str, tc: TrainConfig, cfg: LavidaConfig, tokens: int | None = None) -> int:
    """Rows per batch so that every task costs about `tokens` (`tokens_per_batch`) positions."""
    P, T = cfg.positions_per_image, cfg.vision_tokens_per_image
    approx_len = {
        "t2i": 20 + P, "t2i_plan": 20 + 48 + P, "plan": 20 + 48, "edit": T + P + 16 + P,
        "edit_plan": T + P + 16 + 48,
        "ground": T + 40, "understand": T + 14 + 12, "critique": T + 20 + 16,
    }[task]  # fmt: skip
    return max(4, min(tc.max_rows, (tokens or tc.tokens_per_batch) // approx_len))


def make_batch(sampler: TaskSampler, task: str, rng: np.random.Generator, n: int, cfg):
    examples = sampler.examples(task, rng, n)
    noisy, image_labels, weights = [], [], []
    for ex in examples:
        e, il = add_noise(ex, rng, cfg, item_mask=sampler.plan_item_mask, ground_full_mask=sampler.ground_full_mask,
                          edit_region_mask=sampler.edit_region_mask,
                          edit_plan_loc_mask=sampler.edit_plan_loc_mask,
                          edit_plan_given_removed=sampler.edit_plan_given_removed,
                          removed_id=sampler.removed_id)  # fmt: skip
        noisy.append(e)
        image_labels += il
        if sampler.edit_area_weight != 1:
            weights += [edit_area_weights(ex.edit_region, labels, sampler.edit_area_weight) for labels in il]
    batch = pack(noisy, cfg)
    if sampler.edit_area_weight != 1 and image_labels:
        batch.image_weights = torch.from_numpy(np.stack(weights)).float()
    image_labels = torch.from_numpy(np.stack(image_labels)).long() if image_labels else None
    return batch, image_labels


def edit_area_weights(region: np.ndarray | None, labels: np.ndarray, weight: float) -> np.ndarray:
    """Loss weights of one target image's codes: `weight` on the cells of `region` (an
    edit's touched cells), 1 elsewhere, scaled so they average 1 over the labelled codes
    (`labels != -100`): the row keeps its share of the loss, and its change more of it."""
    w = np.ones(labels.shape, dtype=np.float32)
    if region is None or weight == 1:
        return w
    w[region] = weight
    return w * ((labels != -100).sum() / max(w[labels != -100].sum(), 1e-6))


def task_sampler(tc: TrainConfig, tokenizer, cfg: LavidaConfig, vq, pool: dict | None) -> TaskSampler:
    """The run's `TaskSampler`, with every data knob of `tc`."""
    return TaskSampler(tokenizer, cfg, vq, patch_words=tc.patch_words, plan_item_mask=tc.plan_item_mask,
                       question_weights=tc.question_weights, ground_full_mask=tc.ground_full_mask,
                       own_pool=pool, own_critique=tc.own_critique,
                       edit_region_mask=tc.edit_region_mask,
                       edit_region_background=tc.edit_region_background,
                       hard_scenes=tc.hard_scenes, edit_plan_loc_mask=tc.edit_plan_loc_mask,
                       edit_plan_given_removed=tc.edit_plan_given_removed,
                       canonical_t2i=tc.canonical_t2i, t2i_categories=tc.t2i_categories,
                       edit_categories=tc.edit_categories,
                       background_edit_without_plan=tc.background_edit_without_plan,
                       edit_local_targets=tc.edit_local_targets,
                       edit_area_weight=tc.edit_area_weight, edit_with_plan=tc.edit_with_plan)  # fmt: skip


def step_data(sampler: TaskSampler, tc: TrainConfig, cfg, tasks: list[str], weights: np.ndarray, step: int, vq):
    """Everything optimizer step `step` trains on, a pure function of the seed and the step.

    Returns `([(task, batch, image_labels)] * tasks_per_step, aux)`, where `aux` is the
    `vision_aux` input `(pixels, targets)` or None.
    """
    rng = np.random.default_rng([tc.seed, step])
    k = tc.tasks_per_step
    items = []
    for _ in range(k):
        task = tasks[int(rng.choice(len(tasks), p=weights))]
        items.append((task, *make_batch(sampler, task, rng, rows_for(task, tc, cfg, tc.tokens_per_batch // k), cfg)))
    aux = None
    if tc.vision_aux:
        aux = vision_aux_data(vq, np.random.default_rng([tc.seed, 0xA11, step]), tc.vision_aux_batch,
                              cfg.vision_patch_size)  # fmt: skip
    return items, aux


# Data workers (`TrainConfig.data_workers`): spawned processes that build the coming steps'
# batches with `step_data` on the CPU while the accelerator trains. Tensors cross the process
# boundary as numpy arrays (pickled by value), not through torch's shared-memory handles.
_WORKER: dict = {}


def _worker_init(tc: TrainConfig, cfg, tok_dir: str, pool_path, tasks: list[str], weights) -> None:
    from transformers import AutoTokenizer

    from .modeling_vq import VQImageTokenizer

    torch.set_num_threads(1)
    vq = VQImageTokenizer.from_pretrained(tc.vq).to(tc.data_device).eval()
    pool = _own_pool(pool_path, None) if pool_path else None
    sampler = task_sampler(tc, AutoTokenizer.from_pretrained(tok_dir), cfg, vq, pool)
    _WORKER.update(tc=tc, cfg=cfg, sampler=sampler, tasks=tasks, weights=weights, vq=vq)


def _worker_step(step: int):
    w = _WORKER
    return _portable(step_data(w["sampler"], w["tc"], w["cfg"], w["tasks"], w["weights"], step, w["vq"]), np.asarray)


def check_run_knobs(tc: TrainConfig) -> None:
    """Refuse knobs that cannot run (`RunFolderError`, a `ValueError`): counts and intervals
    below 1, a mixture without weight, an unknown preset or architecture key, a precision,
    worker count or worker device that cannot run; before a run writes anything."""
    for name in ("tokens_per_batch", "max_rows", "tasks_per_step", "log_every", "eval_every", "save_every",
                 "eval_rows"):  # fmt: skip
        if getattr(tc, name) < 1:
            raise RunFolderError(f"{name} must be at least 1, got {getattr(tc, name)}")
    # steps 0: stage 0 alone from scratch, or --init-from's weights as this run's export
    for name in ("steps", "warmup", "vision_pretrain_steps", "vision_pretrain_batch", "own_pool", "vision_aux_batch"):
        if getattr(tc, name) < 0:
            raise RunFolderError(f"{name} must be >= 0, got {getattr(tc, name)}")
    if not tc.lr > 0:
        raise RunFolderError(f"lr must be > 0, got {tc.lr}")
    _check_task_weights(tc.task_weights)
    if tc.preset not in PRESETS:
        raise RunFolderError(f"unknown preset {tc.preset!r}; expected one of {', '.join(PRESETS)}")
    if not isinstance(tc.model_overrides, dict):
        raise RunFolderError(f"model overrides are a JSON object of LavidaConfig fields, got {tc.model_overrides!r}")
    known = set(inspect.signature(LavidaConfig.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(tc.model_overrides) - known)
    if unknown:
        raise RunFolderError(f"unknown model setting(s) {unknown}; LavidaConfig takes {sorted(known)}")
    if tc.precision not in ("auto", "bf16", "fp32"):
        raise RunFolderError(f"precision must be 'auto' (bf16 autocast on CUDA, fp32 elsewhere), 'bf16' or 'fp32', "
                         f"got {tc.precision!r}")  # fmt: skip
    if tc.data_workers < 0:
        raise RunFolderError(f"data_workers must be >= 0 (0: draw the data in the training process), got {tc.data_workers}")
    _check_data_device(tc.data_device)
    if tc.edit_area_weight <= 0:
        raise RunFolderError(f"edit_area_weight must be > 0 (1: every code weighs the same), got {tc.edit_area_weight}")
    if not 0 <= tc.edit_with_plan <= 1:
        raise RunFolderError(f"edit_with_plan is a share of the edit rows, in [0, 1]; got {tc.edit_with_plan}")
    if tc.trainable not in TRAINABLE:
        raise RunFolderError(f"trainable must be one of {', '.join(TRAINABLE)}, got {tc.trainable!r}")
    if tc.trainable != "all":
        idle, read = ((IMAGE_ONLY_TASKS, "image codes") if tc.trainable == "understanding"
                      else (TEXT_ONLY_TASKS, "text outputs"))  # fmt: skip
        idle = [t for t in idle if tc.task_weights.get(t, 0) > 0]
        if idle:
            raise RunFolderError(f"trainable={tc.trainable!r} freezes everything {read} are read from, so "
                             f"{', '.join(idle)} rows would carry no gradient: give them weight 0 in --tasks")
        if tc.vision_aux:
            raise RunFolderError(f"trainable={tc.trainable!r} freezes the vision encoder: vision_aux must be 0")
    if tc.train_only and not train_only_prefixes(tc.train_only):
        raise RunFolderError(f"train_only names parameter-name prefixes separated by commas, got {tc.train_only!r}")
    if tc.train_only:  # the preset's parameter names (a model on the meta device: no memory)
        with torch.device("meta"):
            trainable_names(LavidaForMaskedDiffusion(LavidaConfig(**{**PRESETS[tc.preset], **tc.model_overrides})), tc)


def _check_task_weights(weights: object) -> None:
    if not isinstance(weights, dict) or not weights:
        raise RunFolderError(f"tasks are a JSON object of task weights, e.g. {{\"ground\": 1, \"t2i\": 2}}; got {weights!r}")
    unknown = sorted(set(weights) - set(TASK_WEIGHTS))
    if unknown:
        raise RunFolderError(f"unknown task(s) {unknown}; expected some of {sorted(TASK_WEIGHTS)}")
    bad = {k: v for k, v in weights.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0}  # fmt: skip
    if bad:
        raise RunFolderError(f"task weights must be numbers >= 0, got {bad}")
    if not sum(weights.values()) > 0:
        raise RunFolderError(f"task weights must not all be 0, got {weights}")


def trainable_names(model, tc: TrainConfig) -> set[str]:
    """The names of `model`'s parameters that learn in a run of `tc` (`trainable`, then
    `train_only`); a `ValueError` when `train_only` leaves none."""
    if tc.trainable == "all":
        side = {n for n, _ in model.named_parameters()}
    else:
        side = set(model.text_only_parameter_names() if tc.trainable == "understanding"
                   else model.image_only_parameter_names())  # fmt: skip
    if not tc.train_only:
        return side
    learn = {n for n in side if n.startswith(train_only_prefixes(tc.train_only))}
    if not learn:
        raise RunFolderError(f"train_only={tc.train_only!r} matches none of the {tc.trainable!r} parameters "
                         f"(e.g. {', '.join(sorted(side)[:3])})")  # fmt: skip
    return learn


def train_only_prefixes(spec: str) -> tuple[str, ...]:
    """`"layers.5., lm_head"` -> `("layers.5.", "lm_head")` (`TrainConfig.train_only`)."""
    return tuple(p.strip() for p in spec.split(",") if p.strip())


def _check_data_device(name: str) -> None:
    """Refuse a data-worker device that is not one, or not here (a worker that fails to
    start is restarted by the pool forever: the run would hang instead of failing)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunFolderError(f"data_device must be a torch device such as 'cpu' or 'cuda', got {name!r}") from None
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()):
        raise RunFolderError(f"data_device {name!r}: no {device.type} device is available here")


def _portable(obj, convert):
    """`obj` with every tensor (or, with `convert=torch.from_numpy`, every array) converted,
    through tuples, lists, dicts and `Batch` fields."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return convert(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_portable(o, convert) for o in obj)
    if isinstance(obj, dict):
        return {k: _portable(v, convert) for k, v in obj.items()}
    if isinstance(obj, Batch):
        return Batch(*(_portable(getattr(obj, f.name), convert) for f in fields(Batch)))
    return obj


class _Prefetcher:
    """`step_data` of steps `first..last-1` built `ahead` steps in advance by `workers` processes."""

    def __init__(self, workers: int, init_args: tuple, first: int, last: int, ahead: int | None = None):
        import multiprocessing

        self.pool = multiprocessing.get_context("spawn").Pool(workers, _worker_init, init_args)
        self.pending: dict = {}
        self.next, self.last, self.ahead = first, last, ahead or 4 * workers

    def get(self, step: int):
        while self.next < min(self.last, step + self.ahead):
            self.pending[self.next] = self.pool.apply_async(_worker_step, (self.next,))
            self.next += 1
        items, aux = self.pending.pop(step).get()
        return _portable(items, torch.from_numpy), None if aux is None else (torch.from_numpy(aux[0]), aux[1])

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


class _Ranks:
    """This process's place in a `torchrun` data-parallel run; rank 0 of 1 outside one.

    Each rank draws every step's batches (`step_data`) and trains on every `world`-th;
    `sum_grads` adds the ranks' gradients, so every rank takes the same optimizer step as
    one process training on all of them would. Rank 0 alone writes (checkpoints, metrics,
    the tokenizer, the own-drawing pool, the export). Backend: NCCL on CUDA, Gloo on CPU.
    """

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.on = dist.is_available() and dist.is_torchelastic_launched()
        self.owns_group = self.on and not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if self.on else (0, 1)
        self.main = self.rank == 0

    def barrier(self) -> None:
        if self.on:
            self.dist.barrier()

    def broadcast(self, *modules) -> None:
        if self.on:
            for module in filter(None, modules):
                for t in module.state_dict().values():
                    self.dist.broadcast(t, 0)

    def sum_grads(self, params: list) -> None:
        """Sum each parameter's gradient over the ranks; one that no rank has stays None
        (AdamW then skips it, as in a single process)."""
        if not self.on or not params:
            return
        has = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        self.dist.all_reduce(has)
        self.dist.all_reduce(flat)
        offset = 0
        for p, h in zip(params, has.tolist()):
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone() if h else None
            offset += n

    def gather(self, obj) -> list:
        if not self.on:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group:
            self.dist.destroy_process_group()


def _merge(windows: list[dict]) -> dict:
    """Per-task loss lists of several ranks, joined."""
    merged: dict[str, list[float]] = {}
    for w in windows:
        for k, v in w.items():
            merged.setdefault(k, []).extend(v)
    return merged


# What a resume may change: where the run lives and how often it reports, the hardware it
# runs on, and `steps` (the cosine schedule re-targets, with a warning). `vq` is compared
# by content (`_same_files`).
RESUMABLE_CHANGES = ("out", "vq", "steps", "log_every", "eval_every", "eval_rows", "save_every", "data_workers",
                     "data_device", "precision")  # fmt: skip


def train(tc: TrainConfig, *, progress: bool = True, device: str | None = None) -> dict | None:
    """Train (or resume) a model; writes checkpoints, `metrics.jsonl` and a final export.

    `tc.out` holds one run: a second call on it resumes from its `state.pt` and must be the
    same run (`check_run_folder`). Returns `{"step", "export"}` (None on the other ranks of
    a data-parallel run, which write nothing).
    """
    from tqdm import tqdm

    from .modeling_vq import VQImageTokenizer

    check_run_knobs(tc)
    out = Path(tc.out)
    ckpt = out / "state.pt"
    saved = check_run_folder(tc)
    ranks = _Ranks()
    out.mkdir(parents=True, exist_ok=True)
    if device is None and torch.cuda.is_available():
        device = f"cuda:{ranks.rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    device = device or "cpu"
    device_type = torch.device(device).type
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device_type == "cuda")
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else _null()

    run_vq = out / "vq"  # the run's own copy: its resume and export do not depend on --vq's folder
    if ranks.main and saved is None:  # a fresh run: nothing of an earlier one in the folder is its own
        import shutil

        shutil.rmtree(run_vq, ignore_errors=True)
        shutil.copytree(tc.vq, run_vq)
        (out / "own_pool.npz").unlink(missing_ok=True)
    ranks.barrier()
    vq = VQImageTokenizer.from_pretrained(run_vq).to(device).eval()
    tok_dir = out / "tokenizer"
    if ranks.main and tc.init_from and not tok_dir.exists():
        import shutil

        shutil.copytree(Path(tc.init_from) / "tokenizer", tok_dir)  # the weights' own vocabulary
    if ranks.main and not tok_dir.exists():
        build_tokenizer(corpus_for_tokenizer(tc.tokenizer_corpus)).save_pretrained(tok_dir)
    ranks.barrier()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    initial = None
    if tc.init_from and saved is None:
        # A later stage of a curriculum: same tokenizer and weights, new mixture and schedule.
        source = Path(tc.init_from)
        if (source / "state.pt").exists():  # a training run folder
            initial = load_checkpoint(source / "state.pt", map_location=device, weights_only=False)["model"]
        else:  # a pipeline folder, e.g. the shipped weights (fp16 on disk)
            initial = LavidaForMaskedDiffusion.from_pretrained(source / "transformer").state_dict()
        initial = {k: v.float() for k, v in initial.items() if not (tc.reset_vision and k.startswith("vision."))}
    cfg = model_config(tc, tokenizer, vq, saved["model"] if saved is not None else initial, exact=saved is not None)
    torch.manual_seed(tc.seed)
    model = LavidaForMaskedDiffusion(cfg).to(device).train()
    # Two groups: the vision encoder learns at `vision_lr_scale` x the rate (Lavida-O trains
    # SigLIP at 2e-6 under a 5e-6 LLM, FACTS §3.6), so stage-0 features stay.
    learn = trainable_names(model, tc)
    for n, p in model.named_parameters():
        p.requires_grad_(n in learn)
    vision = [p for n, p in model.named_parameters() if n.startswith("vision.") and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("vision.") and p.requires_grad]
    groups = [{"params": rest, "lr_scale": 1.0}, {"params": vision, "lr_scale": tc.vision_lr_scale}]
    aux_head = None
    if tc.vision_aux:
        from .training_vision import VisionProbeHead

        aux_head = VisionProbeHead(cfg.hidden_size, cfg.loc_code_dim, cfg.num_loc_tokens).to(device).train()
        groups.append({"params": list(aux_head.parameters()), "lr_scale": 1.0})
    opt = torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
    step = 0
    if initial is not None:
        _load_growing(model, initial, f"weights of {tc.init_from}", also_fresh=("vision.",) if tc.reset_vision else ())
        logger.info("initialised from %s%s", tc.init_from, " (fresh vision encoder)" if tc.reset_vision else "")
    if saved is not None:
        model.load_state_dict(saved["model"])
        if len(saved["optimizer"]["param_groups"]) != len(opt.param_groups):
            raise ValueError(f"{ckpt} was written with another optimizer layout (before the vision encoder "
                             "had its own learning rate, or with another --vision-aux on/off); start a new "
                             "stage from it with --init-from instead of resuming")  # fmt: skip
        opt.load_state_dict(saved["optimizer"])
        if aux_head is not None:
            aux_head.load_state_dict(saved["vision_aux_head"])
        step = saved["step"]
        logger.info("resumed from %s at step %d", ckpt, step)
    if ranks.main:
        (out / "train_config.json").write_text(json.dumps(asdict(tc), indent=2))
        if saved is None:  # a fresh run starts a fresh log
            (out / "metrics.jsonl").unlink(missing_ok=True)
        else:  # records written after the checkpoint (the run died later) are not this run's
            truncate_metrics(out / "metrics.jsonl", step)

    pool = None
    if tc.own_critique:
        if ranks.main:
            _own_pool(out / "own_pool.npz", lambda: own_generation_pool(
                model, vq, tokenizer, tc.own_pool, tc.seed, progress=progress))  # fmt: skip
        ranks.barrier()
        pool = _own_pool(out / "own_pool.npz", None)
        logger.info("own-generation pool: %d images, %.2f judged correct", len(pool["prompts"]),
                    np.mean([v == "yes" for v in pool["verdicts"]]))  # fmt: skip
    sampler = task_sampler(tc, tokenizer, cfg, vq, pool)
    tasks = list(tc.task_weights)
    weights = np.array([tc.task_weights[t] for t in tasks], dtype=np.float64)
    weights /= weights.sum()
    log = (out / "metrics.jsonl").open("a") if ranks.main else open(os.devnull, "w")  # noqa: SIM115
    if saved is None and (initial is None or tc.reset_vision) and tc.vision_pretrain_steps > 0:
        from .training_vision import pretrain_vision

        final = pretrain_vision(model, vq, steps=tc.vision_pretrain_steps, batch_size=tc.vision_pretrain_batch,
                                seed=tc.seed, log=log, progress=progress and ranks.main)  # fmt: skip
        logger.info("vision pretraining done: %s", final)
        model.train()
        if ranks.main:
            _save_state(ckpt, model, opt, 0, aux_head)  # a resume does not redo stage 0
    ranks.broadcast(model, aux_head)  # every rank starts from rank 0's weights
    bar = tqdm(total=tc.steps, initial=step, disable=not (progress and ranks.main), desc="train", dynamic_ncols=True)
    window: dict[str, list[float]] = {}
    t0 = time.time() - (saved.get("elapsed_s", 0.0) if saved is not None else 0.0)
    # The vision-aux loss is rank 0's alone: other ranks do not draw its scenes.
    data_tc = tc if ranks.main else replace(tc, vision_aux=0.0)
    data_tc = replace(data_tc, vq=str(run_vq))
    if tc.data_workers:
        pool_path = out / "own_pool.npz" if pool is not None else None
        data = _Prefetcher(tc.data_workers, (data_tc, cfg, str(tok_dir), pool_path, tasks, weights), step, tc.steps)
    else:
        data = None
    try:
        while step < tc.steps:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, tc) * group["lr_scale"]
            opt.zero_grad(set_to_none=True)
            # `tasks_per_step` tasks share the step's token budget and one update (what a
            # data-parallel run with one task per device does), so no single task's step
            # pulls the shared weights away from the others.
            items, aux_data = data.get(step) if data else step_data(sampler, data_tc, cfg, tasks, weights, step, vq)
            # In a data-parallel run each rank takes every `world`-th batch; summing the
            # ranks' gradients gives the step's gradient of a single process.
            k = len(items)
            for task, batch, image_labels in items[ranks.rank :: ranks.world]:
                batch = batch.to(device)
                with autocast:
                    outp = model(**batch.model_inputs(), labels=batch.text_targets, eos_loss_weight=EOS_LOSS_WEIGHT,
                                 image_weights=batch.image_weights,
                                 image_labels=None if image_labels is None else image_labels.to(device))  # fmt: skip
                (outp.loss / k).backward()
                window.setdefault(task, []).append(outp.loss.item())
            if aux_head is not None and ranks.main:
                with autocast:
                    aux = _aux_loss(model, aux_head, *aux_data, head_only=step < tc.vision_aux_warmup)
                (tc.vision_aux * aux).backward()
                window.setdefault("vision_aux", []).append(aux.item())
            # The model's norm only: the aux read-out head is left out (AdamW is scale-free per
            # parameter, and stage 12 was trained this way, so its command replays).
            ranks.sum_grads([p for g in opt.param_groups for p in g["params"]])
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            step += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                window = _merge(ranks.gather(window))
                rec = {"step": step, "lr": lr_at(step - 1, tc), "grad_norm": float(gnorm),
                       "elapsed_s": round(time.time() - t0, 1),
                       **{f"loss/{k}": float(np.mean(v)) for k, v in window.items()}}  # fmt: skip
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix({k: f"{np.mean(v):.3f}" for k, v in window.items()})
                window = {}
            if ranks.main and (step % tc.eval_every == 0 or (step == tc.steps and tc.steps >= tc.eval_every)):
                ev = evaluate_loss(model, sampler, tasks, cfg, device, rows=tc.eval_rows)
                log.write(json.dumps({"step": step, **{f"eval/{k}": v for k, v in ev.items()}}) + "\n")
                log.flush()
                model.train()
            if ranks.main and (step % tc.save_every == 0 or step == tc.steps):
                _save_state(ckpt, model, opt, step, aux_head, time.time() - t0)
    finally:
        if data:
            data.close()
    bar.close()
    log.close()
    export = out / "export"
    if ranks.main:
        model.eval()
        export_pipeline(model, vq, tokenizer, export)
    ranks.close()
    return {"step": step, "export": str(export)} if ranks.main else None


def export_pipeline(model, vq, tokenizer, dest: str | Path, *, dtype: torch.dtype = torch.float16) -> Path:
    """Write a `LavidaPipeline` folder (fp16 safetensors + JSON) from trained parts."""
    from .pipeline_lavida import LavidaPipeline

    pipe = LavidaPipeline(model.to("cpu").float(), vq.to("cpu").float(), tokenizer)
    pipe.save_pretrained(dest, dtype=dtype)
    return Path(dest)


def check_run_folder(tc: TrainConfig) -> dict | None:
    """What `tc.out` holds, checked before a run writes anything (`RunFolderError`): the
    checkpoint a resume continues (None for a fresh run), which must be of the same run
    (`RESUMABLE_CHANGES` aside), at a step no later than `tc.steps`, with the same VQ
    tokenizer; `tc.init_from` must be a run or pipeline folder, `tc.vq` a tokenizer folder."""
    if not (Path(tc.vq) / "config.json").is_file():
        raise RunFolderError(f"--vq {tc.vq} is not a VQ tokenizer folder (no config.json); the shipped one is "
                             f"{TrainConfig.vq}")  # fmt: skip
    if tc.init_from:
        source = Path(tc.init_from)
        if not (source / "tokenizer").is_dir() or not (
            (source / "state.pt").is_file() or (source / "pipeline_index.json").is_file()
        ):  # fmt: skip
            raise RunFolderError(f"--init-from {tc.init_from} is neither a training run folder (state.pt, "
                                 "tokenizer/) nor a pipeline folder (pipeline_index.json, tokenizer/)")  # fmt: skip
    out = Path(tc.out)
    if not (out / "state.pt").exists():
        return None
    saved = load_checkpoint(out / "state.pt", map_location="cpu", weights_only=False)
    if (out / "train_config.json").exists():
        before = {**asdict(TrainConfig()), **json.loads((out / "train_config.json").read_text())}
        check_resume(out, before, asdict(tc), may_change=RESUMABLE_CHANGES)
        if before["steps"] != tc.steps:
            logger.warning("resuming a %d-step run as a %d-step run: the LR schedule is re-targeted",
                           before["steps"], tc.steps)  # fmt: skip
    if (out / "vq").is_dir() and not _same_files(out / "vq", Path(tc.vq)):
        raise RunFolderError(f"--vq {tc.vq} is not the VQ tokenizer {out} was trained with ({out / 'vq'}); "
                             "give that one, or another --out for a new run")  # fmt: skip
    if saved["step"] > tc.steps:
        raise RunFolderError(f"{out} is at step {saved['step']}, past --steps {tc.steps}: give at least "
                             f"{saved['step']} steps to resume it")  # fmt: skip
    return saved


def _same_files(a: Path, b: Path) -> bool:
    """Do folders `a` and `b` hold the same files, byte for byte?"""
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    if names != sorted(p.name for p in b.iterdir() if p.is_file()):
        return False
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def export_checkpoint(train_dir: str | Path, dest: str | Path) -> dict:
    """Export the latest `state.pt` of a (possibly running) training run as a pipeline
    folder, e.g. to benchmark a long run part-way. Returns `{"step", "export"}` as `train`
    does (`step`: the checkpoint's)."""
    from transformers import AutoTokenizer

    from .modeling_vq import VQImageTokenizer

    train_dir = Path(train_dir)
    missing = [f for f in ("train_config.json", "state.pt", "tokenizer") if not (train_dir / f).exists()]
    if missing:
        raise ValueError(f"{train_dir} is not a training run folder with a checkpoint (no {', '.join(missing)}); "
                         "a run writes state.pt every --save-every steps")  # fmt: skip
    if Path(dest).resolve() == train_dir.resolve():
        raise ValueError(f"export {train_dir} into another folder than the run's own")
    tc = TrainConfig(**json.loads((train_dir / "train_config.json").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(train_dir / "tokenizer")
    # the run's own copy of its tokenizer (runs before it had one name theirs in tc.vq)
    vq_dir = train_dir / "vq" if (train_dir / "vq").is_dir() else Path(tc.vq)
    if not (vq_dir / "config.json").is_file():
        raise ValueError(f"{train_dir} was trained with the VQ tokenizer {tc.vq}, which is not there (from "
                         f"{Path.cwd()}); copy it to {train_dir / 'vq'}")  # fmt: skip
    vq = VQImageTokenizer.from_pretrained(vq_dir)
    state = load_checkpoint(train_dir / "state.pt", map_location="cpu", weights_only=False)
    model = LavidaForMaskedDiffusion(model_config(tc, tokenizer, vq, state["model"]))
    model.load_state_dict(state["model"])
    logger.info("exporting step %d of %s to %s", state["step"], train_dir, dest)
    return {"step": int(state["step"]), "export": str(export_pipeline(model.eval(), vq, tokenizer, dest))}


def _load_growing(model: LavidaForMaskedDiffusion, weights: dict, what: str, also_fresh: tuple = ()) -> None:
    """Load `weights` into `model`, which may have parts they lack if those start at zero
    (`fresh_at_zero`, plus `also_fresh`); anything else missing or unexpected is an error."""
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shapes that differ: another preset or --model
        first = str(exc).strip().splitlines()[-1].strip()
        raise ValueError(f"{what} do not fit the run's architecture (--preset, --model): {first}") from None
    fresh = model.fresh_at_zero + tuple(also_fresh)
    if unexpected or any(not k.startswith(fresh) for k in missing):
        raise ValueError(f"{what} do not fit the run's architecture: missing {missing}, unexpected {unexpected}")


def _grown(pipe, config: LavidaConfig):
    """`pipe` with its model rebuilt at `config`, an architecture that only adds parts that
    start at zero (`fresh_at_zero`, e.g. `image_copy`): every output stays what it was. Its
    drawers and planners are rebuilt on the new model with their own weights."""
    from .pipeline_lavida import OWN_MODELS, LavidaPipeline, with_own_weights

    old = pipe.model
    model = LavidaForMaskedDiffusion(config).to(next(old.parameters()).dtype).eval()
    _load_growing(model, old.state_dict(), "the base model's weights")
    shared = dict(old.named_parameters())
    others = {}
    for _, attr, part in OWN_MODELS.values():
        if getattr(pipe, attr) is not None:
            own = {k: v.detach() for k, v in getattr(pipe, attr).named_parameters() if v is not shared[k]}
            others[attr] = with_own_weights(model, own, part=part)
    return LavidaPipeline(model, pipe.vq, pipe.tokenizer, defaults=pipe.defaults, **others)


def _one_sided(base: str | Path, other: str | Path, part: str):
    """Load `base` (a pipeline) and `other`'s state dict, checking that `other` is `base`
    fine-tuned on `part` alone; returns `(pipe, theirs, names of part's parameters)`."""
    from .pipeline_lavida import PARTS, LavidaPipeline

    if part not in PARTS:
        raise ValueError(f"part must be one of {tuple(PARTS)}, got {part!r}")
    pipe = LavidaPipeline.from_pretrained(base)
    tuned = LavidaPipeline.from_pretrained(other).model
    theirs = tuned.state_dict()
    mine = pipe.model.state_dict()
    grown = set(theirs) - set(mine)
    if grown and set(mine) <= set(theirs) and all(k.startswith(tuned.fresh_at_zero) for k in grown):
        # `other` grew a part that starts at zero (e.g. `image_copy`): `base` grows it too, closed
        pipe = _grown(pipe, tuned.config)
        mine = pipe.model.state_dict()
    if set(mine) != set(theirs) or any(mine[k].shape != theirs[k].shape for k in mine):
        raise ValueError(f"{other} is not of {base}'s architecture")
    model = pipe.model
    side = set(getattr(model, PARTS[part])())
    differ = sorted(k for k in mine if k not in side and not torch.equal(mine[k], theirs[k]))
    if differ:
        kept = "images" if part == "understanding" else "answers"
        raise ValueError(f"{other} differs from {base} outside the {part} parameters ({', '.join(differ[:3])}"
                         f"{', ...' if len(differ) > 3 else ''}): the result would change its {kept}")  # fmt: skip
    return pipe, theirs, side


def blend_part(base: str | Path, other: str | Path, weight: float, dest: str | Path,
               part: str = "understanding") -> Path:  # fmt: skip
    """Write `base` with one side's parameters moved `weight` of the way to `other`'s.

    `part` "understanding": the text-only parameters (`other` trained from `base` with
    `trainable="understanding"`), so the blend draws every image as `base` does;
    "generation": the image-only ones (`trainable="generation"`), so every answer, box,
    verdict and t2i plan stays `base`'s. Both are pipeline folders of one architecture whose
    other parameters are equal; `weight` 0 is `base`, 1 is `other` (in fp32, then saved fp16
    as every export). A weight average of a fine-tune and its start ("model soup") often
    keeps what the fine-tune gained and most of what it lost.

    Raises:
        ValueError: an unknown part, a weight outside [0, 1], other architectures, or
            `other` differing outside `part`.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    pipe, theirs, side = _one_sided(base, other, part)
    mine = pipe.model.state_dict()
    pipe.model.load_state_dict({k: torch.lerp(v, theirs[k], weight) if k in side else v for k, v in mine.items()})
    pipe.save_pretrained(dest)
    return Path(dest)


# kind -> its `pipeline_lavida.OWN_MODELS` key (folder, pipeline attribute, part)
ATTACH_KINDS = {"unplanned": "unplanned_drawer", "edit": "edit_drawer", "edit_regions": "edit_regions_drawer",
                "edit_plan": "edit_planner", "reader": "reader"}


def attach_weights(base: str | Path, tuned: str | Path, dest: str | Path, *, kind: str = "unplanned",
                   defaults: dict | None = None, rank: int | None = None) -> Path:  # fmt: skip
    """Write `base` with `tuned`'s own weights for one kind of work: a drawer, a planner or
    a reader.

    `tuned` is `base` fine-tuned on that work alone, with one side trainable. `kind`:
    "unplanned", `generate`'s rows without a plan (`trainable="generation"`, e.g. with
    `canonical_t2i`), as `LavidaPipeline.unplanned_model`; "edit", `edit`'s rows with
    neither a plan nor regions (the single shot; `trainable="generation"`), as `edit_model`;
    "edit_regions", `edit`'s rows with regions (the local redraws of planned and agent edits;
    `trainable="generation"` with `edit_region_mask=1`), as `edit_region_model`;
    "edit_plan", `plan_edit`'s boxes written again around the object an edit takes away
    (`trainable="understanding"` on edit-plan rows with `edit_plan_given_removed`), as
    `edit_planner`; "reader", `understand`'s captions and answers (`trainable="understanding"`
    on question and caption rows), as `reader`. Everything else (the other drawings and
    plans, answers, boxes, verdicts, another kind `base` has) stays exactly `base`'s. Adds the
    weights of that side that differ from `base`'s alone (train a few with `train_only` to
    keep them small).
    `defaults`: sampler defaults to set in `dest`'s `pipeline_index.json` beside it (e.g.
    `{"edit_planner_first_step": True}` for a planner trained on whole edit plans too).
    `rank`: keep each matrix whose change is cheaper that way as its best rank-`rank` change
    (`pipeline_lavida.low_rank_delta`, stored fp16 as `NAME.delta_up` / `NAME.delta_down`);
    the written pipeline then uses that approximation, so measure it, not `tuned`.

    Raises:
        ValueError: an unknown kind, an unknown default, a rank below 1, other
            architectures, or `tuned` differing outside its side.
    """
    from .pipeline_lavida import DEFAULTS, OWN_MODELS, apply_low_rank, low_rank_delta, with_own_weights

    if kind not in ATTACH_KINDS:
        raise ValueError(f"kind must be one of {', '.join(ATTACH_KINDS)}, got {kind!r}")
    unknown = sorted(set(defaults or {}) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown pipeline default(s) {unknown}; expected some of {sorted(DEFAULTS)}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    _, attr, part = OWN_MODELS[ATTACH_KINDS[kind]]
    pipe, theirs, side = _one_sided(base, tuned, part)
    weights = {k: theirs[k] for k in side}
    pipe.low_rank.pop(attr, None)  # `base`'s own model of this kind, replaced
    if rank is not None:
        mine = pipe.model.state_dict()
        factors = {k: low_rank_delta(mine[k], w, rank) for k, w in weights.items()
                   if w.ndim == 2 and rank * sum(w.shape) < w.numel() and not torch.equal(w, mine[k])}  # fmt: skip
        weights.update({k: apply_low_rank(mine[k], up, down) for k, (up, down) in factors.items()})
        pipe.low_rank[attr] = factors
    setattr(pipe, attr, with_own_weights(pipe.model, weights, part=part))
    pipe.defaults.update(defaults or {})
    pipe.save_pretrained(dest)
    return Path(dest)


def model_config(tc: TrainConfig, tokenizer, vq, weights: dict | None = None, *, exact: bool = True) -> LavidaConfig:
    """The run's architecture: preset + overrides + the tokenizer's ids + the VQ codebook.

    Weights keep the vision stem they were trained with (`vision_stem_of`), whatever the
    preset says.
    `exact` (resuming, exporting): weights without the location code (or the plan layout,
    the copy head or the image copy path) keep it off; otherwise
    (a new stage from older weights) the preset's zero-initialised additions are grown.
    """
    arch = {}
    stem = vision_stem_of(weights) if weights is not None else None
    if stem is not None:
        arch["vision_stem"] = stem
    if weights is not None and exact and "loc_in.weight" not in weights:
        arch["loc_code_dim"] = 0
    if weights is not None and exact and "image_embed.layout_label.weight" not in weights:
        arch["plan_layout"] = False
    if weights is not None and exact and "copy_gate.weight" not in weights:
        arch["copy_dim"] = 0
    if weights is not None and exact and "image_head.copy_gate.weight" not in weights:
        arch["image_copy"] = False
    return LavidaConfig(**{**PRESETS[tc.preset], **tc.model_overrides, **arch, **token_ids(tokenizer),
                           "codebook_size": vq.num_vq_embeddings})  # fmt: skip


def vision_stem_of(weights: dict) -> str | None:
    """The `vision_stem` a state dict was trained with (None: it has no vision encoder)."""
    if "vision.patch_embed.weight" in weights:
        return "linear"
    first = weights.get("vision.stem.0.weight")
    if first is None:
        return None
    return "conv" if first.ndim == 4 else "modulated"


def token_ids(tokenizer) -> dict[str, int]:
    """The special-token ids a `LavidaConfig` stores, read from the tokenizer."""
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        img_gen_token_id=ids("<img_gen>"), img_src_token_id=ids("<img_src>"),
        img_enc_token_id=ids("<img_enc>"), loc_token_offset=ids("<LOC_0>"),
        box_start_token_id=ids("<box_p>"), box_end_token_id=ids("</box_p>"),
        loc_begin_token_id=ids("<LOC_BEGIN>"), loc_end_token_id=ids("<LOC_END>"),
    )  # fmt: skip


def _save_state(path: Path, model, opt, step: int, aux_head=None, elapsed_s: float = 0.0) -> None:
    tmp = path.with_suffix(".tmp")
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "elapsed_s": elapsed_s}
    if aux_head is not None:
        state["vision_aux_head"] = aux_head.state_dict()
    torch.save(state, tmp)
    tmp.replace(path)


def vision_aux_data(vq, rng: np.random.Generator, n: int, patch: int) -> tuple[torch.Tensor, list[dict]]:
    """The input of `vision_aux_loss`: `n` fresh scenes' pixels (half seen through the VQ
    tokenizer, as the understanding tasks see them) and their per-patch targets."""
    scenes = [sample_scene(rng) for _ in range(n)]
    images = [render(s) for s in scenes]
    pick = [i for i in range(n) if rng.random() < RECONSTRUCT_P]
    if pick:
        with torch.no_grad():
            for i, im in zip(pick, vq_roundtrip(vq, [images[i] for i in pick], next(vq.parameters()).device)):
                images[i] = im
    return images_to_pixels(images), [patch_targets(s, patch) for s in scenes]


def vision_aux_loss(model, head, vq, rng: np.random.Generator, n: int, head_only: bool = False) -> torch.Tensor:
    """Stage 0's dense per-patch loss on `n` fresh scenes (`vision_aux_data`), for
    `TrainConfig.vision_aux`. `head_only`: the features are detached, so only `head` learns."""
    return _aux_loss(model, head, *vision_aux_data(vq, rng, n, model.config.vision_patch_size), head_only=head_only)


def _aux_loss(model, head, pixels: torch.Tensor, targets: list[dict], head_only: bool = False) -> torch.Tensor:
    from .training_vision import _stack, probe_loss

    device = next(model.parameters()).device
    feats = model.vision(pixels.to(device))
    loss, _ = probe_loss(head, feats.detach() if head_only else feats, _stack(targets, device))
    return loss


@torch.no_grad()
def evaluate_loss(model, sampler: TaskSampler, tasks: list[str], cfg, device, rows: int = 16) -> dict:
    """Loss per task on fixed held-out draws (seeded apart from training)."""
    model.eval()
    result = {}
    for i, task in enumerate(tasks):
        rng = np.random.default_rng([987654321, i])
        batch, image_labels = make_batch(sampler, task, rng, rows, cfg)
        batch = batch.to(device)
        outp = model(**batch.model_inputs(), labels=batch.text_targets, eos_loss_weight=EOS_LOSS_WEIGHT,
                     image_weights=batch.image_weights,
                     image_labels=None if image_labels is None else image_labels.to(device))  # fmt: skip
        result[task] = round(float(outp.loss), 4)
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _json_object(text: str) -> dict:
    """An argparse type: a JSON object, with the parser's own message when it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object ({{...}}), got {text!r}")
    return value


def _field_help() -> dict[str, str]:
    """Each `TrainConfig` field's comment (the lines above it, or the one beside it): the
    `--help` of its option."""
    try:
        lines = inspect.getsource(TrainConfig).splitlines()
    except (OSError, TypeError):  # no source (a frozen build): options without help
        return {}
    helps: dict[str, str] = {}
    above: list[str] = []
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("#").strip())
            continue
        name, sep, rest = text.partition(":")
        if sep and name.isidentifier() and "=" in rest:
            beside = rest.split("  # ", 1)[1] if "  # " in rest else ""
            helps[name] = " ".join(above) or beside
        above = []
    return {k: v.replace("%", "%%") for k, v in helps.items()}


def main(argv: list[str] | None = None, prog: str | None = None) -> dict | None:
    """The command line (`lavida-agent train model`): every `TrainConfig` field is an option.
    Returns `train`'s result (`python -m` prints it as JSON). Bad arguments exit with status
    2, before the run writes anything."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("\n", " "),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    helps = _field_help()
    for f in TrainConfig.__dataclass_fields__.values():
        flag, help_ = f"--{f.name.replace('_', '-')}", helps.get(f.name) or " "
        if f.name == "out":
            parser.add_argument(flag, required=True, default=argparse.SUPPRESS,
                                help="the run folder (a second run on it resumes it)")  # fmt: skip
        elif f.type in ("int", "float", "str"):
            parser.add_argument(flag, type=eval(f.type), default=f.default, help=help_)
        elif f.type == "bool":
            parser.add_argument(flag, action="store_true", help=help_)
    parser.add_argument("--model", type=_json_object, default={}, help="JSON overrides of the preset's LavidaConfig")
    parser.add_argument("--tasks", type=_json_object, default=None,
                        help='JSON task weights, e.g. \'{"ground": 1, "understand": 1}\' (default: TASK_WEIGHTS)')
    parser.add_argument("--questions", type=_json_object, default=None,
                        help='JSON weights of the question kinds, e.g. \'{"color": 3, "count": 1}\' (default: uniform)')
    parser.add_argument("--t2i-categories", type=_json_object, default=None,
                        help='JSON weights of the t2i prompt categories, e.g. \'{"color_attr": 2, "colors": 1}\' '
                             "(default: uniform)")
    parser.add_argument("--edit-categories", type=_json_object, default=None,
                        help='JSON weights of the edit categories, e.g. \'{"move": 2, "resize": 2, "add": 1}\' '
                             "(default: uniform)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (there are some only when stderr is a terminal)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    kw = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    tc = TrainConfig(**kw, model_overrides=args.model)
    if args.tasks is not None:
        tc.task_weights = dict(args.tasks)
    for flag, field_, check in (("questions", "question_weights", lang.question_kind_weights),
                                ("t2i_categories", "t2i_categories", lang.prompt_category_weights),
                                ("edit_categories", "edit_categories", lang.edit_category_weights)):  # fmt: skip
        weights = getattr(args, flag)
        if weights is None:
            continue
        try:
            check(weights)
        except (ValueError, TypeError, AttributeError) as e:
            parser.error(f"--{flag.replace('_', '-')}: {e}")
        setattr(tc, field_, dict(weights))
    try:
        return train(tc, progress=not args.quiet and sys.stderr.isatty())
    except RunFolderError as e:
        parser.error(str(e))


if __name__ == "__main__":
    result = main(prog="python -m lavida_agent.model.training")
    if result is not None:  # rank 0 of a data-parallel run alone
        print(json.dumps(result))  # noqa: T201
