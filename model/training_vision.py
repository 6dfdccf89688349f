"""Dense pretraining of the understanding-side vision encoder (the SigLIP analogue).

Lavida-O's understanding branch starts from a pretrained SigLIP encoder (FACTS §1.2); the
embedded model has no such encoder, and learning *what is where* only through the four
LOC tokens of a grounding answer is slow: a from-scratch run sat at the coordinate
marginal for thousands of steps (issue 4 notes). ShapesWorld knows every pixel's object,
so this stage teaches the encoder directly, before the multi-task run: for every patch
token it predicts the colour, shape and size of the object the patch belongs to (or
"none"), whether the patch holds that object's centre, the object's box (as the
location code of its four coordinates when the model has one), and the
background. The probe head is thrown away afterwards; the encoder (stem, layers and
projector) keeps features from which those facts are linearly readable.

Run as stage 0 of `training.train` (`--vision-pretrain-steps N`, on by default for
from-scratch runs), or alone from Python:

    >>> model = LavidaForMaskedDiffusion(config)
    >>> pretrain_vision(model, vq, steps=1500)
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lavida_agent.tools.shapes_world.render import render, shape_mask
from lavida_agent.tools.shapes_world.sampler import sample_scene
from lavida_agent.tools.shapes_world.scene import BACKGROUNDS, CANVAS, COLORS, SHAPES, SIZES

from .modeling_vq import tensor_to_images
from .tasks import images_to_pixels

logger = logging.getLogger(__name__)

__all__ = ["VisionProbeHead", "patch_targets", "pretrain_vision", "probe_loss"]

_COLORS, _SHAPES, _SIZES, _BACKGROUNDS = list(COLORS), list(SHAPES), list(SIZES), list(BACKGROUNDS)
MIN_PIXELS = 4  # a patch belongs to an object when it holds at least this many of its pixels


def patch_targets(scene, patch: int = 8) -> dict[str, np.ndarray]:
    """Per-patch labels of a scene, raster order over the `(CANVAS / patch)^2` patches.

    Returns int arrays `color`, `shape`, `size` (index into the palette, or -1 for a patch
    with no object), `center` (1 where the patch holds its object's centre), `box`
    (float `(T, 4)`, xyxy / CANVAS, zeros where there is no object) and `background`
    (one int for the image).
    """
    side = CANVAS // patch
    owner = np.full((CANVAS, CANVAS), -1, np.int64)
    for i, obj in enumerate(scene.objects):
        x0, y0, x1, y1 = obj.box
        owner[y0:y1, x0:x1][shape_mask(obj.shape, x1 - x0, y1 - y0)] = i
    n = len(scene.objects)
    # (side, side, n) pixel counts of each object in each patch
    counts = np.stack([(owner == i).reshape(side, patch, side, patch).sum((1, 3)) for i in range(n)]
                      or [np.zeros((side, side), np.int64)], -1)  # an empty scene: no patch has an object
    best = counts.argmax(-1).reshape(-1)
    has = counts.max(-1).reshape(-1) >= MIN_PIXELS
    T = side * side
    color, shape, size = (np.full(T, -1, np.int64) for _ in range(3))
    center, box = np.zeros(T, np.int64), np.zeros((T, 4), np.float32)
    for t in np.nonzero(has)[0]:
        obj = scene.objects[best[t]]
        color[t], shape[t], size[t] = _COLORS.index(obj.color), _SHAPES.index(obj.shape), _SIZES.index(obj.size)
        box[t] = np.asarray(obj.box, np.float32) / CANVAS
        cx, cy = obj.center
        center[t] = int(int(cy) // patch * side + int(cx) // patch == t)
    return {"color": color, "shape": shape, "size": size, "center": center, "box": box,
            "background": np.int64(_BACKGROUNDS.index(scene.background))}  # fmt: skip


class VisionProbeHead(nn.Module):
    """Linear read-outs of the per-patch labels from the projected vision features."""

    def __init__(self, hidden_size: int, loc_code_dim: int = 0, span: int = CANVAS + 1):
        super().__init__()
        self.loc_code_dim, self.span = loc_code_dim, span
        self.color = nn.Linear(hidden_size, len(_COLORS) + 1)  # + "no object"
        self.shape = nn.Linear(hidden_size, len(_SHAPES) + 1)
        self.size = nn.Linear(hidden_size, len(_SIZES) + 1)
        self.center = nn.Linear(hidden_size, 2)
        # the box as 4 coordinates, or (with a location code) as the 4 coordinates' codes:
        # the code the `<LOC_i>` tokens carry, so grounding can copy it to a peak
        self.box = nn.Linear(hidden_size, 4 * (loc_code_dim or 1))
        self.background = nn.Linear(hidden_size, len(_BACKGROUNDS))

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name)(feats) for name in ("color", "shape", "size", "center", "box", "background")}


def _stack(targets: list[dict[str, np.ndarray]], device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([t[k] for t in targets])).to(device) for k in targets[0]}


def probe_loss(head: VisionProbeHead, feats: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Sum of the per-patch losses; returns it and the parts (floats) for logging.

    `feats` is `(V, T, d)`; class labels of -1 ("no object") become the extra last class.
    """
    out = head(feats)
    parts = {}
    for name in ("color", "shape", "size"):
        labels = targets[name].clone()
        labels[labels < 0] = out[name].shape[-1] - 1
        parts[name] = F.cross_entropy(out[name].flatten(0, 1), labels.flatten())
    parts["center"] = F.cross_entropy(out["center"].flatten(0, 1), targets["center"].flatten())
    parts["background"] = F.cross_entropy(out["background"].mean(1), targets["background"])
    owned = targets["color"] >= 0
    if not owned.any():
        parts["box"] = feats.sum() * 0
    elif head.loc_code_dim:  # mean squared error on the unit-RMS codes of x0, y0, x1, y1
        from .modeling_lavida import coordinate_code

        code = coordinate_code(targets["box"][owned] * CANVAS, head.loc_code_dim, head.span).flatten(1)
        parts["box"] = 4 * ((out["box"][owned] - code) ** 2).mean()
    else:  # L1 on the box in canvas units x 10 (~ the scale of a CE term early on)
        parts["box"] = 10 * (out["box"][owned] - targets["box"][owned]).abs().mean()
    loss = sum(parts.values())
    return loss, {k: float(v.detach()) for k, v in parts.items()}


@torch.no_grad()
def vq_roundtrip(vq, images: list[np.ndarray], device) -> list[np.ndarray]:
    """`images` as the VQ tokenizer gives them back: `decode(encode(image))`."""
    pixels = images_to_pixels(images).to(device)
    return tensor_to_images(vq.decode(vq.encode(pixels).codes))


def pretrain_vision(
    model,
    vq,
    *,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 2e-3,
    warmup: int = 50,
    seed: int = 0,
    reconstruct_p: float = 0.5,
    log=None,
    progress: bool = True,
) -> dict[str, float]:
    """Train `model.vision` (stem, layers, projector) on dense ShapesWorld labels.

    The scenes of step `s` come from `np.random.default_rng([seed, 0x5EE, s])`, apart from
    the main run's draws. Half the images (`reconstruct_p`) go through the VQ tokenizer
    first, as in the understanding tasks. Writes a `{"vision_step", "vision/..."}` record to
    `log` (a text file) every 50 steps and returns the last window's mean losses.
    """
    from tqdm import tqdm

    vision = model.vision
    device = next(vision.parameters()).device
    vq_device = next(vq.parameters()).device
    cfg = model.config
    head = VisionProbeHead(cfg.hidden_size, cfg.loc_code_dim, cfg.num_loc_tokens).to(device)
    params = list(vision.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    patch = model.config.vision_patch_size
    vision.train()
    window: dict[str, list[float]] = {}
    t0 = time.time()
    for step in tqdm(range(steps), disable=not progress, desc="vision", dynamic_ncols=True):
        rng = np.random.default_rng([seed, 0x5EE, step])
        scenes = [sample_scene(rng) for _ in range(batch_size)]
        images = [render(s) for s in scenes]
        pick = [i for i in range(batch_size) if rng.random() < reconstruct_p]
        if pick:
            for i, im in zip(pick, vq_roundtrip(vq, [images[i] for i in pick], vq_device)):
                images[i] = im
        targets = _stack([patch_targets(s, patch) for s in scenes], device)
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        feats = vision(images_to_pixels(images).to(device))
        loss, parts = probe_loss(head, feats, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for k, v in parts.items():
            window.setdefault(k, []).append(v)
        if (step + 1) % 50 == 0 or step + 1 == steps:
            means = {k: round(float(np.mean(v)), 4) for k, v in window.items()}
            if log is not None:
                log.write(json.dumps({"vision_step": step + 1, "elapsed_s": round(time.time() - t0, 1),
                                      **{f"vision/{k}": v for k, v in means.items()}}) + "\n")  # fmt: skip
                log.flush()
            if step + 1 < steps:
                window = {}
    return {k: round(float(np.mean(v)), 4) for k, v in window.items()}
