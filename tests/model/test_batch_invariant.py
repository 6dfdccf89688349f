"""`model/batch_invariant.py`: each image (row) comes out the same in any batch, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lavida_agent.model import batch_invariant
from lavida_agent.model.configuration_vq import VQConfig
from lavida_agent.model.modeling_vq import VQImageTokenizer

from .conftest import TINY_VQ


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=1), dict(kernel_size=2, stride=2, bias=False)])  # fmt: skip
def test_conv2d_is_the_nn_conv_and_batch_invariant(kw):
    torch.manual_seed(0)
    conv = batch_invariant.Conv2d(8, 16, **kw)
    ref = nn.Conv2d(8, 16, **kw)
    ref.load_state_dict(conv.state_dict())  # the same keys
    x = torch.randn(5, 8, 12, 12)
    with torch.no_grad():
        full = conv(x)
        torch.testing.assert_close(full, ref(x), atol=1e-5, rtol=1e-5)
        assert all(torch.equal(conv(x[:k]), full[:k]) for k in (1, 2, 3))
    x.requires_grad_(True)
    conv(x).sum().backward()  # under autograd it is the nn layer
    assert x.grad is not None and x.grad.shape == x.shape


def test_group_norm_is_the_nn_norm_and_batch_invariant():
    torch.manual_seed(0)
    norm = batch_invariant.GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
        x = torch.randn(5, 16, 9, 9) * 3 + 1
        full = norm(x)
        torch.testing.assert_close(full, F.group_norm(x, 4, norm.weight, norm.bias, norm.eps), atol=1e-5, rtol=1e-5)
        assert all(torch.equal(norm(x[:k]), full[:k]) for k in (1, 2, 3))


def test_linear_rounds_a_few_rows_as_within_many():
    torch.manual_seed(0)
    lin = batch_invariant.Linear(24, 32)
    x = torch.randn(40, 24)
    with torch.no_grad():
        many = lin(x)
        torch.testing.assert_close(many, F.linear(x, lin.weight, lin.bias))
        assert all(torch.equal(lin(x[:k]), many[:k]) for k in (1, 2, 3, 5, 16, 40))
        assert torch.equal(lin(x[:6].view(2, 3, 24)), many[:6].view(2, 3, 32))  # any leading shape
        assert lin(x[:0]).shape == (0, 32)


def test_vq_codes_and_images_do_not_depend_on_the_batch():
    vq = VQImageTokenizer(VQConfig(**TINY_VQ), generator=torch.Generator().manual_seed(0)).eval()
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        codes = vq.encode(images).codes
        decoded = vq.decode(codes)
        assert torch.equal(vq.encode(images[:1]).codes, codes[:1])
        assert torch.equal(vq.decode(codes[:1]), decoded[:1])
