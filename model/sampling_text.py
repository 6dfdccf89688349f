"""`TextMaskSampler`: semi-autoregressive block decoding with low-confidence remasking.

LLaDA-style text decoding (FACTS §4.1): the answer is split into blocks decoded left to
right; inside the current block, every step draws a candidate for each masked position
(Gumbel-max at a temperature; 0 = greedy), scores it by its softmax probability, and
keeps the `k` most confident, leaving the rest masked. Positions beyond the current
block are never revealed early. Counts per step split each block's length evenly.

Same protocol as `ImageMaskSampler`: `set_timesteps`, then `step(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling_image import Generators, _per_row

__all__ = ["TextMaskSampler", "TextSamplerOutput"]


@dataclass
class TextSamplerOutput:
    prev_sample: torch.Tensor  # (B, T) tokens after the step
    pred_original_sample: torch.Tensor  # (B, T) every masked position filled


class TextMaskSampler:
    """Semi-AR block decoding of a fixed-length answer.

    Args:
        mask_token_id: the text mask id.
        block_length: tokens per block (the answer length for a single block).
        temperature: 0 = greedy; otherwise sample softmax(logits / temperature).
    """

    def __init__(self, mask_token_id: int, *, block_length: int = 16, temperature: float = 0.0):
        if block_length < 1:
            raise ValueError(f"block_length must be >= 1, got {block_length}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: the most likely token), got {temperature}")
        self.mask_token_id = mask_token_id
        self.block_length = block_length
        self.temperature = temperature
        self.plan: list[tuple[int, int, int]] = []  # (block start, block end, tokens to reveal)

    def set_timesteps(self, num_steps: int, num_tokens: int) -> None:
        """Spread `num_steps` over the blocks of a `num_tokens` answer (at least one per block)."""
        blocks = [(s, min(s + self.block_length, num_tokens)) for s in range(0, num_tokens, self.block_length)]
        per_block = max(1, num_steps // len(blocks))
        self.plan = []
        for start, end in blocks:
            n, steps = end - start, min(per_block, end - start)
            counts = [n // steps + (1 if i < n % steps else 0) for i in range(steps)]
            self.plan += [(start, end, c) for c in counts]

    @property
    def timesteps(self) -> list[int]:
        return list(range(len(self.plan)))

    def step(
        self,
        logits: torch.Tensor,
        step_index: int,
        sample: torch.Tensor,
        *,
        generator: Generators = None,
        allowed: torch.Tensor | None = None,
    ) -> TextSamplerOutput:
        """Reveal the most confident masked tokens of the current block.

        Args:
            logits: `(B, T, V)` logits at the answer positions.
            step_index: index into the plan made by `set_timesteps`.
            sample: `(B, T)` current tokens (mask id where unknown).
            generator: one generator or one per row.
            allowed: optional `(V,)` bool; tokens outside it are never produced.
        """
        B, T, V = logits.shape
        gens = _per_row(generator, B)
        logits = logits.float()
        if allowed is not None:
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
        if self.temperature == 0:
            cand = logits.argmax(-1)
        else:
            # Gumbel-max in float64 is equivalent to sampling softmax(logits / temperature).
            u = torch.stack([torch.rand(T, V, generator=gens[b], dtype=torch.float64) for b in range(B)])
            g = -torch.log(-torch.log(u.clamp_min(1e-300)))
            cand = (logits.double() / self.temperature + g.to(logits.device)).argmax(-1)
        conf = torch.softmax(logits, -1).gather(-1, cand[..., None]).squeeze(-1)
        masked = sample == self.mask_token_id
        x0 = torch.where(masked, cand, sample)

        start, end, k = self.plan[step_index]
        last_of_block = step_index + 1 == len(self.plan) or self.plan[step_index + 1][0] != start
        in_block = torch.zeros(T, dtype=torch.bool, device=sample.device)
        in_block[start:end] = True
        prev = sample.clone()
        for b in range(B):
            m = masked[b] & in_block
            n = int(m.sum())
            if n == 0:
                continue
            take = n if last_of_block else min(k, n)
            score = conf[b].masked_fill(~m, -1.0)
            pos = score.topk(take).indices
            prev[b, pos] = x0[b, pos]
        return TextSamplerOutput(prev_sample=prev, pred_original_sample=x0)
