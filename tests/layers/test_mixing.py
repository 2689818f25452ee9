"""spatial_shift, TokenMixingMLP, Attention, ConvPosEnc, LocalMHRA against slow hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from visionmix.layers import Attention, ConvPosEnc, LocalMHRA, TokenMixingMLP, spatial_shift

# ---------------------------------------------------------------- spatial_shift (2106.07477 / 2108.01072)

DIRECTIONS = {1: [("w", 1), ("w", -1), ("h", 1), ("h", -1)], 2: [("h", 1), ("h", -1), ("w", 1), ("w", -1)]}


def shift_ref(x: torch.Tensor, pattern: int) -> torch.Tensor:
    """Pixel by pixel: "+1 along W" reads ``x[:, h, w - 1]``; a source outside the image means "keep your own"."""
    _, height, width, c = x.shape
    q = c // 4
    out = torch.empty_like(x)
    for g, (axis, step) in enumerate(DIRECTIONS[pattern]):
        chans = slice(g * q, (g + 1) * q)
        for h in range(height):
            for w in range(width):
                src_h, src_w = (h - step, w) if axis == "h" else (h, w - step)
                if not (0 <= src_h < height and 0 <= src_w < width):
                    src_h, src_w = h, w
                out[:, h, w, chans] = x[:, src_h, src_w, chans]
    return out


@pytest.mark.parametrize("pattern", [1, 2])
@pytest.mark.parametrize("shape", [(2, 5, 7, 8), (1, 4, 3, 12), (1, 1, 6, 4), (2, 2, 1, 4)])
def test_spatial_shift_matches_pixel_reference(pattern, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    x_before = x.clone()
    out = spatial_shift(x, pattern)
    assert torch.equal(out, shift_ref(x, pattern))
    assert torch.equal(x, x_before)  # out of place


@pytest.mark.parametrize("pattern", [1, 2])
def test_spatial_shift_does_not_smear_the_border(pattern):
    """The paper's in-place pseudo-code copies overlapping slices and smears row/column 0 along the axis.

    With x[b, h, w, c] = 100 h + w, the "+1" group along an axis must hold the previous row/column: out row 2 is
    in row 1 (a smeared result would show row 0 everywhere), and the "-1" group the next one.
    """
    height, width = 5, 7
    grid = 100.0 * torch.arange(height).view(height, 1) + torch.arange(width).view(1, width)
    x = grid.view(1, height, width, 1).expand(1, height, width, 8).contiguous()
    out = spatial_shift(x, pattern)[0]  # (H, W, C)
    groups = {d: out[..., 2 * i:2 * i + 2] for i, d in enumerate(DIRECTIONS[pattern])}
    plus_h, minus_h = groups[("h", 1)], groups[("h", -1)]
    plus_w, minus_w = groups[("w", 1)], groups[("w", -1)]
    for h in range(1, height):
        assert (plus_h[h] == grid[h - 1].unsqueeze(-1)).all(), h
    assert (plus_h[0] == grid[0].unsqueeze(-1)).all()
    for h in range(height - 1):
        assert (minus_h[h] == grid[h + 1].unsqueeze(-1)).all(), h
    assert (minus_h[-1] == grid[-1].unsqueeze(-1)).all()
    for w in range(1, width):
        assert (plus_w[:, w] == grid[:, w - 1].unsqueeze(-1)).all(), w
    for w in range(width - 1):
        assert (minus_w[:, w] == grid[:, w + 1].unsqueeze(-1)).all(), w
    assert (plus_h[2] == 100.0 + torch.arange(width).unsqueeze(-1)).all()  # row 2 holds row 1, not row 0


@pytest.mark.parametrize("pattern", [1, 2])
def test_spatial_shift_gradcheck(pattern):
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: spatial_shift(t, pattern), (x,))


def test_spatial_shift_double_and_compile():
    x = torch.randn(2, 5, 7, 8, dtype=torch.float64)
    out = spatial_shift(x, 2)
    assert out.dtype == torch.float64
    assert torch.equal(torch.compile(spatial_shift, backend="eager", fullgraph=True)(x, 2), out)


@pytest.mark.parametrize("x, pattern, match", [
    (torch.randn(1, 4, 4, 6), 1, r"channels \(last dim of x\)=6 must be divisible by 4"),
    (torch.randn(1, 4, 4, 8), 3, "pattern must be one of 1, 2; got 3"),
    (torch.randn(4, 4, 8), 1, "expected a 4D NHWC input, got a 3D tensor"),
])
def test_spatial_shift_bad_input(x, pattern, match):
    with pytest.raises(ValueError, match=match):
        spatial_shift(x, pattern)


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 5), w=st.integers(1, 5), quarter=st.integers(1, 3),
       pattern=st.sampled_from([1, 2]))
def test_spatial_shift_property(b, h, w, quarter, pattern):
    x = torch.randn(b, h, w, 4 * quarter)
    assert torch.equal(spatial_shift(x, pattern), shift_ref(x, pattern))


# ---------------------------------------------------------------- TokenMixingMLP (2105.01601, eq. 1)

def test_token_mixing_mlp_matches_reference():
    torch.manual_seed(0)
    n, c = 6, 5
    mlp = TokenMixingMLP(n, 4).double()
    x = torch.randn(2, n, c, dtype=torch.float64)
    w1, b1, w2, b2 = mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias
    expected = torch.empty_like(x)
    for ch in range(c):  # the same MLP mixes the N tokens of every channel column
        expected[:, :, ch] = F.gelu(x[:, :, ch] @ w1.T + b1) @ w2.T + b2
    torch.testing.assert_close(mlp(x), expected, rtol=0, atol=1e-12)
    assert mlp.fc1.weight.shape == (4, n) and mlp.fc2.weight.shape == (n, 4)


@pytest.mark.parametrize("x", [torch.randn(2, 5, 4), torch.randn(6, 4)])
def test_token_mixing_mlp_wrong_tokens(x):
    with pytest.raises(ValueError, match=r"expected \(B, N=6, C\) tokens, got shape"):
        TokenMixingMLP(6)(x)


def test_token_mixing_mlp_bad_arguments():
    with pytest.raises(ValueError, match="num_tokens must be a positive integer, got 0"):
        TokenMixingMLP(0)


# ---------------------------------------------------------------- Attention (1706.03762)

def attention_ref(x: torch.Tensor, attn: Attention) -> torch.Tensor:
    """Per sample and head: softmax(q k^T / sqrt(d)) v; qkv rows are [q | k | v], each split into heads."""
    b, n, c = x.shape
    heads, d = attn.num_heads, c // attn.num_heads
    w = attn.qkv.weight
    bias = attn.qkv.bias if attn.qkv.bias is not None else x.new_zeros(3 * c)
    out = torch.empty_like(x)
    for s in range(b):
        qkv = x[s] @ w.T + bias  # (N, 3C)
        q, k, v = qkv[:, :c], qkv[:, c:2 * c], qkv[:, 2 * c:]
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            scores = q[:, cols] @ k[:, cols].T / math.sqrt(d)
            probs = scores.exp() / scores.exp().sum(-1, keepdim=True)
            out[s, :, cols] = probs @ v[:, cols]
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("kwargs, heads", [
    ({"num_heads": 2, "qkv_bias": True}, 2), ({"num_heads": 1}, 1), ({"head_dim": 3, "qkv_bias": True}, 4),
])
def test_attention_matches_reference(kwargs, heads):
    torch.manual_seed(0)
    attn = Attention(12, **kwargs).double()
    assert attn.num_heads == heads and attn.head_dim == 12 // heads
    assert (attn.qkv.bias is not None) == kwargs.get("qkv_bias", False)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(attn(x), attention_ref(x, attn), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"dim": 0}, ValueError, "dim must be a positive integer, got 0"),
    ({"dim": 12, "num_heads": 5}, ValueError, "dim=12 must be divisible by num_heads=5"),
    ({"dim": 12, "head_dim": 5}, ValueError, "dim=12 must be divisible by head_dim=5"),
    ({"dim": 12, "num_heads": None}, TypeError, "num_heads must be an int"),
])
def test_attention_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Attention(**kwargs)


# ---------------------------------------------------------------- ConvPosEnc and LocalMHRA (2102.10882, 2201.09450)

def depthwise_ref(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Each channel convolved with its own KxK kernel, zero padding K // 2, tap by tap."""
    k = conv.kernel_size[0]
    h, w = x.shape[-2:]
    padded = F.pad(x, [k // 2] * 4)
    out = conv.bias.view(1, -1, 1, 1).expand_as(x).clone()
    for i in range(k):
        for j in range(k):
            out += conv.weight[:, 0, i, j].view(1, -1, 1, 1) * padded[:, :, i:i + h, j:j + w]
    return out


@pytest.mark.parametrize("k", [3, 5, 1])
def test_conv_pos_enc_is_depthwise_same(k):
    torch.manual_seed(0)
    cpe = ConvPosEnc(6, k).double()
    assert cpe.groups == 6 and cpe.weight.shape == (6, 1, k, k)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    out = cpe(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, depthwise_ref(x, cpe), rtol=0, atol=1e-12)


@pytest.mark.parametrize("args, match", [
    ((0,), "dim must be a positive integer, got 0"), ((6, 4), "kernel_size must be odd"),
])
def test_conv_pos_enc_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        ConvPosEnc(*args)


def bn_ref(x: torch.Tensor, bn: nn.BatchNorm2d, training: bool) -> torch.Tensor:
    mean, var = (x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)) if training else (bn.running_mean,
                                                                                         bn.running_var)
    view = (1, -1, 1, 1)
    return (x - mean.view(view)) / (var.view(view) + bn.eps).sqrt() * bn.weight.view(view) + bn.bias.view(view)


def pointwise_ref(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return torch.einsum("oi,bihw->bohw", conv.weight.flatten(1), x) + conv.bias.view(1, -1, 1, 1)


def local_mhra_ref(x: torch.Tensor, m: LocalMHRA) -> torch.Tensor:
    """UniFormer eqs. 1-4 with local affinity: X = DPE(X) + X; Y = V(A(U(BN(X)))) + X; Z = FFN(BN(Y)) + Y,
    where U, V are 1x1 convs and A a depthwise 5x5 conv (the learnable local relation)."""
    x = depthwise_ref(x, m.pos_embed) + x
    y = pointwise_ref(depthwise_ref(pointwise_ref(bn_ref(x, m.norm1, m.training), m.conv1), m.attn), m.conv2) + x
    hidden = F.gelu(pointwise_ref(bn_ref(y, m.norm2, m.training), m.mlp.fc1))
    return pointwise_ref(hidden, m.mlp.fc2) + y


@pytest.mark.parametrize("training", [False, True])
def test_local_mhra_matches_reference(training):
    torch.manual_seed(0)
    m = LocalMHRA(6, 2.0).double().train(training)
    for bn in (m.norm1, m.norm2):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    assert m.attn.kernel_size == (5, 5) and m.attn.groups == 6 and m.pos_embed.kernel_size == (3, 3)
    assert m.mlp.fc1.out_channels == 12
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(m(x), local_mhra_ref(x, m), rtol=0, atol=1e-12)


def test_local_mhra_official_key_layout():
    """UniFormer's CBlock keys (reference/checkpoint_keys_spach_uniformer.md, blocks1.N.*)."""
    names = {"pos_embed", "conv1", "conv2", "attn", "mlp.fc1", "mlp.fc2"}
    expected = {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    expected |= {f"norm{i}.{p}" for i in (1, 2)
                 for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert set(LocalMHRA(8).state_dict()) == expected


@pytest.mark.parametrize("kwargs, match", [
    ({"dim": 0}, "dim must be a positive integer, got 0"),
    ({"dim": 8, "kernel_size": 4}, "kernel_size must be odd"),
    ({"dim": 8, "mlp_ratio": 0.01}, "hidden_features must be a positive integer, got 0"),
])
def test_local_mhra_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalMHRA(**kwargs)


# ---------------------------------------------------------------- every module: float64, backward, compile

CASES = {
    "token_mixing": (lambda: TokenMixingMLP(6, 4), (2, 6, 3)),
    "attention": (lambda: Attention(8, 2, qkv_bias=True), (2, 3, 8)),
    "conv_pos_enc": (lambda: ConvPosEnc(4), (2, 4, 5, 3)),
    "local_mhra": (lambda: LocalMHRA(4, 2.0, drop_path=0.1), (2, 4, 3, 3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_double_backward_compile_and_gradcheck(name):
    torch.manual_seed(0)
    build, shape = CASES[name]
    module = build().double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    module(x).square().sum().backward()  # training mode
    assert x.grad is not None and all(p.grad is not None and torch.isfinite(p.grad).all()
                                      for p in module.parameters())
    module.eval()
    out = module(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(torch.compile(module, backend="eager", fullgraph=True)(x), out, rtol=0, atol=0)
    assert torch.autograd.gradcheck(module, (x,))


def test_attention_checks_its_input():
    """Regression: a 4-D input failed with 'too many values to unpack'."""
    attn = Attention(8, 2)
    with pytest.raises(ValueError, match=r"expected a 3D \(B, N, C\) input, got a 4D tensor of shape \(1, 8, 2, 2\)"):
        attn(torch.randn(1, 8, 2, 2))
    with pytest.raises(ValueError, match="expected 8 channels"):
        attn(torch.randn(1, 4, 6))
