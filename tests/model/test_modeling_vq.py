"""Fast tests of `VQConfig` and `VQImageTokenizer` on a tiny config (CPU, a few seconds).

Run: `pytest tests/model/test_modeling_vq.py`
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from lavida_agent.model.configuration_vq import VQConfig
from lavida_agent.model.modeling_vq import (
    VQDecoderOutput,
    VQEncoderOutput,
    VQImageTokenizer,
    images_to_tensor,
    tensor_to_images,
)

# Palette of the stand-in scenes (ShapesWorld colours and backgrounds).
COLORS = [
    (220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 210, 40), (150, 60, 200), (245, 140, 30)
]  # fmt: skip
BACKGROUNDS = [(240, 240, 240), (20, 20, 20), (128, 128, 128)]


def stand_in_images(rng: np.random.Generator, batch_size: int) -> np.ndarray:
    """Flat-colour rectangles and discs on a solid background: uint8 `(B, 64, 64, 3)`.

    A stand-in for ShapesWorld renders, so these tests do not depend on the renderer.
    """
    images = np.empty((batch_size, 64, 64, 3), np.uint8)
    for image in images:
        image[:] = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        for _ in range(int(rng.integers(1, 4))):
            side = int(rng.integers(10, 25))
            x0, y0 = (int(v) for v in rng.integers(2, 62 - side, size=2))
            color = COLORS[rng.integers(len(COLORS))]
            if rng.random() < 0.5:
                cv2.rectangle(image, (x0, y0), (x0 + side - 1, y0 + side - 1), color, -1)
            else:
                cv2.circle(image, (x0 + side // 2, y0 + side // 2), side // 2, color, -1)
    return images


def tiny_config(**overrides) -> VQConfig:
    values = dict(hidden_channels=16, num_res_blocks=1, norm_num_groups=4, latent_channels=8,
                  num_vq_embeddings=32)  # fmt: skip
    values.update(overrides)
    return VQConfig(**values)


@pytest.fixture
def pixels() -> torch.Tensor:
    return images_to_tensor(stand_in_images(np.random.default_rng(0), 4))  # (4, 3, 64, 64)


def test_config_round_trip(tmp_path):
    config = tiny_config(commitment_cost=0.5)
    assert VQConfig.from_dict(config.to_dict()) == config
    config.save_pretrained(tmp_path)
    assert VQConfig.from_pretrained(tmp_path) == config
    assert config.latent_size == 16 and config.patch_dim == 48 and config.num_codes_per_image == 256


def test_config_validation_names_the_numbers():
    with pytest.raises(ValueError, match="63"):
        VQConfig(image_size=63)
    with pytest.raises(ValueError, match="norm_num_groups"):
        VQConfig(hidden_channels=20, norm_num_groups=8)


def test_config_ignores_unknown_keys():
    config = VQConfig.from_dict({**tiny_config().to_dict(), "from_the_future": 1})
    assert config == tiny_config()


def test_encode_decode_shapes(pixels):
    tokenizer = VQImageTokenizer(tiny_config()).eval()
    encoded = tokenizer.encode(pixels)
    assert isinstance(encoded, VQEncoderOutput)
    assert encoded.codes.shape == (4, 16, 16) and encoded.codes.dtype == torch.long
    assert 0 <= int(encoded.codes.min()) and int(encoded.codes.max()) < 32
    assert encoded.latents.shape == encoded.quantized.shape == (4, 8, 16, 16)
    decoded = tokenizer.decode(encoded.codes)
    assert decoded.shape == (4, 3, 64, 64) and decoded.dtype == torch.float32
    assert float(decoded.min()) >= 0.0 and float(decoded.max()) <= 1.0
    # Raster-order codes (B, 256) and the dataclass form decode to the same pixels.
    flat = tokenizer.decode(encoded.codes.view(4, 256), return_dict=True)
    assert isinstance(flat, VQDecoderOutput)
    assert torch.equal(flat.sample, decoded)


def test_decode_rejects_bad_codes():
    tokenizer = VQImageTokenizer(tiny_config()).eval()
    with pytest.raises(ValueError, match="32"):
        tokenizer.decode(torch.full((1, 16, 16), 32))
    with pytest.raises(ValueError, match="shape"):
        tokenizer.decode(torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        tokenizer.encode(torch.zeros(1, 3, 32, 32))


def test_forward_loss_terms_and_codebook_updates(pixels):
    tokenizer = VQImageTokenizer(tiny_config())
    before = tokenizer.quantizer.embedding.clone()
    output = tokenizer(pixels, generator=torch.Generator().manual_seed(0))
    assert output.sample.shape == (4, 3, 64, 64) and output.codes.shape == (4, 16, 16)
    for term in (output.loss, output.recon_loss, output.commitment_loss, output.perplexity):
        assert term.ndim == 0 and torch.isfinite(term)
    torch.testing.assert_close(output.loss, output.recon_loss + output.commitment_loss)
    # Every code starts with zero usage: all but the ones this batch chose heavily are
    # restarted on the first training batch.
    assert 0 < output.num_restarted <= 32
    assert not torch.equal(before, tokenizer.quantizer.embedding)
    output.loss.backward()
    assert tokenizer.encoder.conv_in.weight.grad is not None  # straight-through reaches it
    assert tokenizer.decoder.conv_out.weight.grad is not None

    # Eval mode never touches the codebook.
    tokenizer.eval()
    frozen = {k: v.clone() for k, v in tokenizer.quantizer.state_dict().items()}
    tokenizer(pixels)
    tokenizer.encode(pixels)
    for key, value in tokenizer.quantizer.state_dict().items():
        assert torch.equal(value, frozen[key]), key


def test_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = VQImageTokenizer(tiny_config(), generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), state)
    b = VQImageTokenizer(tiny_config(), generator=torch.Generator().manual_seed(3))
    c = VQImageTokenizer(tiny_config(), generator=torch.Generator().manual_seed(4))
    for (name, x), (_, y), (_, z) in zip(
        a.state_dict().items(), b.state_dict().items(), c.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), name
    assert any(not torch.equal(x, z) for x, z in zip(a.parameters(), c.parameters(), strict=True))


def test_restarts_follow_the_generator(pixels):
    a, b = VQImageTokenizer(tiny_config()), VQImageTokenizer(tiny_config())
    a(pixels, generator=torch.Generator().manual_seed(7))
    b(pixels, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.quantizer.embedding, b.quantizer.embedding)


def test_save_load_fp32_is_bit_identical(tmp_path, pixels):
    tokenizer = VQImageTokenizer(tiny_config())
    tokenizer(pixels, generator=torch.Generator().manual_seed(0))  # non-trivial codebook
    tokenizer.eval()
    tokenizer.save_pretrained(tmp_path, dtype=torch.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = VQImageTokenizer.from_pretrained(tmp_path)
    assert not loaded.training and loaded.config == tokenizer.config
    codes = tokenizer.encode(pixels).codes
    assert torch.equal(loaded.encode(pixels).codes, codes)
    assert torch.equal(loaded.decode(codes), tokenizer.decode(codes))


def test_save_fp16_loads_as_fp32(tmp_path, pixels):
    tokenizer = VQImageTokenizer(tiny_config())
    tokenizer(pixels, generator=torch.Generator().manual_seed(0))
    tokenizer.eval()
    tokenizer.save_pretrained(tmp_path)  # fp16 storage by default
    loaded = VQImageTokenizer.from_pretrained(tmp_path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    codes = tokenizer.encode(pixels).codes
    torch.testing.assert_close(loaded.decode(codes), tokenizer.decode(codes), atol=2e-2, rtol=0)
    # A second save/load of the fp16 weights is exact.
    loaded.save_pretrained(tmp_path / "again")
    again = VQImageTokenizer.from_pretrained(tmp_path / "again")
    assert torch.equal(again.decode(codes), loaded.decode(codes))


def test_images_tensor_round_trip_is_exact():
    images = stand_in_images(np.random.default_rng(1), 3)
    tensor = images_to_tensor(images)
    assert tensor.shape == (3, 3, 64, 64) and tensor.dtype == torch.float32
    assert np.array_equal(tensor_to_images(tensor), images)
    assert images_to_tensor(images[0]).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="uint8"):
        images_to_tensor(images.astype(np.float32))


def test_edge_loss_weight_only_reweights_outlines(pixels):
    tokenizer = VQImageTokenizer(tiny_config()).eval()
    plain = tokenizer(pixels).recon_loss
    weighted = tokenizer(pixels, edge_loss_weight=3.0).recon_loss
    assert weighted > plain
    flat = torch.full((1, 3, 64, 64), 0.5)  # no edges: the weight changes nothing
    torch.testing.assert_close(
        tokenizer(flat, edge_loss_weight=3.0).recon_loss, tokenizer(flat).recon_loss
    )
