"""Tiny components shared by the model tests: tokenizer, VQ, model, pipeline (seeded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lavida_agent.model.configuration_lavida import PRESETS, LavidaConfig
from lavida_agent.model.configuration_vq import VQConfig
from lavida_agent.model.modeling_lavida import LavidaForMaskedDiffusion
from lavida_agent.model.modeling_vq import VQImageTokenizer
from lavida_agent.model.pipeline_lavida import LavidaPipeline
from lavida_agent.model.tokenization_lavida import build_tokenizer
from lavida_agent.model.training import token_ids
from lavida_agent.tools.shapes_world.render import render
from lavida_agent.tools.shapes_world.sampler import sample_scene

TINY_VQ = dict(hidden_channels=16, num_vq_embeddings=32, latent_channels=8, num_res_blocks=0, norm_num_groups=4)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(["move the red circle to the top left .", "objects : 3 ;"])


@pytest.fixture(scope="session")
def tiny_config(tokenizer):
    return LavidaConfig(**{**PRESETS["tiny"], **token_ids(tokenizer), "codebook_size": 32})


@pytest.fixture(scope="session")
def tiny_vq():
    return VQImageTokenizer(VQConfig(**TINY_VQ), generator=torch.Generator().manual_seed(0)).eval()


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return LavidaForMaskedDiffusion(tiny_config).eval()


@pytest.fixture()
def pipe(tiny_model, tiny_vq, tokenizer):
    return LavidaPipeline(tiny_model, tiny_vq, tokenizer)


@pytest.fixture(scope="session")
def scene_image():
    return render(sample_scene(np.random.default_rng(1), n_objects=3))
