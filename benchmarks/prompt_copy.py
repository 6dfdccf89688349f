"""Does the model read the prompt's words when it plans? A teacher-forced diagnostic.

    python -m lavida_agent.benchmarks.prompt_copy [--model-path DIR]

For each of the 24 one-object prompts `a COLOUR SHAPE` (`an orange ...`), one forward pass with the whole
plan slot masked (exactly what `LavidaPipeline.plan` sees at its first step). Reported: the
mean probability the model puts on the prompt's colour at the first plan item's colour
slot, and on its shape at the shape slot. Chance is 1/6 and 1/4: a model at chance plans
`large yellow diamond` for "a triangle" — it draws what is common, not what was asked.

This is not a quality score (the `quality` benchmark's `plan_correct` is, judged by the
checker); it says *why* planning and prompt-following generation fail, and it moves long
before the sampled plans do, so it is cheap to track during training (one forward, ~1 s).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from lavida_agent.model.tasks import build_t2i, plan_text
from lavida_agent.model.training import pack
from lavida_agent.tools.shapes_world.language import article
from lavida_agent.tools.shapes_world.scene import COLORS, SHAPES

__all__ = ["plan_slots", "prompt_copy"]


def plan_slots(tokenizer: Any) -> tuple[int, int]:
    """Offsets of the first plan item's colour and shape tokens inside the plan slot."""
    colour, shape = next(iter(COLORS)), SHAPES[0]
    ids = tokenizer(plan_text([(f"small {colour} {shape}", (8, 8, 24, 24))]),
                    add_special_tokens=False)["input_ids"]  # fmt: skip
    return ids.index(tokenizer.convert_tokens_to_ids(colour)), ids.index(tokenizer.convert_tokens_to_ids(shape))


@torch.no_grad()
def prompt_copy(pipeline: Any) -> dict[str, float]:
    """`{"p_colour", "p_shape", "chance_colour", "chance_shape", "n"}` for `pipeline`'s model."""
    model, tok = pipeline.model, pipeline.tokenizer
    cfg = model.config
    pairs = [(c, s) for c in COLORS for s in SHAPES]  # COLORS: name -> RGB
    examples = [build_t2i(tok, cfg, f"{article(c)} {c} {s}", with_plan=True, with_image=False) for c, s in pairs]
    batch = pack(examples, cfg).to(next(model.parameters()).device)
    inputs = batch.model_inputs()
    logits = model(**inputs).text_logits.float()
    colour_at, shape_at = plan_slots(tok)
    p_colour, p_shape = [], []
    for row, (colour, shape) in enumerate(pairs):
        slot = (inputs["input_ids"][row] == cfg.mask_token_id).nonzero().squeeze(-1)
        probs = torch.softmax(logits[row, slot], dim=-1)
        p_colour.append(float(probs[colour_at, tok.convert_tokens_to_ids(colour)]))
        p_shape.append(float(probs[shape_at, tok.convert_tokens_to_ids(shape)]))
    return {"p_colour": round(sum(p_colour) / len(pairs), 4), "p_shape": round(sum(p_shape) / len(pairs), 4),
            "chance_colour": round(1 / len(COLORS), 4), "chance_shape": round(1 / len(SHAPES), 4),
            "n": len(pairs)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default=None, help="pipeline folder (default: the embedded weights)")
    args = parser.parse_args(argv)
    from lavida_agent.model.pipeline_lavida import LavidaPipeline

    print(json.dumps(prompt_copy(LavidaPipeline.from_pretrained(args.model_path))))


if __name__ == "__main__":
    main()
