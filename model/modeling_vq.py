"""The ShapesWorld VQ image tokenizer: 64x64 RGB <-> 16x16 grid of discrete codes.

The small-scale analogue of the Meissonic/aMUSEd VQGAN that Lavida-O uses
(`LAVIDA_O_FACTS.md` §1.3); the public shape follows diffusers `VQModel`
(`encode` -> `VQEncoderOutput`, `decode` -> pixels, `save_pretrained`/`from_pretrained`).

Design, for flat-colour images on a 2-core CPU:

* **Patchify, then think at latent resolution.** The encoder starts with a 4x4
  pixel-unshuffle (64x64x3 -> 16x16x48), so every code sees its whole pixel patch
  losslessly, and all convolutions run on the 16x16 grid (16x fewer positions than
  full-resolution convolutions, so the trunk can be wide). The decoder mirrors it and
  ends with a pixel-shuffle: each code's feature vector is read out into its 4x4x3
  pixels, which keeps edges sharp (no transposed-convolution smearing).
* **Context resolves what one code cannot.** ShapesWorld has >30k distinct 4x4
  patches, far more than the codebook; 3x3 convolutions let the decoder read the
  neighbouring codes (the colour of the object, the background) so a code only has to
  say what is local.
* **Codebook:** l2-normalised vectors with cosine-similarity lookup (ViT-VQGAN),
  updated by exponential moving averages (VQ-VAE-2 appendix) rather than gradients,
  with dead-code restarts on batch vectors sampled in proportion to their
  quantisation error (k-means++ style, so rare edge patches get codes). Gradients
  reach the encoder through the straight-through estimator; a commitment loss keeps the
  encoder near its codes.
* **Loss:** L1 + L2 on RGB (the decoder emits arbitrary colours, no palette), plus the
  commitment term.

Every random draw (weight init, dead-code restarts) takes an explicit `torch.Generator`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from . import batch_invariant
from .configuration_vq import VQConfig

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"


# ----------------------------------------------------------------------------- outputs
@dataclass
class VQEncoderOutput:
    """Result of `VQImageTokenizer.encode`.

    Attributes:
        codes: `(B, h, w)` long, codebook indices in raster order (h = w = 16).
        latents: `(B, D, h, w)` l2-normalised encoder output before quantisation.
        quantized: `(B, D, h, w)` the codebook vectors the codes point to.
    """

    codes: torch.Tensor
    latents: torch.Tensor
    quantized: torch.Tensor


@dataclass
class VQDecoderOutput:
    """Result of `VQImageTokenizer.decode(..., return_dict=True)`.

    Attributes:
        sample: `(B, 3, H, W)` float pixels clamped to [0, 1].
    """

    sample: torch.Tensor


@dataclass
class VQModelOutput:
    """Result of `VQImageTokenizer.forward` (a training step's worth of terms).

    Attributes:
        sample: `(B, 3, H, W)` reconstruction, not clamped (the loss sees raw values).
        codes: `(B, h, w)` long codes of the input.
        loss: scalar, `recon_loss + commitment_loss`.
        recon_loss: scalar, L1 + L2 between `sample` and the input (edge-weighted when
            `edge_loss_weight` > 0).
        commitment_loss: scalar, `commitment_cost * ||z_e - sg(z_q)||^2`.
        perplexity: scalar, exp(entropy) of the batch's code histogram.
        codebook_usage: scalar, fraction of codes whose EMA usage is above the
            dead-code threshold.
        num_restarted: number of dead codes restarted in this step (0 in eval mode).
    """

    sample: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    recon_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    codebook_usage: torch.Tensor
    num_restarted: int = 0


# ----------------------------------------------------------------------------- blocks
class VQResBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus the identity (shape-preserving)."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm1 = batch_invariant.GroupNorm(num_groups, channels)
        self.conv1 = batch_invariant.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = batch_invariant.GroupNorm(num_groups, channels)
        self.conv2 = batch_invariant.Conv2d(channels, channels, 3, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.conv1(F.silu(self.norm1(hidden_states)))
        hidden_states = self.conv2(F.silu(self.norm2(hidden_states)))
        return residual + hidden_states


class VQEncoder(nn.Module):
    """Pixels in [-1, 1] `(B, 3, H, W)` -> unnormalised latents `(B, D, h, w)`."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.factor = config.downsample_factor
        hidden = config.hidden_channels
        self.conv_in = batch_invariant.Conv2d(config.patch_dim, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(
            VQResBlock(hidden, config.norm_num_groups) for _ in range(config.num_res_blocks)
        )
        self.norm_out = batch_invariant.GroupNorm(config.norm_num_groups, hidden)
        self.conv_out = batch_invariant.Conv2d(hidden, config.latent_channels, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden_states = F.pixel_unshuffle(pixels, self.factor)  # (B, 3*f*f, h, w)
        hidden_states = self.conv_in(hidden_states)  # (B, C, h, w)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return self.conv_out(F.silu(self.norm_out(hidden_states)))  # (B, D, h, w)


class VQDecoder(nn.Module):
    """Code vectors `(B, D, h, w)` -> pixels in [-1, 1] `(B, 3, H, W)` (not clamped)."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.factor = config.downsample_factor
        hidden = config.hidden_channels
        self.conv_in = batch_invariant.Conv2d(config.latent_channels, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(
            VQResBlock(hidden, config.norm_num_groups) for _ in range(config.num_decoder_blocks)
        )
        self.norm_out = batch_invariant.GroupNorm(config.norm_num_groups, hidden)
        # Per-code 2-layer readout of the 4x4x3 pixel patch (a 1x1 MLP before the shuffle).
        self.proj_out = batch_invariant.Conv2d(hidden, hidden, 1)
        self.conv_out = batch_invariant.Conv2d(hidden, config.patch_dim, 1)

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv_in(quantized)  # (B, C, h, w)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        hidden_states = self.proj_out(F.silu(self.norm_out(hidden_states)))
        patches = self.conv_out(F.silu(hidden_states))  # (B, 3*f*f, h, w)
        return F.pixel_shuffle(patches, self.factor)  # (B, 3, H, W)


class VQEMAQuantizer(nn.Module):
    """Cosine-similarity vector quantiser with EMA codebook updates and dead-code restarts.

    Buffers (all persistent, so a training checkpoint resumes exactly):
        embedding: `(K, D)` unit-norm code vectors used for lookup and decoding.
        cluster_size: `(K,)` EMA of how many batch vectors chose each code.
        embed_sum: `(K, D)` EMA of the sum of the vectors that chose each code.
    """

    def __init__(self, config: VQConfig):
        super().__init__()
        self.num_embeddings = config.num_vq_embeddings
        self.dim = config.latent_channels
        self.decay = config.ema_decay
        self.commitment_cost = config.commitment_cost
        self.dead_code_threshold = config.dead_code_threshold
        self.register_buffer("embedding", torch.zeros(self.num_embeddings, self.dim))
        # Zero usage: every code is "dead" at the first training step and is restarted on
        # real encoder outputs, a data-dependent init.
        self.register_buffer("cluster_size", torch.zeros(self.num_embeddings))
        self.register_buffer("embed_sum", torch.zeros(self.num_embeddings, self.dim))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            vectors = torch.randn(self.num_embeddings, self.dim, generator=generator)
            self.embedding.copy_(F.normalize(vectors, dim=-1))
            self.embed_sum.copy_(self.embedding)
            self.cluster_size.zero_()

    def lookup(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest code by cosine similarity. `flat`: `(N, D)` unit vectors -> (ids, sims)."""
        similarity = flat @ self.embedding.t()  # (N, K)
        best_sim, ids = similarity.max(dim=-1)  # (N,), (N,)
        return ids, best_sim

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """`(B, h, w)` long -> `(B, D, h, w)` code vectors."""
        return F.embedding(codes, self.embedding).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def _ema_update(
        self, flat: torch.Tensor, ids: torch.Tensor, best_sim: torch.Tensor,
        generator: torch.Generator | None,
    ) -> int:  # fmt: skip
        one_hot = F.one_hot(ids, self.num_embeddings).type_as(flat)  # (N, K)
        self.cluster_size.mul_(self.decay).add_(one_hot.sum(0), alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(one_hot.t() @ flat, alpha=1 - self.decay)
        # Direction of the mean of the assigned vectors (the norm does not matter).
        alive = self.cluster_size >= self.dead_code_threshold
        self.embedding[alive] = F.normalize(self.embed_sum[alive], dim=-1)

        dead = (~alive).nonzero().squeeze(-1)  # (n_dead,)
        num_dead = int(dead.numel())
        if num_dead == 0:
            return 0
        # Restart dead codes on batch vectors, sampled in proportion to how badly they are
        # quantised now: rare patches (object edges) get codes, not the background again.
        weights = (1.0 - best_sim).clamp_min(0.0) + 1e-6  # (N,)
        picks = torch.multinomial(
            weights, num_dead, replacement=num_dead > flat.shape[0], generator=generator
        )
        new_vectors = flat[picks]  # (n_dead, D)
        self.embedding[dead] = new_vectors
        self.embed_sum[dead] = new_vectors
        self.cluster_size[dead] = 1.0  # a grace period of ~log(4)/(1-decay) steps
        return num_dead

    def forward(
        self, latents: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Quantise `(B, D, h, w)` latents; in training mode also update the codebook.

        Returns:
            `(quantized_st, codes, commitment_loss, perplexity, num_restarted)` where
            `quantized_st` carries straight-through gradients to `latents`.
        """
        batch, dim, height, width = latents.shape
        latents = F.normalize(latents, dim=1)
        flat = latents.permute(0, 2, 3, 1).reshape(-1, dim)  # (N, D), N = B*h*w
        ids, best_sim = self.lookup(flat.detach())
        quantized = F.embedding(ids, self.embedding)  # (N, D)
        num_restarted = 0
        if self.training:
            num_restarted = self._ema_update(flat.detach(), ids, best_sim, generator)
        commitment_loss = self.commitment_cost * F.mse_loss(flat, quantized.detach())
        quantized_st = flat + (quantized - flat).detach()  # straight-through estimator
        quantized_st = quantized_st.view(batch, height, width, dim).permute(0, 3, 1, 2)
        probs = torch.bincount(ids, minlength=self.num_embeddings).float() / ids.numel()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        codes = ids.view(batch, height, width)
        return quantized_st.contiguous(), codes, commitment_loss, perplexity, num_restarted


# ----------------------------------------------------------------------------- model
class VQImageTokenizer(nn.Module):
    """64x64 RGB images <-> `(16, 16)` grids of codes from a small learned codebook.

    Args:
        config: The architecture (`VQConfig`).
        generator: Seeds the weight init and the initial codebook; `None` uses a
            generator seeded with 0 (so two default-constructed models are identical).

    Example:
        >>> tokenizer = VQImageTokenizer.from_pretrained("model/weights/vq")  # doctest: +SKIP
        >>> pixels = images_to_tensor(images)               # (B, 3, 64, 64) in [0, 1]
        >>> codes = tokenizer.encode(pixels).codes          # (B, 16, 16) long
        >>> recon = tokenizer.decode(codes)                 # (B, 3, 64, 64) in [0, 1]
    """

    def __init__(self, config: VQConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        # Module constructors draw their default init from the global RNG; fork it so that
        # building a tokenizer leaves the caller's global RNG state untouched. The real
        # init comes from `generator` in `init_weights`.
        with torch.random.fork_rng(devices=[]):
            self.encoder = VQEncoder(config)
            self.quantizer = VQEMAQuantizer(config)
            self.decoder = VQDecoder(config)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        self.init_weights(generator)

    # -------------------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """All initialisation in one place.

        | parameter | init |
        | --- | --- |
        | 3x3 convs | Kaiming-uniform (fan-in, SiLU ~ ReLU gain) |
        | second conv of each res block | Kaiming-uniform x 0.1 (blocks start near identity) |
        | 1x1 projections | truncated normal, std `initializer_range * 5` |
        | biases | zero |
        | GroupNorm | weight 1, bias 0 |
        | codebook | random unit vectors (restarted on data at the first step anyway) |
        """
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d):
                if module.kernel_size == (1, 1):
                    std = self.config.initializer_range * 5
                    nn.init.trunc_normal_(
                        module.weight, std=std, a=-2 * std, b=2 * std, generator=generator
                    )
                else:
                    nn.init.kaiming_uniform_(
                        module.weight, nonlinearity="relu", generator=generator
                    )
                    if name.endswith("conv2"):
                        module.weight.mul_(0.1)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.quantizer.reset_parameters(generator)

    # -------------------------------------------------------------------------- API
    @property
    def num_vq_embeddings(self) -> int:
        return self.config.num_vq_embeddings

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if not pixels.is_floating_point():
            raise ValueError(f"expected float pixels in [0, 1] (`images_to_tensor` turns uint8 images into "
                             f"them), got {pixels.dtype}")  # fmt: skip
        size = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (self.config.in_channels, size, size):
            raise ValueError(
                f"expected pixels of shape (B, {self.config.in_channels}, {size}, {size}), "
                f"got {tuple(pixels.shape)}"
            )

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> VQEncoderOutput:
        """Tokenise images.

        Args:
            pixels: `(B, 3, 64, 64)` float in [0, 1] (see `images_to_tensor`); moved to the
                tokenizer's device and dtype.

        Returns:
            `VQEncoderOutput` with `codes` `(B, 16, 16)` long. Never updates the codebook.
        """
        self._check_pixels(pixels)
        embedding = self.quantizer.embedding
        pixels = pixels.to(device=embedding.device, dtype=embedding.dtype)  # CPU input is fine
        latents = F.normalize(self.encoder(pixels * 2.0 - 1.0), dim=1)  # (B, D, h, w)
        batch, dim, height, width = latents.shape
        flat = latents.permute(0, 2, 3, 1).reshape(-1, dim)  # (N, D)
        ids, _ = self.quantizer.lookup(flat)
        codes = ids.view(batch, height, width)  # (B, h, w)
        return VQEncoderOutput(
            codes=codes, latents=latents, quantized=self.quantizer.embed_codes(codes)
        )

    @torch.no_grad()
    def decode(
        self, codes: torch.Tensor, *, return_dict: bool = False
    ) -> torch.Tensor | VQDecoderOutput:
        """Turn codes back into pixels.

        Args:
            codes: `(B, 16, 16)` (or `(B, 256)` raster order) integer codes in
                `[0, num_vq_embeddings)`.
            return_dict: Return a `VQDecoderOutput` instead of the bare tensor.

        Returns:
            `(B, 3, 64, 64)` float pixels clamped to [0, 1].
        """
        side = self.config.latent_size
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dtype == torch.bool:
            raise ValueError(f"expected a tensor of integer codes, got {codes!r:.80}")
        if codes.ndim == 2 and codes.shape[1] == side * side:
            codes = codes.view(-1, side, side)
        if codes.ndim != 3 or codes.shape[1:] != (side, side):
            raise ValueError(
                f"expected codes of shape (B, {side}, {side}), got {tuple(codes.shape)}"
            )
        codes = codes.to(device=self.quantizer.embedding.device, dtype=torch.long)
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.num_vq_embeddings):
            raise ValueError(
                f"codes must lie in [0, {self.num_vq_embeddings}), got "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )
        sample = self.decoder(self.quantizer.embed_codes(codes))  # (B, 3, H, W) in ~[-1, 1]
        sample = ((sample + 1.0) / 2.0).clamp(0.0, 1.0)
        return VQDecoderOutput(sample=sample) if return_dict else sample

    def forward(
        self,
        pixels: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        edge_loss_weight: float = 0.0,
    ) -> VQModelOutput:
        """Encode, quantise (updating the codebook in training mode), decode, and score.

        Args:
            pixels: `(B, 3, 64, 64)` float in [0, 1].
            generator: Drives the dead-code restarts (training mode only).
            edge_loss_weight: Extra reconstruction weight on pixels whose 3x3
                neighbourhood is not one flat colour (object outlines: the only place a
                flat-colour reconstruction goes wrong). 0 gives the plain mean.
        """
        self._check_pixels(pixels)
        target = pixels * 2.0 - 1.0  # (B, 3, H, W) in [-1, 1]
        latents = self.encoder(target)  # (B, D, h, w)
        quantized, codes, commitment_loss, perplexity, num_restarted = self.quantizer(
            latents, generator=generator
        )
        reconstruction = self.decoder(quantized)  # (B, 3, H, W)
        diff = reconstruction - target
        per_pixel = diff.abs() + diff.square()  # L1 + L2, (B, 3, H, W)
        if edge_loss_weight:
            # Local colour range over a 3x3 window: > 0 exactly on and next to edges.
            local_range = F.max_pool2d(target, 3, 1, 1) + F.max_pool2d(-target, 3, 1, 1)
            edges = (local_range.amax(dim=1, keepdim=True) > 0).to(per_pixel.dtype)
            per_pixel = per_pixel * (1.0 + edge_loss_weight * edges)  # (B, 3, H, W)
        recon_loss = per_pixel.mean()
        usage = (self.quantizer.cluster_size >= self.quantizer.dead_code_threshold).float().mean()
        return VQModelOutput(
            sample=(reconstruction + 1.0) / 2.0,
            codes=codes,
            loss=recon_loss + commitment_loss,
            recon_loss=recon_loss,
            commitment_loss=commitment_loss,
            perplexity=perplexity,
            codebook_usage=usage,
            num_restarted=num_restarted,
        )

    # -------------------------------------------------------------------------- I/O
    def save_pretrained(
        self, save_directory: str | os.PathLike, *, dtype: torch.dtype = torch.float16
    ) -> None:
        """Write `config.json` and `model.safetensors` (floating tensors cast to `dtype`)."""
        os.makedirs(save_directory, exist_ok=True)
        self.config.save_pretrained(save_directory)
        state = {
            name: (t.detach().to(dtype) if t.is_floating_point() else t.detach()).contiguous()
            for name, t in self.state_dict().items()
        }
        save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
        logger.info("saved VQImageTokenizer to %s (%s)", save_directory, dtype)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, dtype: torch.dtype = torch.float32
    ) -> VQImageTokenizer:
        """Load a tokenizer written by `save_pretrained`, in eval mode, weights as `dtype`."""
        config = VQConfig.from_pretrained(directory)
        model = cls(config)
        state = load_file(os.path.join(directory, WEIGHTS_NAME))
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
        model.load_state_dict(state, strict=True)
        return model.to(dtype).eval()


# ----------------------------------------------------------------------------- helpers
def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 `(B, H, W, 3)` (or one `(H, W, 3)` image) -> float `(B, 3, H, W)` in [0, 1]."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (B, H, W, 3), got {images.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return tensor.float().div_(255.0).contiguous()


def tensor_to_images(pixels: torch.Tensor) -> np.ndarray:
    """float `(B, 3, H, W)` in [0, 1] -> uint8 `(B, H, W, 3)` (clamped, rounded)."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
    pixels = pixels.detach().float().clamp(0.0, 1.0).mul(255.0).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


__all__ = [
    "VQDecoderOutput",
    "VQEncoderOutput",
    "VQImageTokenizer",
    "VQModelOutput",
    "images_to_tensor",
    "tensor_to_images",
]
