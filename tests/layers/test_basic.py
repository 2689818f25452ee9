"""Mlp, ConvMlp, PatchEmbed, DropPath, LayerScale, ConvBN against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from visionmix.layers import ConvBN, ConvMlp, DropPath, LayerScale, Mlp, PatchEmbed, drop_path

# ---------------------------------------------------------------- Mlp / ConvMlp


@pytest.mark.parametrize("hidden, out", [(None, None), (12, None), (5, 3)])
def test_mlp_matches_reference(hidden, out):
    torch.manual_seed(0)
    mlp = Mlp(6, hidden, out).double()
    assert (mlp.fc1.out_features, mlp.fc2.out_features) == (hidden or 6, out or 6)
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    hid = F.gelu(x @ mlp.fc1.weight.T + mlp.fc1.bias)
    torch.testing.assert_close(mlp(x), hid @ mlp.fc2.weight.T + mlp.fc2.bias, rtol=0, atol=1e-12)


def test_mlp_options():
    torch.manual_seed(0)
    mlp = Mlp(4, 8, act_layer=nn.ReLU, drop=0.5, bias=False).eval()  # dropout is off in eval mode
    assert mlp.fc1.bias is None and mlp.fc2.bias is None
    x = torch.randn(3, 4)
    torch.testing.assert_close(mlp(x), torch.relu(x @ mlp.fc1.weight.T) @ mlp.fc2.weight.T)
    mlp.train()
    assert not torch.equal(mlp(x), mlp(x))  # dropout active in training


def test_conv_mlp_equals_mlp_on_channels():
    torch.manual_seed(0)
    conv_mlp = ConvMlp(6, 10, 4).double()
    mlp = Mlp(6, 10, 4).double()
    mlp.fc1.weight.data = conv_mlp.fc1.weight.flatten(1)
    mlp.fc1.bias.data = conv_mlp.fc1.bias
    mlp.fc2.weight.data = conv_mlp.fc2.weight.flatten(1)
    mlp.fc2.bias.data = conv_mlp.fc2.bias
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    expected = mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # NCHW -> NHWC, MLP on channels, back
    torch.testing.assert_close(conv_mlp(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [Mlp, ConvMlp])
@pytest.mark.parametrize("kwargs, match", [
    ({"in_features": 0}, "in_features must be a positive integer, got 0"),
    ({"in_features": 4, "hidden_features": 0}, "hidden_features must be a positive integer, got 0"),
    ({"in_features": 4, "out_features": -2}, "out_features must be a positive integer, got -2"),
])
def test_mlp_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


# ---------------------------------------------------------------- PatchEmbed

def patch_embed_ref(x: torch.Tensor, pe: PatchEmbed) -> torch.Tensor:
    """Cut the image into patches one by one and project each flattened patch: (B, H/p, W/q, D)."""
    p, q = pe.patch_size
    weight, bias = pe.proj.weight.flatten(1), pe.proj.bias
    gh, gw = x.shape[2] // p, x.shape[3] // q
    out = x.new_empty(x.shape[0], gh, gw, weight.shape[0])
    for i in range(gh):
        for j in range(gw):
            patch = x[:, :, i * p:(i + 1) * p, j * q:(j + 1) * q].flatten(1)  # (B, C*p*q) channel-major
            out[:, i, j] = patch @ weight.T + bias
    return out


@pytest.mark.parametrize("img_size, patch, norm", [(12, 4, None), ((12, 10), (3, 5), nn.LayerNorm), (8, 8, None)])
def test_patch_embed_matches_reference_in_every_format(img_size, patch, norm):
    outs = {}
    for fmt in ("NCHW", "NHWC", "NLC"):
        torch.manual_seed(0)
        outs[fmt] = PatchEmbed(img_size, patch, 3, 6, norm_layer=norm, output_fmt=fmt).double()
    pe = outs["NHWC"]
    x = torch.randn(2, 3, *pe.img_size, dtype=torch.float64)
    expected = patch_embed_ref(x, pe)
    if norm is not None:
        expected = F.layer_norm(expected, (6,), pe.norm.weight, pe.norm.bias, pe.norm.eps)
    gh, gw = pe.grid_size
    assert pe.num_patches == gh * gw and expected.shape == (2, gh, gw, 6)
    torch.testing.assert_close(outs["NHWC"](x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(outs["NCHW"](x), expected.permute(0, 3, 1, 2), rtol=0, atol=1e-12)
    torch.testing.assert_close(outs["NLC"](x), expected.reshape(2, gh * gw, 6), rtol=0, atol=1e-12)
    assert outs["NCHW"](x).is_contiguous()  # a channels-last view would switch the next convs' memory format


def test_patch_embed_size_rules():
    strict = PatchEmbed(8, 4, 3, 5)
    with pytest.raises(ValueError, match=r"expected input size 8x8 \(this model's img_size\), got 12x12"):
        strict(torch.randn(1, 3, 12, 12))
    loose = PatchEmbed(8, 4, 3, 5, strict_img_size=False)
    assert loose(torch.randn(1, 3, 12, 16)).shape == (1, 5, 3, 4)
    with pytest.raises(ValueError, match="input size 10x12 must be divisible by the patch size 4x4"):
        loose(torch.randn(1, 3, 10, 12))
    any_size = PatchEmbed(None, (2, 3), 1, 4, output_fmt="NLC")
    assert any_size(torch.randn(2, 1, 4, 9)).shape == (2, 6, 4)
    with pytest.raises(ValueError, match=r"expected 3 channels .* got 1"):
        strict(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="expected a 4D NCHW input, got a 3D tensor"):
        strict(torch.randn(3, 8, 8))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"img_size": 30, "patch_size": 4}, ValueError, r"img_size \(H\)=30 must be divisible by patch_size=4"),
    ({"img_size": (8, 10), "patch_size": 4}, ValueError, r"img_size \(W\)=10 must be divisible by patch_size=4"),
    ({"patch_size": 0}, ValueError, "patch_size must be a positive integer, got 0"),
    ({"patch_size": (2, 2, 2)}, ValueError, "patch_size must be an int or a pair of ints"),
    ({"in_chans": 0}, ValueError, "in_chans must be a positive integer, got 0"),
    ({"embed_dim": 2.5}, TypeError, "embed_dim must be an int"),
    ({"output_fmt": "NWHC"}, ValueError, r"output_fmt must be one of .*'NCHW'.*; got 'NWHC'"),
])
def test_patch_embed_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        PatchEmbed(**kwargs)


@settings(max_examples=15, deadline=None)
@given(ph=st.integers(1, 4), pw=st.integers(1, 4), gh=st.integers(1, 4), gw=st.integers(1, 4),
       fmt=st.sampled_from(["NCHW", "NHWC", "NLC"]), b=st.integers(1, 2))
def test_patch_embed_shape_property(ph, pw, gh, gw, fmt, b):
    pe = PatchEmbed((ph * gh, pw * gw), (ph, pw), 2, 3, output_fmt=fmt)
    out = pe(torch.randn(b, 2, ph * gh, pw * gw))
    expected = {"NCHW": (b, 3, gh, gw), "NHWC": (b, gh, gw, 3), "NLC": (b, gh * gw, 3)}[fmt]
    assert out.shape == expected and pe.num_patches == gh * gw


# ---------------------------------------------------------------- DropPath

def test_drop_path_is_identity_in_eval_and_at_zero():
    x = torch.randn(4, 3, 2)
    assert torch.equal(DropPath(0.5).eval()(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)
    assert torch.equal(drop_path(x, 0.5, training=False), x)


@pytest.mark.parametrize("scale_by_keep", [True, False])
def test_drop_path_mask_statistics(scale_by_keep):
    torch.manual_seed(0)
    n, p = 20000, 0.25
    x = torch.ones(n, 3, 2)
    out = DropPath(p, scale_by_keep=scale_by_keep).train()(x)
    kept_value = 1 / (1 - p) if scale_by_keep else 1.0
    per_sample = out.flatten(1)
    # whole samples are dropped or kept: every element of a sample has the same value, 0 or kept_value
    assert (per_sample == per_sample[:, :1]).all()
    kept = per_sample[:, 0] != 0
    assert torch.allclose(per_sample[kept], torch.full_like(per_sample[kept], kept_value))
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma
    if scale_by_keep:  # the expectation is unchanged
        assert abs(out.mean().item() - 1.0) < 5 * sigma / (1 - p)


def test_drop_path_gradient_follows_mask():
    torch.manual_seed(0)
    x = torch.randn(64, 5, requires_grad=True)
    out = drop_path(x, 0.5, training=True)
    out.sum().backward()
    kept = out.detach().abs().sum(1) != 0
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], 2.0))
    assert (x.grad[~kept] == 0).all() and 0 < kept.sum() < 64


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_drop_path_bad_probability(p):
    with pytest.raises(ValueError, match=f"drop_prob must be in \\[0, 1\\), got {p}"):
        DropPath(p)


# ---------------------------------------------------------------- LayerScale

def test_layer_scale():
    ls = LayerScale(4, 0.1)
    torch.testing.assert_close(ls.gamma.detach(), torch.full((4,), 0.1))
    ls.gamma.data = torch.tensor([1.0, 2.0, 3.0, 4.0])
    x = torch.randn(2, 3, 4)
    expected = torch.stack([x[..., c] * (c + 1) for c in range(4)], -1)
    torch.testing.assert_close(ls(x), expected)
    with pytest.raises(ValueError, match="dim must be a positive integer, got 0"):
        LayerScale(0)


# ---------------------------------------------------------------- ConvBN

def randomize_bn(bn: nn.BatchNorm2d, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    bn.weight.data = torch.rand(n, generator=g, dtype=bn.weight.dtype) + 0.5
    bn.bias.data = torch.randn(n, generator=g, dtype=bn.bias.dtype)
    bn.running_mean.copy_(torch.randn(n, generator=g))
    bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)


CONV_BN_CONFIGS = [  # in, out, k, stride, padding, dilation, groups
    (4, 6, 3, 1, None, 1, 1),
    (4, 6, 3, 2, None, 1, 2),
    (6, 6, 5, 1, None, 2, 6),
    (4, 8, 1, 2, 0, 1, 4),
    (3, 5, 3, 1, 0, 1, 1),
]


@pytest.mark.parametrize("cin, cout, k, stride, padding, dilation, groups", CONV_BN_CONFIGS)
def test_conv_bn_forward_and_exact_reparameterize(cin, cout, k, stride, padding, dilation, groups):
    torch.manual_seed(0)
    m = ConvBN(cin, cout, k, stride, padding, dilation, groups).double().eval()
    randomize_bn(m.bn)
    x = torch.randn(2, cin, 7, 6, dtype=torch.float64)
    pad = dilation * (k - 1) // 2 if padding is None else padding
    conv = F.conv2d(x, m.conv.weight, stride=stride, padding=pad, dilation=dilation, groups=groups)
    bn = m.bn
    expected = ((conv - bn.running_mean.view(1, -1, 1, 1)) / (bn.running_var.view(1, -1, 1, 1) + bn.eps).sqrt()
                * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
    out = m(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    if padding is None and stride == 1:
        assert out.shape[-2:] == x.shape[-2:]
    fused = m.reparameterize().eval()
    assert not any(isinstance(s, nn.modules.batchnorm._BatchNorm) for s in fused.modules())
    assert sum(isinstance(s, nn.Conv2d) for s in fused.modules()) == 1
    assert (fused(x) - out).abs().max().item() < 1e-10
    fused32, m32 = m.float().reparameterize().eval(), m.float()
    x32 = x.float()
    assert (fused32(x32) - m32(x32)).abs().max().item() < 1e-4 * m32(x32).abs().max().item()


@pytest.mark.parametrize("args, match", [
    ((0, 4, 3), "in_channels must be a positive integer, got 0"),
    ((4, 6, 3, 1, None, 1, 4), "out_channels=6 must be divisible by groups=4"),
    ((6, 4, 3, 1, None, 1, 4), "in_channels=6 must be divisible by groups=4"),
    ((4, 4, 0), "kernel_size must be a positive integer, got 0"),
    ((4, 4, 3, 0), "stride must be a positive integer, got 0"),
])
def test_conv_bn_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        ConvBN(*args)


# ---------------------------------------------------------------- every layer: float64, backward, compile

CASES = {
    "mlp": (lambda: Mlp(4, 8, 3), (2, 5, 4)),
    "conv_mlp": (lambda: ConvMlp(4, 8, 3), (2, 4, 3, 5)),
    "patch_embed": (lambda: PatchEmbed(8, 4, 3, 6, norm_layer=nn.LayerNorm), (2, 3, 8, 8)),
    "drop_path": (lambda: DropPath(0.3), (4, 3, 2)),
    "layer_scale": (lambda: LayerScale(4, 0.5), (2, 3, 4)),
    "conv_bn": (lambda: ConvBN(4, 6, 3, 2, groups=2), (2, 4, 5, 7)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_double_backward_and_compile(name):
    torch.manual_seed(0)
    build, shape = CASES[name]
    module = build().double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    module(x).square().sum().backward()  # training mode
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in module.parameters())
    module.eval()
    out = module(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(torch.compile(module, backend="eager", fullgraph=True)(x), out, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mlp", "conv_mlp", "patch_embed", "layer_scale", "conv_bn"])
def test_gradcheck(name):
    torch.manual_seed(0)
    build, shape = CASES[name]
    module = build().double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))
