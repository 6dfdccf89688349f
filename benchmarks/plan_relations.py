"""Does the planner place an object by the prompt's relation and by the other object?

    python -m lavida_agent.benchmarks.plan_relations [--model-path DIR]

**Sampled plans** (`sampled_holds`, `sampled_separation_px`): `LavidaPipeline.plan` on 48
prompts `a COLOUR SHAPE REL a COLOUR SHAPE` (12 per relation REL: left of, right of, above,
below); the share whose first planned centre lies on the relation's side of the second,
and the mean signed distance between the centres along the relation's axis (positive =
the right side).

**Teacher-forced** (one forward): for `a red circle REL a blue square` and `a green
triangle REL a yellow diamond`, the plan is given whole except the first object's four
coordinates, which are masked; the second object's box is one of four, a little off the
centre (left, right, up or down), so every relation has room. From the model's
distribution over each masked coordinate, the expected centre of the first object:

* `relation_shift_px`: how far the first object's expected centre moves the way the
  relation says, between opposite relations (`right of` minus `left of` along x, `below`
  minus `above` along y; mean over partner boxes). Large and positive when the planner reads
  the relation; 0 when it ignores it.
* `partner_shift_px`: how far it moves along the relation's axis when the second object
  moves from one side of the canvas to the other (mean over relations). Positive when the
  planner places the first object with respect to the second; 0 when each box is drawn from
  its own marginal.
* `relation_holds`: the fraction of (relation, partner box) pairs whose expected centre is
  on the relation's side of the partner's centre (0.5 by chance placement).

Like `prompt_copy`, not a quality score (the `quality` benchmark's `plan_correct` is): it
says *why* position prompts fail (a few seconds on CPU).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from lavida_agent.model.tasks import build_t2i
from lavida_agent.model.training import pack
from lavida_agent.tools.shapes_world.language import article
from lavida_agent.tools.shapes_world.scene import COLORS, SHAPES

__all__ = ["expected_coordinates", "plan_relations", "sampled_relations"]

RELATIONS = ("left of", "right of", "above", "below")
PAIRS = (("red circle", "blue square"), ("green triangle", "yellow diamond"))
# the second object's box: on the left, right, top, bottom of the 64 px canvas
PARTNERS = {"left": (14, 22, 34, 42), "right": (30, 22, 50, 42), "top": (22, 14, 42, 34), "bottom": (22, 30, 42, 50)}
AXIS = {"left of": 0, "right of": 0, "above": 1, "below": 1}
SIGN = {"left of": -1, "right of": 1, "above": -1, "below": 1}  # where the first object lies


def expected_coordinates(logits: torch.Tensor, loc_token_offset: int, num_loc_tokens: int) -> torch.Tensor:
    """`(..., V)` logits at coordinate slots -> the expected coordinate `(...)` under the
    model's distribution restricted to the `<LOC_i>` tokens."""
    loc = logits[..., loc_token_offset : loc_token_offset + num_loc_tokens].float()
    values = torch.arange(num_loc_tokens, dtype=loc.dtype, device=loc.device)
    return (torch.softmax(loc, -1) * values).sum(-1)


def sampled_relations(pipeline: Any, per_relation: int = 12) -> dict[str, Any]:
    """Plan `per_relation` prompts per relation; `{"sampled_holds", "sampled_separation_px", ...}`."""
    colours, shapes = list(COLORS), list(SHAPES)
    prompts, rels = [], []
    for r, rel in enumerate(RELATIONS):
        for i in range(per_relation):
            k = r * per_relation + i  # a fixed spread of colour and shape pairs
            c0, c1 = colours[k % len(colours)], colours[(k + 1 + k // len(colours)) % len(colours)]
            s0, s1 = shapes[k % len(shapes)], shapes[(k // len(shapes) + 1 + k) % len(shapes)]
            prompts.append(f"{article(c0)} {c0} {s0} {rel} {article(c1)} {c1} {s1}")
            rels.append(rel)
    plans = pipeline.plan(prompts, seed=list(range(len(prompts)))).plans
    holds, separation = [], []
    for rel, plan in zip(rels, plans, strict=True):
        if len(plan) < 2:
            holds.append(False)
            continue
        (_, a), (_, b) = plan[0], plan[1]
        axis = AXIS[rel]
        d = SIGN[rel] * ((a[axis] + a[axis + 2]) - (b[axis] + b[axis + 2])) / 2
        holds.append(d > 0)
        separation.append(d)
    return {"sampled_holds": round(sum(holds) / len(holds), 4),
            "sampled_separation_px": round(sum(separation) / max(1, len(separation)), 2),
            "n_sampled": len(prompts)}  # fmt: skip


@torch.no_grad()
def plan_relations(pipeline: Any, *, sampled: bool = True) -> dict[str, Any]:
    """`{"relation_shift_px", "partner_shift_px", "relation_holds", "n", "centres"}`, and
    with `sampled` the keys of `sampled_relations`."""
    model, tok = pipeline.model, pipeline.tokenizer
    cfg = model.config
    scale = cfg.image_size / (cfg.num_loc_tokens - 1)  # bins -> pixels
    cases = [(a, b, rel, side) for a, b in PAIRS for rel in RELATIONS for side in PARTNERS]
    examples = [
        build_t2i(tok, cfg, f"a {a} {rel} a {b}", with_image=False, plan_is_target=True,
                  plan=[(f"large {a}", (20, 20, 40, 40)), (f"large {b}", PARTNERS[side])])
        for a, b, rel, side in cases
    ]  # fmt: skip
    batch = pack(examples, cfg).to(next(model.parameters()).device)
    inputs = batch.model_inputs()
    ids = inputs["input_ids"].clone()
    first = (ids == cfg.loc_begin_token_id).int().argmax(1)  # the first item's <LOC_BEGIN>
    slots = first[:, None] + torch.arange(1, 5, device=ids.device)  # its x0 y0 x1 y1
    ids.scatter_(1, slots, cfg.mask_token_id)
    logits = model(**{**inputs, "input_ids": ids}).text_logits
    coords = expected_coordinates(logits.gather(1, slots[..., None].expand(-1, -1, logits.shape[-1])),
                                  cfg.loc_token_offset, cfg.num_loc_tokens) * scale  # (n, 4) px  # fmt: skip
    centre = {case: ((c[0] + c[2]) / 2, (c[1] + c[3]) / 2) for case, c in zip(cases, coords.tolist())}

    def mean(xs: list[float]) -> float:
        return round(sum(xs) / len(xs), 2)

    relation_shift = [
        centre[(a, b, hi, side)][AXIS[hi]] - centre[(a, b, lo, side)][AXIS[lo]]
        for a, b in PAIRS for lo, hi in (("left of", "right of"), ("above", "below")) for side in PARTNERS
    ]  # fmt: skip
    partner_shift = [
        centre[(a, b, rel, far)][AXIS[rel]] - centre[(a, b, rel, near)][AXIS[rel]]
        for a, b in PAIRS for rel in RELATIONS
        for near, far in ((("left", "right"),) if AXIS[rel] == 0 else (("top", "bottom"),))
    ]  # fmt: skip
    holds = []
    for (a, b, rel, side), c in centre.items():
        box = PARTNERS[side]
        partner = (box[AXIS[rel]] + box[AXIS[rel] + 2]) / 2
        holds.append(SIGN[rel] * (c[AXIS[rel]] - partner) > 0)
    return {
        **(sampled_relations(pipeline) if sampled else {}),
        "relation_shift_px": mean(relation_shift),
        "partner_shift_px": mean(partner_shift),
        "relation_holds": round(sum(holds) / len(holds), 4),
        "n": len(cases),
        "centres": {f"{rel} | partner {side}": [round(v, 1) for v in centre[(PAIRS[0][0], PAIRS[0][1], rel, side)]]
                    for rel in RELATIONS for side in PARTNERS},  # fmt: skip
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default=None, help="pipeline folder (default: the embedded weights)")
    args = parser.parse_args(argv)
    from lavida_agent.model.pipeline_lavida import LavidaPipeline

    print(json.dumps(plan_relations(LavidaPipeline.from_pretrained(args.model_path)), indent=1))


if __name__ == "__main__":
    main()
