"""The feature probe: its linear read-out, and its stages on the tiny random pipeline."""

from __future__ import annotations

import torch

from lavida_agent.benchmarks.feature_probe import feature_probe, linear_probe
from tests.fakes import tiny_pipeline


def test_linear_probe_reads_a_linear_label_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 3] > 0).long()  # 4 classes, linearly separable
    assert linear_probe(x, y) > 0.95
    noise = torch.randint(0, 4, (600,), generator=g)
    assert linear_probe(x, noise) < 0.4  # chance is 0.25


def test_feature_probe_covers_every_stage_and_pixels_hold_colour():
    pipe = tiny_pipeline()
    out = feature_probe(pipe, n_scenes=40)
    stages = ["pixels", "encoder", *(f"layer_{k}" for k in range(pipe.config.num_layers))]
    assert set(stages) <= set(out["colour"]) and set(stages) <= set(out["shape"])
    assert out["n_patches"] > 100
    assert out["colour"]["pixels"] > 0.8  # a patch's mean colour is its object's: the ceiling
    assert all(0.0 <= v <= 1.0 for v in [*out["colour"].values(), *out["shape"].values()])
