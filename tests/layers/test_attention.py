"""SEModule, SelectiveKernel, SplitAttention, ULSAM against slow references written from their papers' equations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from visionmix.layers import ULSAM, SelectiveKernel, SEModule, SplitAttention


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics (the re-param test protocol)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g, dtype=m.weight.dtype) + 0.5
            m.bias.data = torch.randn(n, generator=g, dtype=m.bias.dtype)
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return module


def bn_ref(x: torch.Tensor, bn: nn.BatchNorm2d, training: bool, chans: slice | None = None) -> torch.Tensor:
    """BatchNorm over dim 1 of x with ``bn``'s channels ``chans`` (all by default): batch statistics (biased
    variance) in training, running ones in eval."""
    chans = slice(None) if chans is None else chans
    if training:
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
    else:
        mean, var = bn.running_mean[chans], bn.running_var[chans]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    weight, bias = bn.weight[chans].view(shape), bn.bias[chans].view(shape)
    return (x - mean.view(shape)) / (var.view(shape) + bn.eps).sqrt() * weight + bias


def maxpool3x3_ref(x: torch.Tensor) -> torch.Tensor:
    """3x3 max pool, stride 1, padding 1 (padding never wins): the max over the nine shifted copies."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), value=-math.inf)
    shifted = [padded[..., i:i + h, j:j + w] for i in range(3) for j in range(3)]
    return torch.stack(shifted).amax(0)


# ---------------------------------------------------------------- SEModule (1709.01507, eqs. 2-4)

def se_ref(x: torch.Tensor, se: SEModule) -> torch.Tensor:
    w1, b1 = se.fc1.weight.flatten(1), se.fc1.bias
    w2, b2 = se.fc2.weight.flatten(1), se.fc2.bias
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        z = torch.stack([x[b, c].sum() / x[b, c].numel() for c in range(x.shape[1])])  # squeeze, eq. 2
        s = torch.sigmoid(w2 @ torch.relu(w1 @ z + b1) + b2)  # excitation, eq. 3
        for c in range(x.shape[1]):
            out[b, c] = s[c] * x[b, c]  # scale, eq. 4
    return out


@pytest.mark.parametrize("channels, rd_ratio, rd_channels", [(32, 1 / 16, None), (12, 0.25, None), (8, 1 / 16, 5)])
def test_se_matches_reference(channels, rd_ratio, rd_channels):
    torch.manual_seed(0)
    se = SEModule(channels, rd_ratio, rd_channels=rd_channels).double()
    expected_rd = rd_channels or max(1, round(channels * rd_ratio))
    assert se.fc1.out_channels == expected_rd and se.fc2.in_channels == expected_rd
    x = torch.randn(2, channels, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(se(x), se_ref(x, se), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- SelectiveKernel (1903.06586, eqs. 1-6)

def dilated_as_dense(weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """The paper's KxK kernel (K = 2 * dilation + 1) that a dilated 3x3 stands for: zeros between the taps."""
    k = 2 * dilation + 1
    dense = weight.new_zeros(*weight.shape[:2], k, k)
    dense[..., ::dilation, ::dilation] = weight
    return dense


def sk_ref(x: torch.Tensor, sk: SelectiveKernel, across: str = "branches") -> torch.Tensor:
    """Split / fuse / select as written in the paper; ``across="channels"`` is a wrong softmax used as a control."""
    branches = []
    for k, path in zip(sk.kernels, sk.paths, strict=True):  # split: dense KxK conv (a dilated 3x3), BN, ReLU
        dense = dilated_as_dense(path.conv.weight, (k - 1) // 2)
        conv = F.conv2d(x, dense, stride=path.conv.stride, padding=k // 2, groups=path.conv.groups)
        branches.append(torch.relu(bn_ref(conv, path.bn, sk.training)))
    u = sum(branches)  # fuse, eq. 1
    s = u.mean((2, 3))  # eq. 2, (B, C)
    fc, bn, select = sk.attn.fc_reduce, sk.attn.bn, sk.attn.fc_select
    z = torch.relu(bn_ref((s @ fc.weight.flatten(1).T)[:, :, None, None], bn, sk.training)).flatten(1)  # eq. 4
    m, c = len(branches), sk.out_channels
    logits = (z @ select.weight.flatten(1).T).reshape(-1, m, c)  # rows A_c, B_c, ... of eq. 5
    out = torch.zeros_like(branches[0])
    for b in range(x.shape[0]):
        e = logits[b].exp()  # (M, C)
        a = e / e.sum(0) if across == "branches" else e / e.sum(1, keepdim=True)  # eq. 5: a_c + b_c = 1
        for ch in range(c):
            out[b, ch] = sum(a[i, ch] * branches[i][b, ch] for i in range(m))  # select, eq. 6
    return out


SK_CONFIGS = [  # in, out, kernels, stride, groups, min_rd, H, W
    (8, 8, (3, 5), 1, 1, 4, 6, 6),
    (8, 12, (3, 5, 7), 2, 4, 4, 7, 5),
    (6, 6, (5, 3), 2, 2, 32, 5, 8),
]


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("cin, cout, kernels, stride, groups, min_rd, h, w", SK_CONFIGS)
def test_sk_matches_reference(cin, cout, kernels, stride, groups, min_rd, h, w, training):
    torch.manual_seed(0)
    sk = randomize_bn(SelectiveKernel(cin, cout, kernels, stride, groups, min_rd=min_rd)).double().train(training)
    assert sk.attn.fc_reduce.out_channels == max(round(cout / 16), min_rd)
    for path, k in zip(sk.paths, kernels, strict=True):
        assert path.conv.kernel_size == (3, 3) and path.conv.dilation == ((k - 1) // 2,) * 2
    x = torch.randn(3, cin, h, w, dtype=torch.float64)
    expected = sk_ref(x, sk)
    torch.testing.assert_close(sk(x), expected, rtol=0, atol=1e-10)
    # the control: a softmax across channels instead of across branches gives another answer
    assert (sk_ref(x, sk, across="channels") - expected).abs().max() > 1e-3


def test_sk_weights_sum_to_one_across_branches():
    """With identical branches the softmax across branches must give back the common branch output."""
    torch.manual_seed(0)
    sk = SelectiveKernel(4, 4, (3, 3, 3), min_rd=4).eval()
    for path in sk.paths[1:]:
        path.load_state_dict(sk.paths[0].state_dict())
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(sk(x), torch.relu(sk.paths[0](x)))


# ---------------------------------------------------------------- SplitAttention (2108.01072, section 3.2)

def split_attention_ref(xs: list[torch.Tensor], sa: SplitAttention, pool: str = "mean") -> torch.Tensor:
    """``a = mean_{hw} sum_k x_k`` (or the widely copied sum over space, as a control), MLP, softmax over k."""
    k, (bsz, h, w, c) = len(xs), xs[0].shape
    w1, w2 = sa.mlp1.weight, sa.mlp2.weight
    out = torch.zeros_like(xs[0])
    for b in range(bsz):
        total = sum(x[b] for x in xs).sum((0, 1))
        a = total / (h * w) if pool == "mean" else total
        logits = (w2 @ F.gelu(w1 @ a)).reshape(k, c)  # row i holds branch i's logits
        for ch in range(c):
            weights = logits[:, ch].exp() / logits[:, ch].exp().sum()
            out[b, :, :, ch] = sum(weights[i] * xs[i][b, :, :, ch] for i in range(k))
    return out


@pytest.mark.parametrize("dim, k, hidden_ratio, h, w", [(8, 3, 1 / 4, 4, 6), (6, 2, 1 / 2, 5, 3), (4, 4, 1.0, 1, 7)])
def test_split_attention_matches_reference(dim, k, hidden_ratio, h, w):
    torch.manual_seed(0)
    sa = SplitAttention(dim, k, hidden_ratio).double()
    assert sa.mlp1.out_features == max(1, round(dim * hidden_ratio)) and sa.mlp2.out_features == k * dim
    assert sa.mlp1.bias is None and sa.mlp2.bias is None
    xs = [torch.randn(2, h, w, dim, dtype=torch.float64) for _ in range(k)]
    expected = split_attention_ref(xs, sa)
    torch.testing.assert_close(sa(xs), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(sa(tuple(xs)), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(sa(torch.stack(xs, 1)), expected, rtol=0, atol=1e-12)
    if h * w > 1:  # the control: summing over space instead of averaging changes the result
        assert (split_attention_ref(xs, sa, pool="sum") - expected).abs().max() > 1e-3


def test_split_attention_is_invariant_to_tiling_the_image():
    """The mean makes the gate scale-free: repeating the image 2x2 must repeat the output (a sum would not)."""
    torch.manual_seed(0)
    sa = SplitAttention(8, 3)
    xs = [torch.randn(1, 3, 4, 8) for _ in range(3)]
    tiled = [x.repeat(1, 2, 2, 1) for x in xs]
    torch.testing.assert_close(sa(tiled), sa(xs).repeat(1, 2, 2, 1))


# ---------------------------------------------------------------- ULSAM (2006.15102, eqs. 1-2)

def ulsam_ref(x: torch.Tensor, m: ULSAM, pool_input: bool = False) -> torch.Tensor:
    """One subspace at a time as in the paper; ``pool_input=True`` is the official code's bug, used as a control."""
    cg = x.shape[1] // m.groups
    outs = []
    for n in range(m.groups):
        chans = slice(n * cg, (n + 1) * cg)
        f = x[:, chans]
        dw = f * m.dwconv.weight[chans].view(1, cg, 1, 1)  # depthwise 1x1: one scale per channel
        dw = torch.relu(bn_ref(dw, m.bn_dw, m.training, chans))
        pooled = maxpool3x3_ref(f if pool_input else dw)
        pw = (pooled * m.pwconv.weight[n].view(1, cg, 1, 1)).sum(1, keepdim=True)  # pointwise to one map
        pw = torch.relu(bn_ref(pw, m.bn_pw, m.training, slice(n, n + 1)))
        attn = pw.flatten(1).softmax(-1).view_as(pw)  # softmax over the H*W positions
        outs.append(f * attn + f)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("channels, groups, h, w", [(8, 4, 5, 7), (6, 1, 6, 6), (12, 3, 3, 9)])
def test_ulsam_matches_reference(channels, groups, h, w, training):
    torch.manual_seed(0)
    m = randomize_bn(ULSAM(channels, groups)).double().train(training)
    nn.init.normal_(m.dwconv.weight)  # signs mixed, so the depthwise output's maxima differ from the input's
    m.bn_pw.running_mean.zero_()  # keep the final ReLU partly open in eval (all zero would make A uniform)
    m.bn_pw.bias.data.abs_()
    x = torch.randn(2, channels, h, w, dtype=torch.float64)
    expected = ulsam_ref(x, m)
    torch.testing.assert_close(m(x), expected, rtol=0, atol=1e-12)
    # the control: pooling the input (the official code) instead of the depthwise output gives another answer
    assert (ulsam_ref(x, m, pool_input=True) - expected).abs().max() > 1e-4


def test_ulsam_defaults():
    m = ULSAM(8, 2)
    assert m.bn_dw.momentum == 0.1 and m.bn_pw.momentum == 0.1
    assert m.pwconv.groups == 2 and m.pwconv.out_channels == 2 and m.dwconv.groups == 8


# ---------------------------------------------------------------- behaviour shared by all four

def _make(name: str):
    """(module, input builder) for a small case of each layer."""
    if name == "se":
        return SEModule(8, 0.25), lambda dt: torch.randn(2, 8, 3, 3, dtype=dt)
    if name == "sk":
        return SelectiveKernel(4, 6, (3, 5), 2, 2, min_rd=3), lambda dt: torch.randn(2, 4, 5, 3, dtype=dt)
    if name == "split":
        return SplitAttention(4, 3), lambda dt: [torch.randn(2, 3, 5, 4, dtype=dt) for _ in range(3)]
    return ULSAM(4, 2), lambda dt: torch.randn(2, 4, 3, 3, dtype=dt)


LAYERS = ["se", "sk", "split", "ulsam"]


@pytest.mark.parametrize("name", LAYERS)
def test_forward_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    module, make_x = _make(name)
    x = make_x(torch.float32)
    inputs = x if isinstance(x, list) else [x]
    for t in inputs:
        t.requires_grad_(True)
    module(x).square().sum().backward()
    for pname, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs)


@pytest.mark.parametrize("name", LAYERS)
def test_double_and_compile(name):
    torch.manual_seed(0)
    module, make_x = _make(name)
    module = module.double().eval()
    x = make_x(torch.float64)
    out = module(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(torch.compile(module, backend="eager", fullgraph=True)(x), out, rtol=0, atol=0)


@pytest.mark.parametrize("name", LAYERS)
def test_gradcheck(name):
    torch.manual_seed(0)
    module, make_x = _make(name)
    module = randomize_bn(module).double()
    x = make_x(torch.float64)
    inputs = tuple(x) if isinstance(x, list) else (x,)
    for t in inputs:
        t.requires_grad_(True)
    fn = (lambda *xs: module(list(xs))) if isinstance(x, list) else module
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("name", ["se", "sk", "ulsam"])
def test_batch_one_in_eval_and_float32(name):
    module, make_x = _make(name)
    x = make_x(torch.float32)[:1]
    out = module.eval()(x)
    assert out.dtype == torch.float32 and out.shape[0] == 1 and torch.isfinite(out).all()


# ---------------------------------------------------------------- shape rules (hypothesis)

@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 2), c=st.integers(1, 12), h=st.integers(1, 6), w=st.integers(1, 6),
       rd_ratio=st.floats(0.05, 1.0))
def test_se_shape_property(b, c, h, w, rd_ratio):
    x = torch.randn(b, c, h, w)
    assert SEModule(c, rd_ratio)(x).shape == x.shape


@settings(max_examples=15, deadline=None)
@given(b=st.integers(2, 3), groups=st.integers(1, 3), cin_mult=st.integers(1, 3), cout_mult=st.integers(1, 3),
       kernels=st.lists(st.sampled_from([3, 5, 7]), min_size=2, max_size=3), stride=st.integers(1, 3),
       h=st.integers(1, 7), w=st.integers(1, 7))
def test_sk_shape_property(b, groups, cin_mult, cout_mult, kernels, stride, h, w):
    cin, cout = groups * cin_mult, groups * cout_mult
    sk = SelectiveKernel(cin, cout, kernels, stride, groups, min_rd=2)
    out = sk(torch.randn(b, cin, h, w))
    assert out.shape == (b, cout, (h - 1) // stride + 1, (w - 1) // stride + 1)


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 2), dim=st.integers(1, 12), k=st.integers(1, 4), h=st.integers(1, 5), w=st.integers(1, 5))
def test_split_attention_shape_property(b, dim, k, h, w):
    xs = [torch.randn(b, h, w, dim) for _ in range(k)]
    out = SplitAttention(dim, k)(xs)
    assert out.shape == (b, h, w, dim)
    if k == 1:  # one branch: the softmax weight is 1
        torch.testing.assert_close(out, xs[0])


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 2), groups=st.integers(1, 4), per_group=st.integers(1, 4), h=st.integers(1, 6),
       w=st.integers(1, 6))
def test_ulsam_shape_property(b, groups, per_group, h, w):
    x = torch.randn(b, groups * per_group, h, w)
    assert ULSAM(groups * per_group, groups).eval()(x).shape == x.shape


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("build, error, match", [
    (lambda: SEModule(0), ValueError, "channels must be a positive integer, got 0"),
    (lambda: SEModule(8, -0.5), ValueError, "rd_ratio must be a positive number, got -0.5"),
    (lambda: SEModule(8, "1/16"), TypeError, "rd_ratio must be a float"),
    (lambda: SEModule(8, rd_channels=0), ValueError, "rd_channels must be a positive integer, got 0"),
    (lambda: SelectiveKernel(8, 8, (3, 4)), ValueError, r"kernels must be odd sizes >= 3.*\(3, 4\)"),
    (lambda: SelectiveKernel(8, 8, (1, 3)), ValueError, r"kernels must be odd sizes >= 3.*\(1, 3\)"),
    (lambda: SelectiveKernel(8, 8, (3,)), ValueError, "at least two branch sizes"),
    (lambda: SelectiveKernel(8, 8, (3, 5.0)), TypeError, "kernels must be an int"),
    (lambda: SelectiveKernel(6, 8, groups=4), ValueError, "in_channels=6 must be divisible by groups=4"),
    (lambda: SelectiveKernel(8, 6, groups=4), ValueError, "out_channels=6 must be divisible by groups=4"),
    (lambda: SelectiveKernel(-8), ValueError, "in_channels must be a positive integer, got -8"),
    (lambda: SelectiveKernel(8, stride=0), ValueError, "stride must be a positive integer, got 0"),
    (lambda: SelectiveKernel(8, min_rd=0), ValueError, "min_rd must be a positive integer, got 0"),
    (lambda: SplitAttention(0), ValueError, "dim must be a positive integer, got 0"),
    (lambda: SplitAttention(8, k=0), ValueError, "k must be a positive integer, got 0"),
    (lambda: SplitAttention(8, hidden_ratio=0.0), ValueError, "hidden_ratio must be a positive number, got 0.0"),
    (lambda: ULSAM(0, 1), ValueError, "channels must be a positive integer, got 0"),
    (lambda: ULSAM(8, 0), ValueError, "groups must be a positive integer, got 0"),
    (lambda: ULSAM(10, 4), ValueError, "channels=10 must be divisible by groups=4"),
])
def test_bad_constructor_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize("module, x, match", [
    (SEModule(8), torch.randn(2, 4, 3, 3), r"expected 8 channels .* got 4"),
    (SEModule(8), torch.randn(8, 3, 3), "expected a 4D NCHW input, got a 3D tensor"),
    (SelectiveKernel(8, min_rd=4), torch.randn(2, 6, 5, 5), r"expected 8 channels .* got 6"),
    (ULSAM(8, 2), torch.randn(2, 8, 5), "expected a 4D NCHW input, got a 3D tensor"),
    (SplitAttention(8, 3), [torch.randn(1, 4, 4, 8)] * 2, "expected k=3 feature maps, got 2"),
    (SplitAttention(8, 3), [torch.randn(1, 4, 4, 6)] * 3, r"expected 8 channels \(dim -1"),
    (SplitAttention(8, 3), torch.randn(1, 2, 4, 4, 8), "expected k=3 feature maps stacked on dim 1"),
    (SplitAttention(8, 3), torch.randn(1, 4, 4, 8), r"expected a 5D \(B, k, H, W, C\) input, got a 4D tensor"),
])
def test_bad_forward_input(module, x, match):
    with pytest.raises(ValueError, match=match):
        module(x)
