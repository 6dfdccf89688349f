"""Configuration of the ShapesWorld VQ image tokenizer (`VQImageTokenizer`).

A plain dataclass (nanoGPT `GPTConfig` style) with JSON round-tripping, so the tokenizer
can be saved next to the Elastic-MoT weights as `config.json` + `model.safetensors`
(diffusers `VQModel` layout) without pulling in `ConfigMixin`.

Example:
    >>> from lavida_agent.model.configuration_vq import VQConfig
    >>> config = VQConfig(num_vq_embeddings=512)
    >>> config.latent_size
    16
    >>> VQConfig.from_dict(config.to_dict()) == config
    True
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"


@dataclass
class VQConfig:
    """Hyper-parameters of `VQImageTokenizer`.

    The defaults are the shipped ShapesWorld tokenizer: 64x64 RGB -> 16x16 codes from a
    1024-entry codebook. Why these values (measured on ShapesWorld renders, see
    `modeling_vq.py`):

    * `downsample_factor=4`: 16x16 = 256 codes per image, the grid the Elastic-MoT
      generates (2x2 token compression then gives 64 transformer positions).
    * `num_vq_embeddings=1024`: a 4x4 patch of a ShapesWorld render is one of >30k
      distinct pixel patterns (edges of four shapes at every sub-patch offset, 6
      colours x 3 backgrounds); the 1024 most common ones cover only 96.6% of patches,
      so exactness has to come from the decoder reading neighbouring codes. 1024
      entries (10 bits) leave room for "edge shape x which colour" codes while staying
      tiny next to Lavida-O's 8192 and cheap for the transformer's classifier head.
    * `latent_channels=32`, l2-normalised codes: low-dimensional, cosine-similarity
      lookup (ViT-VQGAN) keeps the codebook well used; EMA updates and dead-code
      restarts do the rest.

    Args:
        image_size: Side of the square input image in pixels.
        in_channels: Image channels (RGB).
        downsample_factor: Side of the pixel patch one code stands for; the latent
            grid is `image_size // downsample_factor` on each side.
        hidden_channels: Width of the convolutional trunk (runs at latent resolution).
        num_res_blocks: Residual blocks in the encoder and, separately, the decoder.
        decoder_res_blocks: Residual blocks in the decoder when it differs from the
            encoder (`None`: `num_res_blocks`). A deeper decoder can be fine-tuned on a
            frozen encoder and codebook, so the codes a transformer learned stay valid.
        norm_num_groups: Groups of the GroupNorm layers.
        latent_channels: Dimension of a codebook vector.
        num_vq_embeddings: Codebook size (number of distinct image codes).
        commitment_cost: Weight of the commitment loss `||z_e - sg(z_q)||^2`.
        ema_decay: Decay of the exponential moving averages that update the codebook.
        dead_code_threshold: A code whose EMA usage count (codes per batch) falls below
            this is restarted on a batch vector during training.
        initializer_range: Std of the truncated-normal init of the 1x1 projections.
    """

    model_type: str = "lavida_vq"
    image_size: int = 64
    in_channels: int = 3
    downsample_factor: int = 4
    hidden_channels: int = 128
    num_res_blocks: int = 1
    decoder_res_blocks: int | None = None
    norm_num_groups: int = 8
    latent_channels: int = 32
    num_vq_embeddings: int = 1024
    commitment_cost: float = 0.25
    ema_decay: float = 0.99
    dead_code_threshold: float = 0.25
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def latent_size(self) -> int:
        """Side of the code grid (16 for 64 px with 4x downsampling)."""
        return self.image_size // self.downsample_factor

    @property
    def num_codes_per_image(self) -> int:
        return self.latent_size * self.latent_size

    @property
    def num_decoder_blocks(self) -> int:
        return self.num_res_blocks if self.decoder_res_blocks is None else self.decoder_res_blocks

    @property
    def patch_dim(self) -> int:
        """Values in one pixel patch: `in_channels * downsample_factor**2` (48)."""
        return self.in_channels * self.downsample_factor**2

    def validate(self) -> None:
        """Raise `ValueError` naming the offending numbers."""
        if self.image_size % self.downsample_factor != 0:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of downsample_factor "
                f"({self.downsample_factor})"
            )
        if self.hidden_channels % self.norm_num_groups != 0:
            raise ValueError(
                f"hidden_channels ({self.hidden_channels}) must be divisible by "
                f"norm_num_groups ({self.norm_num_groups})"
            )
        if self.num_vq_embeddings < 2:
            raise ValueError(f"num_vq_embeddings must be >= 2, got {self.num_vq_embeddings}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.num_res_blocks < 0:
            raise ValueError(f"num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if self.decoder_res_blocks is not None and self.decoder_res_blocks < 0:
            raise ValueError(f"decoder_res_blocks must be >= 0, got {self.decoder_res_blocks}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> VQConfig:
        """Build a config; unknown keys are ignored with a warning (forward compatibility)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            logger.warning("VQConfig: ignoring unknown keys %s", unknown)
        return cls(**{k: v for k, v in config_dict.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> VQConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `config.json` into `save_directory` (created if missing)."""
        os.makedirs(save_directory, exist_ok=True)
        self.to_json_file(os.path.join(save_directory, CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> VQConfig:
        return cls.from_json_file(os.path.join(directory, CONFIG_NAME))


__all__ = ["CONFIG_NAME", "VQConfig"]
