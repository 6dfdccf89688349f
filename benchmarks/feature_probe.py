"""Which features reach the transformer? Linear probes of the object under each patch.

    python -m lavida_agent.benchmarks.feature_probe [--model-path DIR] [--scenes 120]

`--scenes` held-out scenes (`sample_scene`, rng seed 5) go through the understanding path
as the questions see them (`describe the image.`, one forward). At every patch that holds
an object (`training_vision.patch_targets`), the object's colour and shape are read back
by an L2-regularised logistic regression (L-BFGS, standardised features; trained on 70% of
the patches, scored on the other 30%) from: the raw patch pixels (the ceiling), the conv
stem's cell, the vision encoder's output (what the transformer receives) and each
transformer layer's output at that patch. Chance is 1/6 (colour) and 1/4 (shape).

Why: a model cannot answer `what color is the circle?` or ground `the red object` from
features that lost colour. After stages 9-11 the stem read colour at chance while shape
survived, which no loss curve showed (stage 0's dense loss had taken both to ~0.99).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lavida_agent.model.tasks import build_understand, pack
from lavida_agent.model.training_vision import patch_targets
from lavida_agent.tools.shapes_world.render import render
from lavida_agent.tools.shapes_world.sampler import sample_scene

__all__ = ["feature_probe", "linear_probe"]


def linear_probe(x: torch.Tensor, y: torch.Tensor, *, train_share: float = 0.7, l2: float = 1e-3) -> float:
    """Held-out accuracy of a multinomial logistic regression of labels `y` (N,) on `x` (N, D)."""
    n_train = int(len(y) * train_share)
    x = x.float()
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-5
    x = (x - mean) / std
    k = int(y.max()) + 1
    w = torch.zeros(x.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x[:n_train] @ w + b, y[:n_train]) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((x[n_train:] @ w + b).argmax(1) == y[n_train:]).float().mean())


@torch.no_grad()
def _features(pipeline: Any, scenes: list) -> dict[str, torch.Tensor]:
    """Per patch `(n_scenes * T, d)` features of each stage, raster order per image."""
    model, cfg = pipeline.model, pipeline.config
    batch = pack([build_understand(pipeline.tokenizer, cfg, render(s), "describe the image.") for s in scenes], cfg)
    batch = batch.to(next(model.parameters()).device)
    grabbed: dict[str, torch.Tensor] = {}
    hooks = [model.vision.register_forward_hook(lambda m, i, o: grabbed.__setitem__("encoder", o))]
    if hasattr(model.vision, "stem"):
        hooks.append(model.vision.stem.register_forward_hook(lambda m, i, o: grabbed.__setitem__("stem", o)))
    for k, layer in enumerate(model.layers):
        hooks.append(layer.register_forward_hook(lambda m, i, o, k=k: grabbed.__setitem__(f"layer_{k}", o[0])))
    try:
        model(**batch.model_inputs())
    finally:
        for h in hooks:
            h.remove()
    ids = batch.input_ids
    enc = (ids == cfg.img_enc_token_id).reshape(-1)
    gen = (ids == cfg.img_gen_token_id) | (ids == cfg.img_src_token_id)
    und = ~gen.reshape(-1)
    p = cfg.vision_patch_size
    pixels = batch.pixel_values.unfold(2, p, p).unfold(3, p, p)  # (V, 3, S, S, p, p)
    out = {"pixels": pixels.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * p * p)}
    if "stem" in grabbed:
        s = grabbed["stem"]  # conv: (V, C, S, S); a patch MLP: (V, T, C)
        out["stem"] = s.flatten(2).transpose(1, 2).reshape(-1, s.shape[1]) if s.dim() == 4 else s.reshape(-1, s.shape[-1])
    out["encoder"] = grabbed["encoder"].reshape(-1, grabbed["encoder"].shape[-1])
    for k in range(len(model.layers)):
        h = grabbed[f"layer_{k}"]  # und rows in sequence order
        out[f"layer_{k}"] = h[enc[und]]
    return {k: v.cpu() for k, v in out.items()}


def feature_probe(pipeline: Any, n_scenes: int = 120, seed: int = 5) -> dict[str, Any]:
    """`{"colour": {stage: acc}, "shape": {stage: acc}, "n_patches", "chance"}`."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n_scenes)]
    feats = _features(pipeline, scenes)
    targets = [patch_targets(s, pipeline.config.vision_patch_size) for s in scenes]
    colour = torch.from_numpy(np.concatenate([t["color"] for t in targets]))
    shape = torch.from_numpy(np.concatenate([t["shape"] for t in targets]))
    has = colour >= 0
    result: dict[str, Any] = {"n_patches": int(has.sum()), "chance": {"colour": round(1 / 6, 4), "shape": 0.25}}
    for name, y in (("colour", colour), ("shape", shape)):
        result[name] = {stage: round(linear_probe(x[has], y[has]), 3) for stage, x in feats.items()}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lavida_agent.benchmarks.feature_probe",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--model-path", default=None, help="pipeline folder (default: the embedded weights)")
    parser.add_argument("--scenes", type=int, default=120, help="held-out scenes probed (default 120)")
    args = parser.parse_args(argv)
    from lavida_agent.model.pipeline_lavida import LavidaPipeline

    print(json.dumps(feature_probe(LavidaPipeline.from_pretrained(args.model_path), args.scenes)))


if __name__ == "__main__":
    main()
