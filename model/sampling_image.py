"""`ImageMaskSampler`: decode VQ codes from all-masked to all-revealed (FACTS §4.2-4.3).

Per step: draw a candidate code for every masked position from the (guided) logits at a
temperature, then reveal `counts[step]` of them, chosen either by a fixed **stratified**
order (progressive multi-jittered: the first 4^k picks hold one cell of every cell of
the 2^k x 2^k partition, so early steps place spread-out anchors) or by **confidence**
(log-probability plus annealed Gumbel noise, MMaDA-style). The number revealed per step
follows the **reversed shift schedule**: few tokens early, many late.

diffusers scheduler protocol: `set_timesteps(num_steps, ...)`, then `step(logits, index,
sample, generator=...)` returning `prev_sample` (the codes after this step) and
`pred_original_sample` (every position filled with its candidate: a cheap preview).
Every random draw uses the caller's generator(s): one `torch.Generator`, or a list with
one per row so that each request in a batch replays on its own seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ImageMaskSampler", "ImageSamplerOutput", "shift_schedule", "stratified_order"]

Generators = torch.Generator | list[torch.Generator] | None


def shift_schedule(num_tokens: int, num_steps: int, shift: float = 5.0) -> list[int]:
    """Tokens revealed per step: the reversed shift schedule of FACTS §4.2 step 4.

    t_k = k / n, sigma_k = s t_k / (1 + (s - 1) t_k); counts are the differences of
    floor(sigma_k N), at least one each, overshoot removed round-robin from entries > 1,
    then reversed so few tokens are revealed early. Sums to `num_tokens` exactly.
    """
    if num_tokens <= 0:
        return []
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    num_steps = min(num_steps, num_tokens)
    t = np.arange(num_steps + 1) / num_steps
    sigma = shift * t / (1 + (shift - 1) * t)
    cum = np.floor(sigma * num_tokens).astype(int)
    cum[-1] = num_tokens
    counts = np.maximum(np.diff(cum), 1).tolist()
    i = 0
    while sum(counts) > num_tokens:  # clamping to >= 1 can overshoot: take back round-robin
        j = i % len(counts)
        if counts[j] > 1:
            counts[j] -= 1
        i += 1
    return counts[::-1]


def stratified_order(side: int, seed: int = 42) -> np.ndarray:
    """Progressive multi-jittered order over a `side` x `side` grid (FACTS §4.3).

    Level by level, split every block into quadrants, shuffle the child blocks, and for each
    child that holds no chosen cell yet pick a random cell inside it. Returns row-major
    indices `y * side + x`, a permutation of `side * side`.
    """
    rng = np.random.default_rng(seed)
    chosen = np.zeros((side, side), dtype=bool)
    order: list[int] = []
    blocks = [(0, 0, side)]  # (y, x, size)
    while blocks:
        children = []
        for y, x, size in blocks:
            if size == 1:
                continue
            h = size // 2
            children += [(y, x, h), (y, x + h, h), (y + h, x, h), (y + h, x + h, h)]
        if not children:
            break
        rng.shuffle(children)
        for y, x, size in children:
            if not chosen[y : y + size, x : x + size].any():
                cy, cx = y + int(rng.integers(size)), x + int(rng.integers(size))
                chosen[cy, cx] = True
                order.append(cy * side + cx)
        blocks = children
    rest = [i for i in range(side * side) if not chosen.flat[i]]  # only for odd sides
    return np.array(order + rest, dtype=np.int64)


def _per_row(generator: Generators, rows: int) -> list[torch.Generator | None]:
    if isinstance(generator, list):
        if len(generator) != rows:
            raise ValueError(f"got {len(generator)} generators for a batch of {rows} rows")
        return generator
    return [generator] * rows


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) draws on the generator's own device (CPU without a generator)."""
    device = generator.device if generator is not None else "cpu"
    return torch.rand(shape, generator=generator, device=device)


@dataclass
class ImageSamplerOutput:
    """`prev_sample` (B, N): codes after the step; `pred_original_sample` (B, N): every
    masked position filled with this step's candidate (for previews)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class ImageMaskSampler:
    """Masked-token image decoding with a shift schedule, temperature and a reveal order.

    Args:
        mask_code: code id of a masked position.
        shift: schedule shift s (5 in the released configs), or one shift per row (a
            batch may mix rows drawn with and without a plan, which want different shifts).
        order: `"stratified"` (fixed spatial order) or `"confidence"` (log p + Gumbel).
        temperature: sampling temperature of candidate codes; 0 = argmax. One per row is
            allowed too (a batch may mix edits that want different temperatures); a row's
            draws are the ones it makes alone.
        confidence_temperature: Gumbel scale of the confidence order, annealed to 0.
        order_seed: seed of the fixed stratified order (42 upstream).
    """

    def __init__(
        self,
        mask_code: int,
        *,
        shift: float | Sequence[float] = 5.0,
        order: str = "stratified",
        temperature: float | Sequence[float] = 1.0,
        confidence_temperature: float = 1.0,
        order_seed: int = 42,
    ):
        if order not in ("stratified", "confidence"):
            raise ValueError(f"order must be 'stratified' or 'confidence', got {order!r}")
        temps = [temperature] if isinstance(temperature, (int, float)) else list(temperature)
        if not temps or any(t < 0 for t in temps):
            raise ValueError(f"temperature must be >= 0 (one, or one per row), got {temperature}")
        shifts = [shift] if isinstance(shift, (int, float)) else list(shift)
        if not shifts or any(not v > 0 for v in shifts):
            raise ValueError(f"shift must be > 0 (one, or one per row; 1: linear), got {shift}")
        self.mask_code = mask_code
        self.shift = shift
        self.order = order
        self.temperature = temperature
        self.confidence_temperature = confidence_temperature
        self.order_seed = order_seed
        self.counts: list[int] = []
        self.row_counts: list[list[int]] = []
        self.fixed_order: torch.Tensor | None = None

    def set_timesteps(self, num_steps: int, num_masked: int | Sequence[int], grid: int) -> None:
        """Plan the reveal counts for `num_masked` masked tokens on a `grid` x `grid` image.

        `num_masked` may list one count per row (a region edit masks only its cells), as may
        `shift`: each row then follows its own schedule, the one it would follow alone, so a
        request's image does not depend on what else shares its batch. `counts` is the
        longest schedule: the loop's steps; a row whose schedule is shorter is done before.
        """
        rows = [num_masked] if isinstance(num_masked, int) else [int(n) for n in num_masked]
        given = self.shift
        shifts = [float(given)] if isinstance(given, (int, float)) else [float(v) for v in given]
        n = max(len(rows), len(shifts))  # one count, or one shift, serves every row
        rows = rows * n if len(rows) == 1 else rows
        shifts = shifts * n if len(shifts) == 1 else shifts
        if len(shifts) != len(rows):
            raise ValueError(f"got {len(shifts)} shifts for {len(rows)} rows")
        self.row_counts = [shift_schedule(m, num_steps, s) for m, s in zip(rows, shifts)]
        self.counts = max(self.row_counts, key=len)
        self.fixed_order = torch.from_numpy(stratified_order(grid, self.order_seed))

    def _row_temperatures(self, rows: int) -> list[float]:
        given = self.temperature
        temps = [float(given)] if isinstance(given, (int, float)) else [float(t) for t in given]
        temps = temps * rows if len(temps) == 1 else temps  # one temperature serves every row
        if len(temps) != rows:
            raise ValueError(f"got {len(temps)} temperatures for a batch of {rows} rows")
        return temps

    @property
    def timesteps(self) -> list[int]:
        return list(range(len(self.counts)))

    def step(
        self,
        logits: torch.Tensor,
        step_index: int,
        sample: torch.Tensor,
        *,
        generator: Generators = None,
    ) -> ImageSamplerOutput:
        """Reveal `counts[step_index]` more codes in every row.

        Args:
            logits: `(B, N, K)` guided code logits.
            step_index: index into the schedule.
            sample: `(B, N)` current codes, `mask_code` where still masked.
            generator: one generator or one per row.
        """
        B, N, K = logits.shape
        gens = _per_row(generator, B)
        masked = sample == self.mask_code
        logits = logits.float()
        # Step 1: candidate codes for every position, one draw per row on its own generator.
        temps = self._row_temperatures(B)
        cand = logits.argmax(-1)  # temperature 0
        drawn = [b for b in range(B) if temps[b] > 0]
        if drawn:
            # Inverse-CDF sampling: one uniform per position from the row's generator, then a
            # binary search in the cumulative distribution (15x faster than multinomial here).
            t = torch.tensor([temps[b] for b in drawn], device=logits.device)[:, None, None]
            cdf = torch.softmax(logits[drawn] / t, dim=-1).cumsum(-1)  # (b, N, K)
            # Drawn where each generator lives, then moved: a seed gives the same image on
            # CPU and CUDA, and the pipeline's CPU generators work with a CUDA model.
            u = torch.stack([_uniform((N, 1), gens[b]) for b in drawn]).to(logits.device)
            cand[drawn] = torch.searchsorted(cdf, u * cdf[..., -1:]).squeeze(-1).clamp_(max=K - 1)
        x0 = torch.where(masked, cand, sample)  # revealed codes never change

        # Step 2: choose which masked positions to reveal now, on each row's own schedule.
        if len(self.row_counts) not in (1, B):
            raise ValueError(f"set_timesteps planned {len(self.row_counts)} rows, step got {B}")
        prev = sample.clone()
        for b in range(B):
            m = masked[b]
            n_masked = int(m.sum())
            if n_masked == 0:
                continue
            counts = self.row_counts[b if len(self.row_counts) == B else 0]
            k = counts[step_index] if step_index < len(counts) - 1 else N  # its last step: all
            take = min(k, n_masked)
            if self.order == "stratified":
                # the first `take` positions of the fixed order that are still masked
                order = self.fixed_order.to(m.device)
                pos = order[m[order]][:take]
            else:
                logp = torch.log_softmax(logits[b], -1).gather(-1, cand[b, :, None]).squeeze(-1)
                progress = min(1.0, step_index / max(1, len(counts) - 1))
                alpha = self.confidence_temperature * (1 - progress)
                u = _uniform((N,), gens[b]).to(logits.device).clamp_(1e-20, 1.0)
                score = logp + alpha * -torch.log(-torch.log(u))
                score = score.masked_fill(~m, -math.inf)
                pos = score.topk(take).indices
            prev[b, pos] = x0[b, pos]
        return ImageSamplerOutput(prev_sample=prev, pred_original_sample=x0)
