"""The Elastic-MoT masked-diffusion transformer of Lavida-O, at any scale, in one file.

Features (LAVIDA_O_FACTS.md section numbers in brackets):
- Elastic-MoT layers [§2.2-2.3]: every layer holds an understanding (und) parameter set of
  width `hidden_size` and a narrower generation (gen) set of width `gen_hidden_size`. Gen
  Q/K/V project *up* to the und attention width so both branches share heads; the
  attention output projection and the final norm are shared (gen keeps the first
  `gen_hidden_size` output channels). A boolean modality mask, derived from the input
  ids, routes each position: image-to-generate and edit-source codes -> gen; text, plan,
  location tokens and vision-encoder features -> und.
- Joint attention in layers `< joint_layers`, modality-separated attention after.
- Token compression [§1.4, §4.4]: 2x2 VQ codes -> one position (embedding, RMSNorm,
  stride-2 conv), expanded back by a transposed conv before the code classifier.
- An understanding-side patch encoder (the SigLIP analogue) [§1.2] whose features fill
  `img_enc` placeholder positions.
- Elastic activation: when only image codes are predicted, und rows skip every layer
  `>= joint_layers` (after the joint layers text cannot reach image positions).
- Condition caching (beyond Lavida-O): with `attention_mode="one_way"` a position attends
  only to its own and earlier *segments* (prompt < plan < image), so a condition's
  keys/values are computed once per request and reused at every denoising step.
- Masked-diffusion loss [§3.1-3.2]: unweighted cross-entropy over masked text positions
  plus cross-entropy over masked image codes.

Inputs are packed as one sequence per row. Placeholder ids mark image positions and the
tensors that fill them are passed flat, in order of appearance (row-major over the
batch): `gen_codes` (S, G, G) fills every `img_gen`/`img_src` run of P positions
(P = positions_per_image), `pixel_values` (V, 3, H, W) every `img_enc` run.

Deviations from the released model, all small-scale choices: learned 2-D position
embeddings for image and patch positions (RoPE over the flat sequence as in Lavida-O is
kept too); the gen final norm normalises over the gen width with the first channels of the
shared weight (upstream pads to the und width, a constant sqrt(2) scale); with
`plan_layout` the gen branch also reads the plan's decided items directly, drawn onto the
code grid (`LavidaImageEmbedding.layout`): the 2.4B gen branch learns to follow a layout
through attention alone, a 1.5M one had not after ~15k CPU steps (2% of images correct
from the true layout).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from lavida_agent.model import batch_invariant
from lavida_agent.model.configuration_lavida import LavidaConfig

__all__ = [
    "ConditionCache",
    "LavidaForMaskedDiffusion",
    "LavidaOutput",
    "LavidaPreTrainedModel",
]


# ----------------------------------------------------------------------------- blocks


class LavidaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if weight is None else weight
        return F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), self.eps)


class LavidaRotaryEmbedding(nn.Module):
    """Plain 1-D RoPE over absolute sequence indices (FACTS §11.1).

    The frequencies are recomputed per call instead of living in a non-persistent buffer:
    transformers 5 materialises such buffers uninitialised after `from_pretrained`.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (B, L) -> cos, sin (B, 1, L, head_dim), broadcast over heads
        exponents = torch.arange(0, self.head_dim, 2, device=position_ids.device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        freqs = position_ids[..., None].float() * inv_freq  # (B, L, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos()[:, None], emb.sin()[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


ALL_ROWS = slice(None)
RowGroups = Sequence[tuple[torch.Tensor | slice, int, int]]
"""Rows of a batch grouped by where their content starts: `(rows, q0, k0)`."""
UNPADDED: RowGroups = ((ALL_ROWS, 0, 0),)
"""Every row in one group, from its first position (a batch without leading padding)."""


def leading_padding(valid: torch.Tensor) -> torch.Tensor:
    """`(B,)` how many positions of each row of `valid` `(B, L)` come before its first valid one."""
    return (~valid).long().cumprod(1).sum(1)


def content_groups(q_valid: torch.Tensor, k_valid: torch.Tensor) -> RowGroups:
    """Group the rows of a left-padded batch by their leading padding: `(rows, q0, k0)`
    means rows `rows` (a slice, or an index tensor) hold no query before `q0` and no key
    before `k0`.

    Whatever reduces over the sequence (attention, the condition pool, the copy head) runs
    per group on `[q0:]` x `[k0:]` only (`by_content`), so a row is computed on exactly the
    shapes it has alone: its result does not depend on what it was batched with, bit for
    bit (a reduction over a longer, padded axis sums in another order). A batch without
    leading padding (training packs right-padded) is one group, and nothing changes for it.
    """
    q_lead, k_lead = leading_padding(q_valid), leading_padding(k_valid)
    if not (bool(q_lead.any()) or bool(k_lead.any())):
        return UNPADDED
    groups: dict[tuple[int, int], list[int]] = {}
    for b, key in enumerate(zip(q_lead.tolist(), k_lead.tolist(), strict=True)):
        groups.setdefault(key, []).append(b)
    if len(groups) == 1:
        ((q0, k0),) = groups
        return [(ALL_ROWS, q0, k0)]
    # a run of consecutive rows is a slice (views, no copies); other groups an index tensor
    return [(slice(rows[0], rows[-1] + 1) if rows[-1] - rows[0] == len(rows) - 1
             else torch.tensor(rows, device=q_valid.device), q0, k0) for (q0, k0), rows in groups.items()]  # fmt: skip


def by_content(groups: RowGroups, fn, zeros) -> torch.Tensor:
    """`out[rows, ..., q0:, :] = fn(rows, q0, k0)` for each group of `content_groups` (the
    query axis second to last), `out = zeros()`; positions before a group's `q0` (its
    padding) stay zero. One group with nothing to skip is just `fn(ALL_ROWS, 0, 0)`."""
    if len(groups) == 1 and groups[0][1:] == (0, 0):
        return fn(ALL_ROWS, 0, 0)
    out = zeros()
    for rows, q0, k0 in groups:
        if q0 < out.shape[-2]:
            out[rows, ..., q0:, :] = fn(rows, q0, k0)
    return out


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class LavidaMLP(nn.Module):
    """Gated SiLU MLP: down(silu(gate x) * up x), as LLaDA's blocks (FACTS §1.1)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = batch_invariant.Linear(dim, hidden, bias=False)
        self.up_proj = batch_invariant.Linear(dim, hidden, bias=False)
        self.down_proj = batch_invariant.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LavidaDecoderLayer(nn.Module):
    """One Elastic-MoT layer: two parameter sets, one attention, a shared output projection.

    Rows are kept per branch: `h_und` (Nu, d) and `h_gen` (Ng, dg) hold the hidden states
    of the und and gen positions of the flattened batch; `und_idx`/`gen_idx` say where
    they sit in the (B * L) sequence so attention can run over the whole sequence.
    """

    def __init__(self, config: LavidaConfig, layer_idx: int):
        super().__init__()
        d, dg = config.hidden_size, config.gen_hidden_size
        self.is_joint = layer_idx < config.joint_layers
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        # und branch
        self.attn_norm = LavidaRMSNorm(d, config.rms_norm_eps)
        self.q_proj = batch_invariant.Linear(d, d, bias=False)
        self.k_proj = batch_invariant.Linear(d, d, bias=False)
        self.v_proj = batch_invariant.Linear(d, d, bias=False)
        self.mlp_norm = LavidaRMSNorm(d, config.rms_norm_eps)
        self.mlp = LavidaMLP(d, config.intermediate_size)
        # gen branch: Q/K/V project dg -> d so that heads are shared (FACTS §2.2)
        self.attn_norm_gen = LavidaRMSNorm(dg, config.rms_norm_eps)
        self.q_proj_gen = batch_invariant.Linear(dg, d, bias=False)
        self.k_proj_gen = batch_invariant.Linear(dg, d, bias=False)
        self.v_proj_gen = batch_invariant.Linear(dg, d, bias=False)
        self.mlp_norm_gen = LavidaRMSNorm(dg, config.rms_norm_eps)
        self.mlp_gen = LavidaMLP(dg, config.gen_intermediate_size)
        # shared: there is no separate gen output projection upstream either
        self.o_proj = batch_invariant.Linear(d, d, bias=False)

    def forward(
        self,
        h_und: torch.Tensor,
        h_gen: torch.Tensor,
        und_idx: torch.Tensor,
        gen_idx: torch.Tensor,
        shape: tuple[int, int],
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None,
        skip_und: bool,
        groups: RowGroups = UNPADDED,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, L = shape
        N, d, H, hd = B * L, self.q_proj.in_features, self.num_heads, self.head_dim
        dg = self.attn_norm_gen.weight.shape[0]
        run_und = not skip_und and und_idx.numel() > 0

        # Step 1: per-branch Q/K/V (one fused matmul per branch), scattered back into
        # sequence order. Rows of a skipped branch stay zero: the attention mask never lets
        # a live query see them.
        qkv_und = qkv_gen = None
        if run_und:
            w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            qkv_und = batch_invariant.linear(self.attn_norm(h_und), w)
        if gen_idx.numel():
            w = torch.cat([self.q_proj_gen.weight, self.k_proj_gen.weight, self.v_proj_gen.weight])
            qkv_gen = batch_invariant.linear(self.attn_norm_gen(h_gen), w)
        # The projections' dtype, not the stream's: under autocast they are bf16.
        like = next((t for t in (qkv_und, qkv_gen) if t is not None), h_gen)
        if run_und or und_idx.numel() == 0:
            qkv = like.new_empty(N, 3 * d)
        else:
            qkv = like.new_zeros(N, 3 * d)
        if qkv_und is not None:
            qkv[und_idx] = qkv_und
        if qkv_gen is not None:
            qkv[gen_idx] = qkv_gen
        qkv = qkv.view(B, L, 3, H, hd).permute(2, 0, 3, 1, 4)  # (3, B, H, L, hd)
        cos, sin = rope
        qk = apply_rotary(qkv[:2], cos, sin)  # q and k rotated together
        q, k, v = qk[0], qk[1], qkv[2]
        present = (k, v)  # post-RoPE keys: a cache stores them as they are
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)

        # Step 2: one bidirectional attention over the whole sequence; the boolean mask
        # carries segments (one-way conditions), padding and, in split layers, modality.
        # Left-padded rows attend over their content only (`content_groups`).
        o = by_content(groups, lambda r, q0, k0: F.scaled_dot_product_attention(
            q[r, :, q0:], k[r, :, k0:], v[r, :, k0:], attn_mask=attn_mask[r, :, q0:, k0:]),
            lambda: torch.zeros_like(q))  # (B, H, L, hd)
        o = o.transpose(1, 2).reshape(N, d)

        # Step 3: shared output projection (gen keeps its first dg channels), residual, MLPs.
        if run_und:
            h_und = h_und + self.o_proj(o[und_idx])
            h_und = h_und + self.mlp(self.mlp_norm(h_und))
        if gen_idx.numel():
            h_gen = h_gen + batch_invariant.linear(o[gen_idx], self.o_proj.weight[:dg])
            h_gen = h_gen + self.mlp_gen(self.mlp_norm_gen(h_gen))
        return h_und, h_gen, present


def _constant(fn):
    """`lru_cache` for fixed tables, built outside inference mode: a table first built under
    `torch.inference_mode()` would be an inference tensor, which autograd refuses to save
    for backward in a later training step of the same process."""

    @functools.lru_cache(maxsize=8)
    @functools.wraps(fn)
    def cached(*args):
        with torch.inference_mode(False):
            return fn(*args)

    return cached


@_constant
def sincos_2d(side: int, dim: int, max_wavelength: float = 4.0) -> torch.Tensor:
    """Fixed 2-D sin/cos codes `(side * side, dim)` of a raster grid, `dim / 4` wavelengths
    per axis from 2 cells to `max_wavelength * side` cells (geometric). Cached: read only."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    cells = torch.arange(side, dtype=torch.float32, device="cpu")  # cached: never on a device context
    ys, xs = torch.meshgrid(cells, cells, indexing="ij")
    wavelengths = torch.exp(torch.linspace(math.log(2.0), math.log(max_wavelength * side), dim // 4, device="cpu"))
    ax = 2 * math.pi * xs.reshape(-1, 1) / wavelengths
    ay = 2 * math.pi * ys.reshape(-1, 1) / wavelengths
    return torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1)


def coordinate_code(values: torch.Tensor, dim: int, span: int) -> torch.Tensor:
    """Fixed codes `(..., dim)` of coordinates `values` (pixels, `0..span`): `t` and `t^2`
    of `t = value / span`, then sin/cos pairs at `(dim - 2) / 2` wavelengths from 4 to
    `4 * span` pixels (geometric; a 2-pixel one would only alias on the integer grid).

    The one basis shared by the `<LOC_i>` tokens (coordinate i) and the gen image positions
    (their centres): both name a place in the same code. The polynomial pair makes "a peak
    at the coordinate a hidden state holds linearly" a rank-2 read-out
    (`i * x - i^2 / 2 = -(x - i)^2 / 2 + const`); the waves give sharper, local ones.
    """
    t = values.float()[..., None] / span
    wavelengths = torch.exp(torch.linspace(math.log(4.0), math.log(4.0 * span), (dim - 2) // 2, device=values.device))
    angles = 2 * math.pi * values.float()[..., None] / wavelengths
    return torch.cat([t * math.sqrt(3.0), t * t * math.sqrt(5.0), angles.sin() * math.sqrt(2.0),
                      angles.cos() * math.sqrt(2.0)], dim=-1)  # fmt: skip


@_constant
def loc_code_table(n: int, dim: int) -> torch.Tensor:
    """`coordinate_code` of the integers `0..n-1` (the `<LOC_i>` coordinates). Cached: read only."""
    return coordinate_code(torch.arange(n, device="cpu"), dim, n)


@_constant
def grid_code(side: int, image_size: int, dim: int, span: int) -> torch.Tensor:
    """`(side * side, 2 * dim)`: the `coordinate_code` of each raster cell's centre x, then
    y, in pixels. Computed on the fly (not a buffer: meta-device loading). Cached: read only."""
    centres = (torch.arange(side, device="cpu") + 0.5) * (image_size / side)
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.cat([coordinate_code(xs.reshape(-1), dim, span), coordinate_code(ys.reshape(-1), dim, span)], 1)


LAYOUT_CODE_DIM = 16  # coordinate_code width of each of the 4 box-edge offsets in a layout


def plan_items_in(ids: list[int], config: LavidaConfig) -> list[tuple[list[int], tuple[int, int, int, int]]]:
    """Every fully visible plan item in a row of token ids: `(label ids, (x0, y0, x1, y1) bins)`.

    An item is `<box_p> label </box_p> <LOC_BEGIN> <LOC_a> <LOC_b> <LOC_c> <LOC_d> <LOC_END>`
    with no mask token in it and a non-empty box; a masked or malformed item is skipped
    (a model drawing from a partly decoded plan sees only the items that are decided).
    """
    c = config
    lo, hi = c.loc_token_offset, c.loc_token_offset + c.num_loc_tokens
    items = []
    for p, t in enumerate(ids):
        if t != c.loc_begin_token_id or p + 5 >= len(ids) or ids[p + 5] != c.loc_end_token_id:
            continue
        q = ids[p + 1 : p + 5]
        if not all(lo <= v < hi for v in q) or p < 3 or ids[p - 1] != c.box_end_token_id:
            continue
        start = p - 2
        while start >= 0 and p - start <= 6 and ids[start] != c.box_start_token_id:
            start -= 1
        label = ids[start + 1 : p - 1]
        if start < 0 or ids[start] != c.box_start_token_id or not label or c.mask_token_id in label:
            continue
        x0, y0, x1, y1 = (v - lo for v in q)
        if x1 > x0 and y1 > y0:
            items.append((label, (x0, y0, x1, y1)))
    return items


class LavidaVisionEncoder(nn.Module):
    """Understanding-side patch encoder + 2-layer MLP projector (SigLIP + mlp2x_gelu analogue).

    `config.vision_stem` picks how a patch becomes a token:

    * `"linear"`: a linear patch embedding plus a learned position embedding (ViT).
    * `"modulated"`: without a pretrained SigLIP the encoder must learn *where* things are
      from scratch, and an additive position embedding makes that a slow saddle: a query
      cannot learn to pick an object's patch until the patch's value says where it is,
      and vice versa. So each token is `[c, c * P]` (+ the learned embedding): a nonlinear
      content code `c` of the patch pixels (a small MLP) next to the same code modulated
      by a fixed 2-D sin/cos code `P` of the patch position. Object position is then
      linearly readable even from an unselective average (background patches add a
      constant). Single-object grounding on a small model leaves its plateau ~1.5x
      sooner (probe numbers in the closing note of issue 4).
    * `"conv"` (the `shapes` preset): the same `[c, c * P]` tokens, with `c` from a small
      CNN (`conv_stem`) whose cells see a whole object, so its shape is readable; a patch
      on its own holds only an edge or a corner of a shape.
    """

    def __init__(self, config: LavidaConfig):
        super().__init__()
        p, ve = config.vision_patch_size, config.vision_hidden_size
        self.patch_size = p
        self.modulated = config.vision_stem == "modulated"
        self.conv = config.vision_stem == "conv"
        if self.conv:
            self.stem = conv_stem(p, ve // 2)
            self.grid_side = config.image_size // p
        elif self.modulated:
            self.stem = nn.Sequential(batch_invariant.Linear(3 * p * p, 2 * ve), nn.GELU(),
                                      batch_invariant.Linear(2 * ve, ve // 2))
            # Fixed, so not a parameter or buffer: computed on the fly (64 x ve/2 values),
            # which also keeps meta-device construction in `from_pretrained` simple.
            self.grid_side = config.image_size // p
        else:
            self.patch_embed = batch_invariant.Linear(3 * p * p, ve)
        self.pos_embed = nn.Parameter(torch.zeros(config.vision_tokens_per_image, ve))
        layer = nn.TransformerEncoderLayer(
            ve, config.vision_heads, dim_feedforward=4 * ve, dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True,
        )  # fmt: skip
        self.layers = nn.ModuleList([_clone(layer) for _ in range(config.vision_layers)])
        self.norm = nn.LayerNorm(ve)
        self.projector = nn.Sequential(
            batch_invariant.Linear(ve, config.hidden_size), nn.GELU(),
            batch_invariant.Linear(config.hidden_size, config.hidden_size),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values (V, 3, H, W) in [0, 1] -> (V, T, d) with T = (H / p) * (W / p)
        p = self.patch_size
        # the encoder's own dtype (a pipeline loaded in bf16 / fp16 gets fp32 pixels)
        x = (pixel_values.to(next(self.parameters()).dtype) - 0.5) / 0.5
        V, C, Hh, W = x.shape
        if self.conv:
            content = self.stem(x).flatten(2).transpose(1, 2)  # (V, T, ve / 2), raster order
        else:
            x = x.unfold(2, p, p).unfold(3, p, p)  # (V, C, H/p, W/p, p, p)
            x = x.permute(0, 2, 3, 1, 4, 5).reshape(V, (Hh // p) * (W // p), C * p * p)
            if not self.modulated:
                return self._encode(self.patch_embed(x))
            content = self.stem(x)  # (V, T, ve / 2)
        code = sincos_2d(self.grid_side, content.shape[-1]).to(content.device, content.dtype)
        return self._encode(torch.cat([content, content * code], dim=-1))

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        return self.projector(self.norm(x))


def conv_stem(patch: int, out: int, width: int = 32) -> nn.Sequential:
    """A small CNN from pixels to one feature per `patch x patch` cell.

    3x3 convolutions, one stride-2 step per halving (`log2(patch)` of them) between a
    full-resolution first layer and a last layer at cell resolution: for patch 8 the
    receptive field of a cell is 33 px, so every cell of an object (10-24 px in
    ShapesWorld) sees its whole silhouette. A patch-local MLP (`"modulated"`) sees only the
    8 x 8 corner or edge of a shape and leaves shape to the transformer layers, which did
    not learn it (a linear probe read the shape of the object under a patch 33% of the
    time, chance 25%; issue 4 notes).
    """
    halvings = patch.bit_length() - 1
    if patch != 1 << halvings:
        raise ValueError(f"vision_stem='conv' needs a power-of-two vision_patch_size, got {patch}")
    layers: list[nn.Module] = [batch_invariant.Conv2d(3, width, 3, padding=1), nn.GELU()]
    c = width
    for _ in range(halvings):
        nxt = min(4 * width, c * 2)
        layers += [batch_invariant.Conv2d(c, nxt, 3, stride=2, padding=1), nn.GELU()]
        c = nxt
    layers += [batch_invariant.Conv2d(c, c, 3, padding=1), nn.GELU(), batch_invariant.Conv2d(c, out, 1)]
    return nn.Sequential(*layers)


def _clone(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


class LavidaImageEmbedding(nn.Module):
    """VQ codes (S, G, G) -> compressed gen-branch inputs (S, P, dg) [FACTS §1.4]."""

    def __init__(self, config: LavidaConfig):
        super().__init__()
        dg, c = config.gen_hidden_size, config.compression
        self.code_embed = nn.Embedding(config.codebook_size + 1, dg)  # + the mask code
        self.down_norm = LavidaRMSNorm(dg, config.rms_norm_eps)
        self.down = nn.Conv2d(dg, dg, kernel_size=c, stride=c, bias=False)
        self.pos_embed = nn.Parameter(torch.zeros(config.positions_per_image, dg))
        if config.loc_code_dim:
            # where each position's centre is, in the `<LOC_i>` tokens' code (x then y);
            # projected from zero, so weights trained without it load unchanged
            self.code_args = (config.image_grid // c, config.image_size, config.loc_code_dim, config.num_loc_tokens)
            self.pos_code_proj = batch_invariant.Linear(2 * config.loc_code_dim, dg, bias=False)
        self.out_norm = LavidaRMSNorm(dg, config.rms_norm_eps)
        self.out_proj = batch_invariant.Linear(dg, dg, bias=False)
        if config.plan_layout:
            # plan items drawn onto the code grid (see `layout`); both from zero, so weights
            # trained without them load into the same function
            self.layout_label = batch_invariant.Linear(config.hidden_size, dg, bias=False)
            self.layout_geom = batch_invariant.Linear(4 * LAYOUT_CODE_DIM, dg, bias=False)
            self.layout_args = (config.image_grid, config.image_size, config.num_loc_tokens)

    def layout(self, slots: torch.Tensor, labels: torch.Tensor, bins: torch.Tensor, num_slots: int,
               word_table: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Plan items drawn onto the VQ grid: `(num_slots, G, G, dg)`.

        Item `i` (in slot `slots[i]`, label word ids `labels[i]` padded with -1, LOC bins
        `bins[i]` = x0, y0, x1, y1) adds, at every cell its box touches, a projection of
        its label (the mean of its words' rows of `word_table`) plus one of the signed
        pixel offsets from the cell's centre to the four box edges (`coordinate_code`).
        The cells then know what to draw and where inside the object they are: a local
        rule, instead of a box-containment test composed by attention over four tokens.
        """
        G, image_size, num_loc = self.layout_args
        cell = image_size / G
        box = bins.float() * (image_size / (num_loc - 1))  # (n, 4) pixels
        centre = (torch.arange(G, device=box.device, dtype=box.dtype) + 0.5) * cell  # (G,)
        # touches: the cell's [j*cell, (j+1)*cell) span meets the box grown by 1 px
        lo, hi = centre - cell / 2, centre + cell / 2
        in_x = (hi[None] > box[:, 0:1] - 1) & (lo[None] < box[:, 2:3] + 1)  # (n, G) columns
        in_y = (hi[None] > box[:, 1:2] - 1) & (lo[None] < box[:, 3:4] + 1)  # (n, G) rows
        cover = (in_y[:, :, None] & in_x[:, None, :]).to(box.dtype)  # (n, G, G)
        dx = centre[None] - box[:, [0, 2], None]  # (n, 2, G): to x0, to x1
        dy = centre[None] - box[:, [1, 3], None]
        code = lambda v: coordinate_code(v, LAYOUT_CODE_DIM, image_size)  # noqa: E731
        cx = code(dx).permute(0, 2, 1, 3).flatten(2)  # (n, G, 2 * C)
        cy = code(dy).permute(0, 2, 1, 3).flatten(2)
        geom = torch.cat([cy[:, :, None].expand(-1, -1, G, -1), cx[:, None].expand(-1, G, -1, -1)], -1)
        known = (labels >= 0).to(box.dtype)  # (n, W)
        words = word_table[labels.clamp(min=0)] * known[..., None]  # (n, W, d)
        label = words.sum(1) / known.sum(1, keepdim=True).clamp(min=1)
        feats = self.layout_label(label.to(word_table.dtype))[:, None, None] + self.layout_geom(geom.to(word_table.dtype))
        feats = feats * cover[..., None].to(feats.dtype)
        out = feats.new_zeros(num_slots, G, G, feats.shape[-1])
        return out.index_add(0, slots, feats)

    def forward(self, codes: torch.Tensor, layout: torch.Tensor | None = None) -> torch.Tensor:
        x = self.down_norm(self.code_embed(codes))  # (S, G, G, dg)
        if layout is not None:
            x = x + layout.to(x.dtype)
        # `down` (kernel = stride = c) as the linear map it is on each c x c patch: a matmul
        # computes every image alike in any batch, where the conv kernel does not (oneDNN).
        S, G, _, dg = x.shape
        c, n = self.down.stride[0], G // self.down.stride[0]
        patches = x.view(S, n, c, n, c, dg).permute(0, 1, 3, 5, 2, 4).reshape(S, n * n, dg * c * c)
        x = batch_invariant.linear(patches, self.down.weight.flatten(1)) + self.pos_embed  # (S, P, dg), raster order
        if hasattr(self, "pos_code_proj"):
            x = x + self.pos_code_proj(grid_code(*self.code_args).to(x.device, x.dtype))
        return self.out_proj(self.out_norm(x))


class LavidaImageHead(nn.Module):
    """Gen final states (S, P, dg) -> code logits (S, G, G, K): expand 2x2, then classify.

    With `config.image_copy`, a cell whose image has a source (an edit's) may copy the
    source's code at the same cell: `copy_gate`, read from the cell's features, is added to
    that code's logit. It starts at zero, so a head trained without it loads unchanged.
    """

    def __init__(self, config: LavidaConfig):
        super().__init__()
        dg, c = config.gen_hidden_size, config.compression
        self.side = config.image_grid // c
        self.up = nn.ConvTranspose2d(dg, dg, kernel_size=c, stride=c, bias=False)
        self.norm = LavidaRMSNorm(dg, config.rms_norm_eps)
        self.proj = batch_invariant.Linear(dg, dg, bias=False)
        self.classifier = batch_invariant.Linear(dg, config.codebook_size, bias=False)
        if config.image_copy:
            self.copy_gate = batch_invariant.Linear(dg, 1)

    def forward(
        self, h: torch.Tensor, select: torch.Tensor | None = None, source: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits `(S, G, G, K)`, or `(n, K)` at the `True` cells of `select` `(S, G, G)`.

        `source` `(S, G, G)`: per cell, the code the copy gate may copy (-1: none); read
        only with `image_copy`.
        """
        S, P, dg = h.shape
        # `up` (kernel = stride = c) as the linear map it is: each position -> its c x c
        # cells (a matmul: every image computed alike in any batch, see `down`)
        n, c = self.side, self.up.stride[0]
        w = self.up.weight.flatten(1).t()  # (dg_out * c * c, dg_in)
        x = batch_invariant.linear(h, w).view(S, n, n, dg, c, c).permute(0, 1, 4, 2, 5, 3).reshape(S, n * c, n * c, dg)
        if select is not None:
            x = x[select]  # (n, dg): only the cells a loss is taken on
        x = F.silu(self.proj(self.norm(x)))
        logits = self.classifier(x)
        if source is not None and hasattr(self, "copy_gate"):
            src = source if select is None else source[select]
            gate = self.copy_gate(x).squeeze(-1) * (src >= 0).to(x.dtype)
            logits = logits.scatter_add(-1, src.clamp(min=0).unsqueeze(-1), gate.unsqueeze(-1).to(logits.dtype))
        return logits


# ----------------------------------------------------------------------------- outputs


@dataclass
class ConditionCache:
    """Keys/values of a condition prefix, computed once and reused at every step.

    Attributes:
        key_values: per layer `(k, v)`, each `(B, H, Lc, head_dim)` after RoPE.
        valid: `(B, Lc)` bool, False at padding.
        is_gen: `(B, Lc)` bool, gen-branch positions.
        segment_ids: `(B, Lc)` long.
        elastic: whether und rows skipped the split layers (then only gen targets may use it).
        plan_items: per row, the plan items of the prefix (`plan_items_in`), for a model with
            `plan_layout`; None otherwise.
        copy_sources: for a model with a copy head (and a non-elastic pass), the prefix's
            copy keys `(B, Lc, copy_dim)`, token ids `(B, Lc)` and which of them may be
            copied `(B, Lc)` bool; None otherwise.
        pool_sources: for a model with `condition_pool`, the prefix's token ids `(B, Lc)` and
            which of them the pool reads `(B, Lc)` bool; None otherwise.
        source_codes: for a model with `image_copy`, each row's edit source codes `(B, G, G)`
            (-1 where a row has none, or its source is masked); None otherwise.
    """

    key_values: list[tuple[torch.Tensor, torch.Tensor]]
    valid: torch.Tensor
    is_gen: torch.Tensor
    segment_ids: torch.Tensor
    elastic: bool = False
    plan_items: list | None = None
    copy_sources: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    pool_sources: tuple[torch.Tensor, torch.Tensor] | None = None
    source_codes: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def repeat_interleave(self, n: int) -> ConditionCache:
        """The cache with every row repeated `n` times (e.g. for several samples per prompt)."""
        rep = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
        return ConditionCache(
            [(rep(k), rep(v)) for k, v in self.key_values], rep(self.valid), rep(self.is_gen),
            rep(self.segment_ids), self.elastic,
            None if self.plan_items is None else [row for row in self.plan_items for _ in range(n)],
            None if self.copy_sources is None else tuple(rep(t) for t in self.copy_sources),
            None if self.pool_sources is None else tuple(rep(t) for t in self.pool_sources),
            None if self.source_codes is None else rep(self.source_codes),
        )  # fmt: skip


@dataclass
class LavidaOutput:
    """Output of `LavidaForMaskedDiffusion.forward`.

    Attributes:
        loss: text + image masked-diffusion loss when labels are given.
        text_logits: `(B, L, V)`; zeros at gen positions; None under elastic activation
            and when labels are given (training computes logits only where labels are).
        image_logits: `(M, G, G, K)` for every `img_gen` slot in order of appearance
            (None when labels are given).
        cache: the condition cache when `use_cache=True`.
        text_loss, image_loss: the two terms (detached), for logging.
    """

    loss: torch.Tensor | None = None
    text_logits: torch.Tensor | None = None
    image_logits: torch.Tensor | None = None
    cache: ConditionCache | None = None
    text_loss: torch.Tensor | None = None
    image_loss: torch.Tensor | None = None


# ----------------------------------------------------------------------------- model


class LavidaPreTrainedModel(PreTrainedModel):
    config_class = LavidaConfig
    base_model_prefix = "model"
    _no_split_modules = ["LavidaDecoderLayer"]
    # Parameters that start at zero: weights saved without them load into the same function.
    # (The copy head's query and key are not zero, but its gate is, which silences it.)
    fresh_at_zero = ("loc_in.", "loc_out.", "image_embed.pos_code_proj.", "image_embed.layout_", "copy_", "pool_",
                     "image_head.copy_gate.")
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Conv2d):  # the conv vision stem: He init, or a deep stack starts dead
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.ConvTranspose2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # Text tokens start at unit scale, not `std`: at 0.02 a token's own embedding is
            # ~7% of its residual after one attention layer, and a from-scratch planner did
            # not learn to copy the prompt's words in 300 steps (P(shape) 0.25 = chance);
            # at 1.0, P(shape) 0.44 at step 300, 0.87 at 500, and colour started to copy.
            # (Gemma multiplies its embeddings by sqrt(d) for the same reason.)
            text = module is getattr(self, "embed_tokens", None)
            nn.init.normal_(module.weight, mean=0.0, std=1.0 if text else std)
        elif isinstance(module, (LavidaRMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (LavidaImageEmbedding, LavidaVisionEncoder)):
            nn.init.normal_(module.pos_embed, mean=0.0, std=std)
        if any(module is getattr(owner, name, None) for owner, name in (
                (self, "loc_in"), (self, "loc_out"), (getattr(self, "image_embed", None), "pos_code_proj"),
                (getattr(self, "image_embed", None), "layout_label"),
                (getattr(self, "image_embed", None), "layout_geom"), (self, "copy_gate"),
                (getattr(self, "image_head", None), "copy_gate"),
                (self, "pool_und"), (self, "pool_gen"))):  # fmt: skip
            nn.init.zeros_(module.weight)
        if module is getattr(self, "copy_query", None) or module is getattr(self, "copy_key", None):
            nn.init.normal_(module.weight, mean=0.0, std=1.0 / math.sqrt(module.in_features))
        if isinstance(module, LavidaDecoderLayer):
            # Attention projections at fan-in scale (1 / sqrt(in)), not `std`: with two
            # 0.02-scale factors in every score (W_q, W_k) and every value path (W_v, o_proj)
            # attention starts uniform and leaves that saddle slowly, which a model trained
            # for a few thousand steps cannot afford. Measured on single-object grounding:
            # the loss leaves its plateau after ~200 instead of ~450 steps (issue 4 notes).
            for lin in (module.q_proj, module.k_proj, module.v_proj, module.o_proj,
                        module.q_proj_gen, module.k_proj_gen, module.v_proj_gen):  # fmt: skip
                nn.init.normal_(lin.weight, mean=0.0, std=1.0 / math.sqrt(lin.in_features))
            # GPT-2 style: scale the MLP residual projections by 1/sqrt(2 * num_layers)
            scale = std / math.sqrt(2 * self.config.num_layers)
            for lin in (module.mlp.down_proj, module.mlp_gen.down_proj):
                nn.init.normal_(lin.weight, mean=0.0, std=scale)


class LavidaForMaskedDiffusion(LavidaPreTrainedModel):
    """Elastic-MoT masked-diffusion model with text (LM) and image-code heads.

    Example:
        >>> config = LavidaConfig(**PRESETS["tiny"])
        >>> model = LavidaForMaskedDiffusion(config)
        >>> out = model(input_ids, gen_codes=codes, segment_ids=segments)
    """

    def __init__(self, config: LavidaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.image_embed = LavidaImageEmbedding(config)
        self.vision = LavidaVisionEncoder(config)
        self.layers = nn.ModuleList(LavidaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = LavidaRMSNorm(config.hidden_size, config.rms_norm_eps)  # shared final norm
        self.lm_head = batch_invariant.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.loc_code_dim:
            # Location structure shared by the 65 `<LOC_i>` rows (zero at init, so weights
            # trained without it load unchanged): input += loc_in(code_i), logit += h . loc_out(code_i)
            self.loc_in = batch_invariant.Linear(config.loc_code_dim, config.hidden_size, bias=False)
            self.loc_out = batch_invariant.Linear(config.loc_code_dim, config.hidden_size, bias=False)
        if config.copy_dim:
            # copy a condition token (see `_copy_logits`); the gate starts at zero
            self.copy_query = batch_invariant.Linear(config.hidden_size, config.copy_dim, bias=False)
            self.copy_key = batch_invariant.Linear(config.hidden_size, config.copy_dim, bias=False)
            self.copy_gate = batch_invariant.Linear(config.hidden_size, 1)
        if config.condition_pool:
            # the mean embedding of the condition's words, into each branch (see `_condition_pool`)
            self.pool_und = batch_invariant.Linear(config.hidden_size, config.hidden_size, bias=False)
            self.pool_gen = batch_invariant.Linear(config.hidden_size, config.gen_hidden_size, bias=False)
        self.image_head = LavidaImageHead(config)
        self.rotary = LavidaRotaryEmbedding(config.head_dim, config.rope_theta)
        self.post_init()

    # -------------------------------------------------------------- input packing

    def _check_slots(self, flags: torch.Tensor, count: int, name: str, what: str) -> None:
        P = self.config.positions_per_image if name == "gen_codes" else self.config.vision_tokens_per_image
        n = int(flags.sum())
        if n != count * P:
            raise ValueError(
                f"{n} {what} placeholder positions but {name} holds {count} images "
                f"({count} x {P} = {count * P} positions expected)"
            )

    def embed(
        self,
        input_ids: torch.Tensor,
        gen_codes: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        row_items: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed a packed batch into per-branch rows.

        Returns `h_und (Nu, d)`, `h_gen (Ng, dg)`, `und_idx`, `gen_idx` (indices into the
        flattened `(B * L)` sequence) and `gen_is_target (Ng,)` marking `img_gen` rows.
        """
        cfg = self.config
        ids = input_ids.reshape(-1)
        is_tgt = ids == cfg.img_gen_token_id
        is_gen = is_tgt | (ids == cfg.img_src_token_id)
        is_enc = ids == cfg.img_enc_token_id
        und_idx = (~is_gen).nonzero().squeeze(1)
        gen_idx = is_gen.nonzero().squeeze(1)

        n_codes = 0 if gen_codes is None else gen_codes.shape[0]
        self._check_slots(is_gen, n_codes, "gen_codes", "img_gen/img_src")
        n_views = 0 if pixel_values is None else pixel_values.shape[0]
        self._check_slots(is_enc, n_views, "pixel_values", "img_enc")

        # und rows: token embeddings, with vision features written over img_enc positions
        h = F.embedding(ids[und_idx], self._with_loc_code(self.embed_tokens.weight, "loc_in"))  # (Nu, d)
        if n_views:
            feats = self.vision(pixel_values).reshape(-1, cfg.hidden_size)
            enc_rows = is_enc[und_idx].nonzero().squeeze(1)
            h = h.index_copy(0, enc_rows, feats.to(h.dtype))
        if n_codes:
            layout = self._layout(input_ids, gen_idx, is_tgt[gen_idx], n_codes, row_items)
            h_gen = self.image_embed(gen_codes, layout).reshape(-1, cfg.gen_hidden_size)  # (Ng, dg)
        else:
            h_gen = h.new_zeros(0, cfg.gen_hidden_size)
        return h, h_gen, und_idx, gen_idx, is_tgt[gen_idx]

    def _row_items(self, input_ids: torch.Tensor, cache: ConditionCache | None, use_cache: bool) -> list | None:
        """Per row, the visible plan items of the prefix (cache) and of `input_ids`.

        Parsed only where they are read: a pass with images to generate, or a prefix whose
        cache will serve one (text and grounding passes skip the Python scan).
        """
        cfg = self.config
        if not cfg.plan_layout or not (use_cache or bool((input_ids == cfg.img_gen_token_id).any())):
            return None if cache is None else cache.plan_items
        rows = [plan_items_in(r, self.config) for r in input_ids.tolist()]
        if cache is not None and cache.plan_items is not None:
            rows = [before + now for before, now in zip(cache.plan_items, rows)]
        return rows

    def _layout(self, input_ids: torch.Tensor, gen_idx: torch.Tensor, gen_is_target: torch.Tensor,
                n_codes: int, row_items: list | None) -> torch.Tensor | None:  # fmt: skip
        """The plan layout of every gen slot `(S, G, G, dg)`: a target slot gets its row's items."""
        if not row_items or not any(row_items):
            return None
        P, L = self.config.positions_per_image, input_ids.shape[1]
        starts = gen_idx[::P]  # the first position of each slot, in (B * L) order
        slot_row = (starts // L).tolist()
        slots, labels, bins = [], [], []
        for k, (row, target) in enumerate(zip(slot_row, gen_is_target[::P].tolist())):
            for label, box in row_items[row] if target else ():
                slots.append(k)
                label = label[:4]  # plan labels have 1 (`removed`) to 3 words
                labels.append(label + [-1] * (4 - len(label)))
                bins.append(box)
        if not slots:
            return None
        device = input_ids.device
        return self.image_embed.layout(
            torch.tensor(slots, device=device), torch.tensor(labels, device=device),
            torch.tensor(bins, device=device), n_codes, self.embed_tokens.weight,
        )  # fmt: skip

    def _with_loc_code(self, weight: torch.Tensor, which: str) -> torch.Tensor:
        """`weight` (V, d) with the projected location code added to the `<LOC_i>` rows."""
        if not self.config.loc_code_dim:
            return weight
        cfg = self.config
        code = loc_code_table(cfg.num_loc_tokens, cfg.loc_code_dim).to(weight.device, weight.dtype)
        rows = getattr(self, which)(code)  # (num_loc, d)
        start = cfg.loc_token_offset
        return torch.cat([weight[:start], weight[start : start + len(rows)] + rows, weight[start + len(rows) :]])

    def text_only_parameter_names(self) -> list[str]:
        """The parameters that only text outputs read; no image the model draws depends on them.

        They are the und sets of the split layers (`>= joint_layers`: after the joint layers
        no image position attends to a text one, so image codes only ever read the joint
        layers' keys/values of their conditions), the LM head with its location read-out, and
        the copy head. The split layers' shared output projections and the shared final norm
        are left out (gen reads their first `gen_hidden_size` rows). Training only these
        (`TrainConfig.trainable="understanding"`) changes the answers, boxes, verdicts and plans
        and leaves every image drawn from a given prompt, plan or source bit-identical.
        """
        own = ("attn_norm.", "q_proj.", "k_proj.", "v_proj.", "mlp_norm.", "mlp.")
        names = [f"layers.{i}.{name}" for i in range(self.config.joint_layers, self.config.num_layers)
                 for name, _ in self.layers[i].named_parameters() if name.startswith(own)]  # fmt: skip
        return names + [name for name, _ in self.named_parameters() if name.startswith(("lm_head.", "loc_out.", "copy_"))]

    def image_only_parameter_names(self) -> list[str]:
        """The parameters only image positions read: the gen sets of every layer, the image
        embedding (codes, positions, plan layout) and the image head.

        A text position reads an image position only when an `img_src` source comes before
        it (an edit's plan), through the joint layers' gen keys and values; every other text
        output (answers, boxes, verdicts, t2i plans) has no image position before it, so
        training only these (`TrainConfig.trainable="generation"`) changes the images drawn
        and the edit plans and leaves the rest bit-identical. The shared output projections,
        the final norm and the token embedding (gen reads plan labels from it) are left out.
        """
        return [name for name, _ in self.named_parameters()
                if "_gen." in name or name.startswith(("image_embed.", "image_head.", "pool_gen."))]  # fmt: skip

    def _lm_head_weight(self) -> torch.Tensor:
        return self._with_loc_code(self.lm_head.weight, "loc_out")

    def copyable(self, ids: torch.Tensor) -> torch.Tensor:
        """Which token ids the copy head may copy: all but padding, [MASK], [EOS] and image
        placeholders. (Computed, not a buffer: `from_pretrained` builds the model on the
        meta device, and a non-persistent buffer then holds uninitialised memory.)"""
        c = self.config
        never = torch.tensor([c.pad_token_id, c.mask_token_id, c.eos_token_id, c.img_gen_token_id,
                              c.img_src_token_id, c.img_enc_token_id], device=ids.device)  # fmt: skip
        return ~torch.isin(ids, never)

    def _copy_logits(
        self,
        hn: torch.Tensor,
        und_idx: torch.Tensor,
        input_ids: torch.Tensor,
        seg: torch.Tensor,
        valid: torch.Tensor,
        cache: ConditionCache | None,
        groups: RowGroups = UNPADDED,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The copy head: logits `(B * L, V)` to add to the LM head's, and this pass's sources.

        A text position attends from its final (normed) hidden state `hn` to those of the
        text tokens of earlier segments (its conditions: in the cache and in this pass;
        never padding, [MASK], [EOS] or image placeholders); the attention, summed per token
        id, times a gate read from the same state, is its copy bonus. A position with no
        earlier text gets none. This is the pointer of pointer-generator networks (See et
        al., 2017) in additive form, so a zero gate leaves the model exactly as it was.
        """
        B, L = input_ids.shape
        V = self.config.vocab_size
        full = hn.new_zeros(B * L, hn.shape[-1]).index_copy(0, und_idx, hn).view(B, L, -1)
        keys = self.copy_key(full)  # (B, L, dc)
        src = valid & self.copyable(input_ids)  # gen positions hold image placeholders: never sources
        k_keys, k_ids, k_src, k_seg = keys, input_ids, src, seg
        if cache is not None and cache.copy_sources is not None:
            c_keys, c_ids, c_src = cache.copy_sources
            k_keys, k_ids = torch.cat([c_keys.to(keys.dtype), keys], 1), torch.cat([c_ids, input_ids], 1)
            k_src, k_seg = torch.cat([c_src, src], 1), torch.cat([cache.segment_ids, seg], 1)
        queries = self.copy_query(full)
        allowed = k_src[:, None, :] & (k_seg[:, None, :] < seg[:, :, None])  # (B, L, Lk)

        def copy(r, q0: int, k0: int) -> torch.Tensor:  # (rows, L - q0, V): attention per token id
            ok = allowed[r, q0:, k0:]
            has = ok.any(-1, keepdim=True)
            scores = queries[r, q0:] @ k_keys[r, k0:].transpose(1, 2) / math.sqrt(keys.shape[-1])
            scores = scores.masked_fill(~ok, float("-inf")).masked_fill(~has, 0.0)
            attn = torch.softmax(scores.float(), -1) * has
            ids = k_ids[r, k0:][:, None, :].expand(-1, attn.shape[1], -1)
            return attn.new_zeros(*attn.shape[:2], V).scatter_add_(2, ids, attn)

        vocab = by_content(groups, copy, lambda: queries.new_zeros(B, L, V, dtype=torch.float32))
        bonus = self.copy_gate(full).float() * vocab
        return bonus.view(B * L, V), (keys, input_ids, src)

    def _source_codes(self, B: int, L: int, gen_codes: torch.Tensor | None, gen_idx: torch.Tensor,
                      gen_is_target: torch.Tensor, cache: ConditionCache | None) -> torch.Tensor:  # fmt: skip
        """Each row's edit source codes `(B, G, G)` for the image copy path: the row's
        `img_src` slot in this pass, else the cache's; -1 where a row has none or its source
        is masked (a guidance row without the source)."""
        cfg = self.config
        G = cfg.image_grid
        if cache is not None and cache.source_codes is not None:
            out = cache.source_codes.clone()
        else:
            out = torch.full((B, G, G), -1, dtype=torch.long, device=gen_idx.device)
        if gen_codes is not None and gen_idx.numel():
            P = cfg.positions_per_image
            sources = (~gen_is_target[::P]).nonzero().squeeze(1)
            out[gen_idx[::P][sources] // L] = gen_codes[sources].to(out.device)
        return out.masked_fill((out < 0) | (out >= cfg.codebook_size), -1)

    def _condition_pool(
        self, input_ids: torch.Tensor, seg: torch.Tensor, valid: torch.Tensor, cache: ConditionCache | None,
        groups: RowGroups = UNPADDED,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The condition pool `(B * L, d)`: per position, the mean input embedding of the
        text tokens of earlier segments, scaled to unit RMS (in the cache and in this pass; the copy head's
        sources: never padding, [MASK], [EOS] or image placeholders), zero where there are
        none; and this pass's sources, for a cache.

        A bag of words: every slot gets the prompt's relation, colours and shapes one linear
        map away, with no attention to learn first (`LavidaConfig.condition_pool`).
        """
        src = valid & self.copyable(input_ids)
        k_ids, k_src, k_seg = input_ids, src, seg
        if cache is not None and cache.pool_sources is not None:
            c_ids, c_src = cache.pool_sources
            k_ids, k_src = torch.cat([c_ids, input_ids], 1), torch.cat([c_src, src], 1)
            k_seg = torch.cat([cache.segment_ids, seg], 1)
        table = self.embed_tokens.weight
        allowed = (k_src[:, None, :] & (k_seg[:, None, :] < seg[:, :, None])).to(table.dtype)  # (B, L, Lk)
        words = F.embedding(k_ids, table)
        pool = by_content(groups, lambda r, q0, k0: allowed[r, q0:, k0:] @ words[r, k0:],
                          lambda: words.new_zeros(*seg.shape, table.shape[1]))  # (B, L, d): sums; zero where nothing is earlier
        # unit RMS (a mean of n words has norm ~1/sqrt(n) of a word's, too small to learn from soon)
        pool = pool * torch.rsqrt(pool.pow(2).mean(-1, keepdim=True) + 1e-6)
        return pool.reshape(-1, table.shape[1]), (input_ids, src)

    def _attention_masks(
        self,
        q_valid: torch.Tensor,
        q_gen: torch.Tensor,
        q_seg: torch.Tensor,
        k_valid: torch.Tensor,
        k_gen: torch.Tensor,
        k_seg: torch.Tensor,
        offset: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks `(B, 1, Lq, Lk)` for joint and split layers."""
        allowed = k_valid[:, None, :].expand(-1, q_valid.shape[1], -1)
        if self.config.attention_mode == "one_way":
            allowed = allowed & (k_seg[:, None, :] <= q_seg[:, :, None])
        split = allowed & (k_gen[:, None, :] == q_gen[:, :, None])
        # Every query may attend to itself, so no row is fully masked (no NaN from padding).
        Lq = q_valid.shape[1]
        eye = torch.zeros(Lq, k_valid.shape[1], dtype=torch.bool, device=q_valid.device)
        eye[torch.arange(Lq), offset + torch.arange(Lq)] = True
        return (allowed | eye)[:, None], (split | eye)[:, None]

    # -------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor,
        gen_codes: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        condition_cache: ConditionCache | None = None,
        use_cache: bool = False,
        elastic: bool = False,
        labels: torch.Tensor | None = None,
        image_labels: torch.Tensor | None = None,
        eos_loss_weight: float = 1.0,
        image_weights: torch.Tensor | None = None,
    ) -> LavidaOutput:
        """Run the model on a packed batch.

        Args:
            input_ids: `(B, L)` token ids with placeholder ids at image positions.
            gen_codes: `(S, G, G)` VQ codes (mask code at masked positions) for every
                `img_gen`/`img_src` run, in order of appearance.
            pixel_values: `(V, 3, H, W)` in [0, 1] for every `img_enc` run.
            segment_ids: `(B, L)`; with one-way attention a position sees only segments
                `<=` its own. Defaults to zeros.
            attention_mask: `(B, L)` bool/int, 0 at padding. Defaults to all ones.
            condition_cache: keys/values of a condition prefix; `input_ids` then holds
                only the positions after it (their RoPE positions continue the prefix).
            use_cache: return this pass's keys/values as a `ConditionCache`.
            elastic: skip und rows in layers `>= joint_layers` (image outputs only).
            labels: `(B, L)` text targets, -100 where no loss is taken.
            image_labels: `(M, G, G)` code targets for the `img_gen` slots, -100 elsewhere.
            eos_loss_weight: weight of [EOS] text targets in the loss (1 = plain mean). The
                [EOS] padding of fixed-length answers is easy and plentiful; down-weighting it
                keeps the answer tokens' signal from being drowned.
            image_weights: `(M, G, G)` weight of each code target in the image loss, which is
                then `sum(w * ce) / n` over the n labelled codes (so weights that average 1
                over a row's labelled codes keep its share of the loss); None: plain mean.
        """
        cfg = self.config
        B, L = input_ids.shape
        device = input_ids.device
        seg = torch.zeros_like(input_ids) if segment_ids is None else segment_ids
        valid = (
            torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask.bool()
        )
        if condition_cache is not None and cfg.attention_mode != "one_way":
            raise ValueError("condition_cache needs attention_mode='one_way' to be exact")
        if condition_cache is not None and condition_cache.elastic and not elastic:
            raise ValueError("an elastic condition cache can only serve elastic (image-only) passes")

        k_valid = valid if condition_cache is None else torch.cat([condition_cache.valid, valid], 1)
        groups = content_groups(valid, k_valid)
        row_items = self._row_items(input_ids, condition_cache, use_cache)
        h_und, h_gen, und_idx, gen_idx, gen_is_target = self.embed(input_ids, gen_codes, pixel_values, row_items)
        pool_sources = None
        if cfg.condition_pool:
            pool, pool_sources = self._condition_pool(input_ids, seg, valid, condition_cache, groups)
            if und_idx.numel():
                h_und = h_und + self.pool_und(pool[und_idx].to(h_und.dtype))
            if gen_idx.numel():
                h_gen = h_gen + self.pool_gen(pool[gen_idx].to(h_gen.dtype))
        is_gen = torch.zeros(B * L, dtype=torch.bool, device=device)
        is_gen[gen_idx] = True
        is_gen = is_gen.view(B, L)

        # Positions count from each row's first valid one, so left padding moves none of
        # them (RoPE is relative, but its rounding is not).
        offset = 0 if condition_cache is None else condition_cache.length
        position_ids = offset + torch.arange(L, device=device) - leading_padding(k_valid)[:, None]
        rope = self.rotary(position_ids)
        if condition_cache is None:
            k_gen, k_seg = is_gen, seg
        else:
            c = condition_cache
            k_gen = torch.cat([c.is_gen, is_gen], 1)
            k_seg = torch.cat([c.segment_ids, seg], 1)
        mask_joint, mask_split = self._attention_masks(valid, is_gen, seg, k_valid, k_gen, k_seg, offset)

        presents = []
        for i, layer in enumerate(self.layers):
            past = None if condition_cache is None else condition_cache.key_values[i]
            skip_und = elastic and not layer.is_joint
            h_und, h_gen, present = layer(
                h_und, h_gen, und_idx, gen_idx, (B, L), rope,
                mask_joint if layer.is_joint else mask_split, past, skip_und, groups,
            )  # fmt: skip
            if use_cache:
                presents.append(present)

        out = LavidaOutput()
        copy_bonus = copy_sources = hn = None  # hn: the normed und rows, when all are needed
        if cfg.copy_dim and not elastic and (labels is None or bool((labels != -100).any())):
            hn = self.norm(h_und)
            copy_bonus, copy_sources = self._copy_logits(hn, und_idx, input_ids, seg, valid, condition_cache, groups)
        source_codes = None
        if cfg.image_copy:
            source_codes = self._source_codes(B, L, gen_codes, gen_idx, gen_is_target, condition_cache)
        if use_cache:
            out.cache = ConditionCache(presents, valid, is_gen, seg, elastic=elastic, plan_items=row_items,
                                       copy_sources=copy_sources, pool_sources=pool_sources,
                                       source_codes=source_codes)  # fmt: skip

        # Heads. With labels (training) logits are computed only where a label is, and
        # returned as None: a (B, L, V) text tensor and (M, G, G, K) image tensor would cost
        # more than the loss itself. The shared final norm gives gen its first dg weights.
        P, dg = cfg.positions_per_image, cfg.gen_hidden_size
        has_target = bool(gen_is_target.any())
        h_tgt = tgt_source = None
        if has_target:
            h_tgt = self.norm(h_gen[gen_is_target], weight=self.norm.weight[:dg]).view(-1, P, dg)
            if source_codes is not None:  # each target slot copies from its row's source
                tgt_source = source_codes[gen_idx[gen_is_target][::P] // L]
        if labels is None and image_labels is None:
            if not elastic:
                text_logits = batch_invariant.linear(self.norm(h_und) if hn is None else hn, self._lm_head_weight())  # (Nu, V)
                if copy_bonus is not None:
                    text_logits = text_logits + copy_bonus[und_idx].to(text_logits.dtype)
                full = text_logits.new_zeros(B * L, cfg.vocab_size)
                out.text_logits = full.index_copy(0, und_idx, text_logits).view(B, L, -1)
            if has_target:
                out.image_logits = self.image_head(h_tgt, source=tgt_source)
            return out

        zero = h_gen.new_zeros(())
        text_loss = image_loss = zero
        if labels is not None and not elastic:
            lab = labels.reshape(-1)[und_idx]
            rows = (lab != -100).nonzero().squeeze(1)
            if rows.numel():
                logits = batch_invariant.linear(self.norm(h_und[rows]) if hn is None else hn[rows], self._lm_head_weight())
                if copy_bonus is not None:
                    logits = logits.float() + copy_bonus[und_idx[rows]]
                targets = lab[rows]
                ce = F.cross_entropy(logits.float(), targets, reduction="none")
                w = torch.where(targets == cfg.eos_token_id, eos_loss_weight, 1.0).to(ce.dtype)
                text_loss = (ce * w).sum() / w.sum()
        if image_labels is not None and has_target:
            select = image_labels != -100  # (M, G, G)
            if bool(select.any()):
                logits = self.image_head(h_tgt, select=select, source=tgt_source)
                ce = F.cross_entropy(logits.float(), image_labels[select], reduction="none")
                image_loss = ce.mean() if image_weights is None else (ce * image_weights[select]).sum() / ce.numel()
        out.loss = text_loss + image_loss
        out.text_loss, out.image_loss = text_loss.detach(), image_loss.detach()
        return out

    # ------------------------------------------------------------------ accounting

    def parameter_groups(self) -> dict[str, int]:
        """Parameter counts per branch (see `count_parameters`)."""
        return count_parameters(self)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Split parameters into und, gen, vision and shared groups.

    Following FACTS §2.6, `und` counts the understanding stack *including* the shared
    attention output projections and final norm (the released model's und branch owns
    them), `gen` counts the gen parameters inside the layers, `gen_heads` the image
    embedding/compression/expansion/classifier, `vision` the patch encoder + projector.
    `shared` reports, for information, the part of `und` that gen positions also use.
    `total` sums und + gen + gen_heads + vision.
    """
    groups = dict(und=0, gen=0, gen_heads=0, vision=0, shared=0)
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("vision."):
            groups["vision"] += n
        elif name.startswith(("image_embed.", "image_head.")):
            groups["gen_heads"] += n
        elif "_gen" in name:
            groups["gen"] += n
        else:
            groups["und"] += n
            if name.endswith("o_proj.weight") or name == "norm.weight":
                groups["shared"] += n
    groups["total"] = groups["und"] + groups["gen"] + groups["gen_heads"] + groups["vision"]
    return groups
