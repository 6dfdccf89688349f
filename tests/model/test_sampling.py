"""Sampler invariants (MaskGIT parallel_decode comments, FACTS §4.1-4.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lavida_agent.model.sampling_image import ImageMaskSampler, shift_schedule, stratified_order
from lavida_agent.model.sampling_text import TextMaskSampler

MASK = 99


@pytest.mark.parametrize("n, steps, shift", [(256, 16, 5.0), (256, 64, 5.0), (37, 8, 3.0), (5, 16, 5.0), (1024, 20, 7.0)])
def test_shift_schedule_sums_to_token_count_and_grows(n, steps, shift):
    counts = shift_schedule(n, steps, shift)
    assert sum(counts) == n
    assert all(c >= 1 for c in counts)
    assert len(counts) == min(n, steps)
    assert counts[0] <= counts[-1]  # reversed: few early, many late


def test_stratified_order_is_progressive():
    side = 16
    order = stratified_order(side)
    assert sorted(order.tolist()) == list(range(side * side))
    for k in range(1, 5):  # the first 4^k picks hold one cell of every cell of the 2^k grid
        cell = side >> k
        picks = order[: 4**k]
        cells = {(int(p) // side // cell, int(p) % side // cell) for p in picks}
        assert len(cells) == 4**k


def _run_image(sampler, logits_fn, B=2, N=64, steps=8, generator=None):
    sampler.set_timesteps(steps, N, int(N**0.5))
    sample = torch.full((B, N), MASK)
    history = [sample]
    for i in sampler.timesteps:
        sample = sampler.step(logits_fn(sample), i, sample, generator=generator).prev_sample
        history.append(sample)
    return history


@pytest.mark.parametrize("order", ["stratified", "confidence"])
def test_image_sampler_invariants(order):
    g = torch.Generator().manual_seed(0)
    fixed_logits = torch.randn(2, 64, 32, generator=g)
    sampler = ImageMaskSampler(MASK, order=order, temperature=1.0)
    hist = _run_image(sampler, lambda s: fixed_logits, generator=torch.Generator().manual_seed(1))
    masked = [int((h == MASK).sum()) for h in hist]
    assert masked[-1] == 0  # everything revealed at the end
    assert all(a > b for a, b in zip(masked, masked[1:]))  # at least one token per step per row
    for before, after in zip(hist, hist[1:]):
        revealed = before != MASK
        assert torch.equal(after[revealed], before[revealed])  # revealed tokens never change
    counts = [int(((a != MASK) & (b == MASK)).sum()) // 2 for b, a in zip(hist, hist[1:])]
    assert counts == sampler.counts  # the schedule is followed exactly


@pytest.mark.parametrize("order", ["stratified", "confidence"])
def test_a_partly_masked_row_decodes_the_same_alone_and_beside_a_fully_masked_one(order):
    """A region edit masks only some cells; its row keeps its own schedule in any batch."""
    N, K = 64, 32
    logits = torch.randn(2, N, K, generator=torch.Generator().manual_seed(0))
    start = torch.arange(N) % K
    start[torch.arange(N) % 3 == 0] = MASK  # a region: 22 masked cells
    full = torch.full((N,), MASK)

    def run(rows, seeds):
        sample = torch.stack(rows)
        sampler = ImageMaskSampler(MASK, order=order, temperature=1.0)
        sampler.set_timesteps(8, (sample == MASK).sum(1).tolist(), int(N**0.5))
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        for i in sampler.timesteps:
            sample = sampler.step(logits[: len(rows)], i, sample, generator=gens).prev_sample
        return sample

    alone = run([start], [5])[0]
    together = run([start, full], [5, 6])
    assert torch.equal(together[0], alone) and not (together == MASK).any()
    assert torch.equal(alone[start != MASK], start[start != MASK])


def test_each_row_draws_at_its_own_temperature_whatever_its_batch():
    """A background edit (a low temperature) and other edits (temperature 1, or greedy)
    share a batch: each row gets the codes it gets alone, on its own generator."""
    N, K = 64, 32
    logits = torch.randn(3, N, K, generator=torch.Generator().manual_seed(0))

    def run(rows, temperature, seeds):
        sample = torch.full((len(rows), N), MASK)
        sampler = ImageMaskSampler(MASK, temperature=temperature)
        sampler.set_timesteps(8, N, int(N**0.5))
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        for i in sampler.timesteps:
            sample = sampler.step(logits[rows], i, sample, generator=gens).prev_sample
        return sample

    together = run([0, 1, 2], [1.0, 0.0, 0.5], [3, 4, 5])
    for row, (t, seed) in enumerate([(1.0, 3), (0.0, 4), (0.5, 5)]):
        assert torch.equal(together[row], run([row], t, [seed])[0])
    assert torch.equal(together[1], logits[1].argmax(-1))  # temperature 0 = greedy
    # a lower temperature draws the most likely code more often
    assert (together[2] == logits[2].argmax(-1)).sum() > (together[0] == logits[0].argmax(-1)).sum()
    with pytest.raises(ValueError, match="3 rows"):
        run([0, 1, 2], [1.0, 0.5], [3, 4, 5])


def test_each_row_follows_its_own_shift_whatever_its_batch():
    """t2i rows with and without a plan share a batch but not a shift."""
    N, K = 64, 32
    logits = torch.randn(1, N, K, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1)

    def run(shift, seeds):
        sample = torch.full((len(seeds), N), MASK)
        sampler = ImageMaskSampler(MASK, shift=shift)
        sampler.set_timesteps(8, N, int(N**0.5))
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        revealed = []
        for i in sampler.timesteps:
            nxt = sampler.step(logits[: len(seeds)], i, sample, generator=gens).prev_sample
            revealed.append(((sample == MASK) & (nxt != MASK)).sum(1).tolist())
            sample = nxt
        return sample, [list(r) for r in zip(*revealed)]

    pair, counts = run([5.0, 10.0], [3, 4])
    assert counts == [shift_schedule(N, 8, 5.0), shift_schedule(N, 8, 10.0)]
    assert counts[0] != counts[1]  # the larger shift reveals fewer codes early
    assert torch.equal(pair[0], run(5.0, [3])[0][0])
    assert torch.equal(pair[1], run([10.0], [4])[0][0])
    with pytest.raises(ValueError, match="3 shifts for 2 rows"):
        ImageMaskSampler(MASK, shift=[5.0, 5.0, 5.0]).set_timesteps(8, [N, N], 8)


def test_same_seed_same_output_even_after_disturbing_global_rng():
    logits = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(0))
    sampler = ImageMaskSampler(MASK, order="confidence")
    a = _run_image(sampler, lambda s: logits, generator=torch.Generator().manual_seed(7))[-1]
    torch.manual_seed(12345)
    torch.rand(100)
    np.random.seed(3)
    b = _run_image(sampler, lambda s: logits, generator=torch.Generator().manual_seed(7))[-1]
    c = _run_image(sampler, lambda s: logits, generator=torch.Generator().manual_seed(8))[-1]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_per_row_generators_make_rows_independent_of_batch():
    logits = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(0))
    sampler = ImageMaskSampler(MASK)
    alone = _run_image(sampler, lambda s: logits, B=1, generator=[torch.Generator().manual_seed(5)])[-1]
    pair = _run_image(sampler, lambda s: logits.expand(2, -1, -1), B=2,
                      generator=[torch.Generator().manual_seed(9), torch.Generator().manual_seed(5)])[-1]  # fmt: skip
    assert torch.equal(pair[1], alone[0])


def test_temperature_zero_ignores_the_seed():
    logits = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(0))
    sampler = ImageMaskSampler(MASK, temperature=0.0)
    a = _run_image(sampler, lambda s: logits, B=1, generator=torch.Generator().manual_seed(1))[-1]
    b = _run_image(sampler, lambda s: logits, B=1, generator=torch.Generator().manual_seed(2))[-1]
    assert torch.equal(a, b)
    assert torch.equal(a[0], logits[0].argmax(-1))


def test_partial_start_only_fills_masked_positions():
    """Region regeneration starts from a partly revealed sample; the rest is untouched."""
    start = torch.randint(0, 32, (1, 64))
    start[0, 10:20] = MASK
    sampler = ImageMaskSampler(MASK)
    sampler.set_timesteps(4, 10, 8)
    sample = start.clone()
    logits = torch.randn(1, 64, 32)
    for i in sampler.timesteps:
        sample = sampler.step(logits, i, sample).prev_sample
    assert (sample != MASK).all()
    keep = torch.ones(64, dtype=torch.bool)
    keep[10:20] = False
    assert torch.equal(sample[0, keep], start[0, keep])


def test_text_sampler_decodes_blocks_left_to_right():
    T, V = 8, 20
    logits = torch.randn(1, T, V, generator=torch.Generator().manual_seed(0))
    sampler = TextMaskSampler(MASK, block_length=4)
    sampler.set_timesteps(4, T)
    sample = torch.full((1, T), MASK)
    seen_second_block_before_first_done = False
    for i in sampler.timesteps:
        new = sampler.step(logits, i, sample).prev_sample
        if (new[0, 4:] != MASK).any() and (new[0, :4] == MASK).any():
            seen_second_block_before_first_done = True
        revealed = sample != MASK
        assert torch.equal(new[revealed], sample[revealed])
        sample = new
    assert not seen_second_block_before_first_done
    assert torch.equal(sample[0], logits[0].argmax(-1))  # temperature 0 = greedy


def test_text_sampler_respects_allowed_vocabulary():
    logits = torch.randn(2, 6, 10)
    allowed = torch.zeros(10, dtype=torch.bool)
    allowed[[3, 7]] = True
    sampler = TextMaskSampler(MASK, block_length=6, temperature=1.0)
    sampler.set_timesteps(3, 6)
    sample = torch.full((2, 6), MASK)
    for i in sampler.timesteps:
        sample = sampler.step(logits, i, sample, generator=torch.Generator().manual_seed(0), allowed=allowed).prev_sample
    assert set(sample.unique().tolist()) <= {3, 7}


def test_sampler_rejects_bad_settings():
    with pytest.raises(ValueError, match="order"):
        ImageMaskSampler(MASK, order="random")
    with pytest.raises(ValueError, match="temperature"):
        ImageMaskSampler(MASK, temperature=-1)
    with pytest.raises(ValueError, match="generators"):
        ImageMaskSampler(MASK).step(torch.randn(2, 4, 3), 0, torch.full((2, 4), MASK),
                                    generator=[torch.Generator()])  # fmt: skip
