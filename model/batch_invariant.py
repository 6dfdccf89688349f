"""Layers whose result for one image (or row) does not depend on what it is batched with.

On the CPU, oneDNN's convolution and group norm, and a matmul of a few rows, round an
image's result differently by batch size: one image alone, or within two, or sixteen,
comes out a few ulps apart, and a sampler that draws from those numbers can then draw
another token. A request served alone and the same request batched with others
(`graphs.runtime.BatchingEngine`, the HTTP server) must give the same image for the same
seed, so inference goes through these:

- `Conv2d`: without autograd, a convolution as the matmul it is (unfold, then one
  `F.linear` over every output pixel of the batch: many rows, each computed alike);
- `GroupNorm`: without autograd, the mean and variance read per image and group;
- `Linear` / `linear`: without autograd, a linear map of fewer than `MIN_ROWS` rows
  padded with zero rows first (a CPU matmul of a few rows takes matrix-vector kernels).

Each is the same function (the same parameters and state-dict keys as the `nn` layer it
replaces) up to float rounding; under autograd (training) the `nn` kernels run as before,
and so do the convolution and group norm off the CPU (an unfolded convolution of large
images would take far more memory on a GPU, whose kernels are another story).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ("Conv2d", "GroupNorm", "Linear", "linear")

MIN_ROWS = 16
"""Fewer rows than this take another matmul path on the CPU (matrix-vector kernels)."""


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`; without autograd, fewer than `MIN_ROWS` rows are padded with zero rows
    first (a row then rounds as it does within any larger batch)."""
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if torch.is_grad_enabled() or n >= MIN_ROWS or n == 0:
        return F.linear(x, weight, bias)
    rows = torch.cat([x.reshape(n, -1), x.new_zeros(MIN_ROWS - n, x.shape[-1])])
    return F.linear(rows, weight, bias)[:n].reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """`nn.Linear` through `linear`: a few rows round as they do within many."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (zero padding, no groups) that, on the CPU without autograd, runs as
    unfold + matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() or x.device.type != "cpu" or self.groups != 1
                or self.padding_mode != "zeros" or isinstance(self.padding, str)):  # fmt: skip
            return super().forward(x)
        B, _, H, W = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        oh, ow = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        out = linear(cols.transpose(1, 2), self.weight.flatten(1), self.bias)  # (B, oh * ow, out)
        return out.transpose(1, 2).reshape(B, self.out_channels, oh, ow)


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` that, on the CPU without autograd, reads each image's groups on their own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu":
            return super().forward(x)
        B, C = x.shape[:2]
        g = x.reshape(B, self.num_groups, -1)
        mean = g.mean(-1, keepdim=True)
        var = (g - mean).pow(2).mean(-1, keepdim=True)
        y = ((g - mean) * torch.rsqrt(var + self.eps)).view_as(x)
        if not self.affine:
            return y
        shape = (1, C) + (1,) * (x.dim() - 2)
        return y * self.weight.view(shape) + self.bias.view(shape)
