"""DOConv2d (2006.12030): kernel composition against a per-entry loop, exact deploy, official layout, bad input."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from training import sgd_losses

from visionmix.layers import DOConv2d

F64 = torch.float64


def composed_kernel_reference(layer: DOConv2d) -> torch.Tensor:
    """kernel[o, c, s] = sum_d (D + I)[i, s, d] * W[o, c, d] with i the input channel c stands for in o's group."""
    out, per_group = layer.out_channels, layer.in_channels // layer.groups
    k = layer.kernel_size[0]
    if layer.D is None:
        return layer.W.detach().reshape(out, per_group, 1, 1)
    depthwise = (layer.D + layer.d_diag).detach()
    kernel = torch.zeros(out, per_group, k * k, dtype=layer.W.dtype)
    for o, c in itertools.product(range(out), range(per_group)):
        i = (o // (out // layer.groups)) * per_group + c
        kernel[o, c] = depthwise[i] @ layer.W[o, c].detach()  # (k*k, D_mul) @ (D_mul,)
    return kernel.reshape(out, per_group, k, k)


def randomized(layer: DOConv2d, seed: int = 0) -> DOConv2d:
    """Move D off zero so that the composition is not trivially the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return layer


CONFIGS = [  # in, out, k, stride, groups, D_mul, bias
    (4, 6, 3, 1, 1, None, False),
    (4, 6, 3, 2, 1, 11, True),  # D_mul > k^2 (not a multiple)
    (4, 4, 3, 1, 4, 18, False),  # depthwise, two identity blocks
    (4, 8, 5, 1, 2, None, True),  # other groups
    (6, 6, 1, 2, 3, None, True),  # 1x1: a plain conv
    (2, 4, 5, 2, 2, 30, False),
]


@pytest.mark.parametrize("cin, cout, k, stride, groups, d_mul, bias", CONFIGS)
def test_composition_forward_and_exact_deploy(cin, cout, k, stride, groups, d_mul, bias):
    layer = randomized(DOConv2d(cin, cout, k, stride, groups=groups, bias=bias, D_mul=d_mul).double())
    reference = composed_kernel_reference(layer)
    torch.testing.assert_close(layer.weight, reference, rtol=0, atol=1e-12)
    x = torch.randn(2, cin, 9, 8, dtype=F64)
    out = layer(x)
    expected = F.conv2d(x, reference, layer.bias, stride, k // 2, groups=groups)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-11)

    deployed = layer.reparameterize()
    assert type(deployed) is nn.Conv2d and (deployed.bias is not None) == bias
    plain = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias)
    assert sum(p.numel() for p in deployed.parameters()) == sum(p.numel() for p in plain.parameters())
    assert (deployed(x) - out).abs().max().item() < 1e-10
    layer32, x32 = layer.float(), x.float()
    out32 = layer32(x32)
    assert (layer32.reparameterize()(x32) - out32).abs().max().item() < 1e-4 * out32.abs().max().item()


def test_initial_state_and_official_layout():
    layer = DOConv2d(16, 32, 3, padding=1, bias=True)
    shapes = {name: tuple(t.shape) for name, t in layer.state_dict().items()}
    assert shapes == {"W": (32, 16, 9), "D": (16, 9, 9), "d_diag": (16, 9, 9), "bias": (32,)}
    assert not layer.d_diag.requires_grad and "d_diag" not in dict(layer.named_parameters())
    assert torch.equal(layer.D, torch.zeros(16, 9, 9)) and torch.equal(layer.d_diag[3], torch.eye(9))
    # with D = 0 the composed kernel is W itself
    torch.testing.assert_close(layer.weight, layer.W.reshape(32, 16, 3, 3), rtol=0, atol=0)
    official = {name: torch.randn(shape) for name, shape in shapes.items()}
    layer.load_state_dict(official, strict=True)
    assert {n: tuple(t.shape) for n, t in DOConv2d(16, 32, 1).state_dict().items()} == {"W": (32, 16, 1)}


def test_identity_blocks_for_large_d_mul():
    layer = DOConv2d(2, 3, 2, D_mul=10)  # k*k = 4: two identity blocks then two zero columns
    expected = torch.cat([torch.eye(4), torch.eye(4), torch.zeros(4, 2)], dim=1)
    assert torch.equal(layer.d_diag[1], expected)
    torch.testing.assert_close(layer.weight, (layer.W[..., :4] + layer.W[..., 4:8]).reshape(3, 2, 2, 2))


def test_init_scale_matches_a_plain_conv():
    """fan-in over W's D_mul columns keeps the composed kernel's init variance at nn.Conv2d's (1 / (3 fan_in))."""
    torch.manual_seed(0)
    for d_mul in (None, 18):
        var = DOConv2d(64, 64, 3, D_mul=d_mul).weight.var().item()
        assert var == pytest.approx(1 / (3 * 64 * 9), rel=0.1)


def test_from_conv_is_identical_at_init():
    torch.manual_seed(0)
    for conv, d_mul in ((nn.Conv2d(4, 6, 3, 2, 1), None), (nn.Conv2d(4, 4, 5, padding=2, groups=2, bias=False), 40)):
        layer = DOConv2d.from_conv(conv.double(), D_mul=d_mul)
        x = torch.randn(2, 4, 9, 9, dtype=F64)
        assert torch.equal(layer(x), conv(x))


def test_gradcheck():
    torch.manual_seed(0)
    layer = randomized(DOConv2d(2, 2, 3, bias=True, D_mul=10).double())
    x = torch.randn(1, 2, 4, 4, dtype=F64, requires_grad=True)
    params = tuple(p.detach().requires_grad_() for p in (layer.W, layer.D, layer.bias))
    assert torch.autograd.gradcheck(
        lambda x, w, d, b: torch.func.functional_call(layer, {"W": w, "D": d, "bias": b}, (x,)), (x, *params),
        fast_mode=True)


def test_train_form_trains():
    torch.manual_seed(0)
    layer, teacher = DOConv2d(3, 4, 3), nn.Conv2d(3, 4, 3, padding=1)
    inputs = torch.randn(8, 3, 6, 6)
    target = teacher(inputs).detach()
    losses = sgd_losses(layer, inputs, target, lr=0.2)
    assert losses[-1] < 0.5 * losses[0]
    assert layer.D.abs().sum() > 0  # the depthwise part learns too


def test_compile_and_state_dict_round_trip():
    torch.manual_seed(0)
    layer = randomized(DOConv2d(4, 4, 3, groups=2, bias=True).double())
    x = torch.randn(1, 4, 6, 6, dtype=F64)
    torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(x), layer(x), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(layer.reparameterize().state_dict(), buffer)
    buffer.seek(0)
    plain = nn.Conv2d(4, 4, 3, padding=1, groups=2).double()
    plain.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert (plain(x) - layer(x)).abs().max().item() < 1e-10


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(in_channels=4, out_channels=4, kernel_size=3, D_mul=8), ValueError, "D_mul must be >= kernel_size.*= 9"),
    (dict(in_channels=4, out_channels=4, kernel_size=1, D_mul=4), ValueError, "a 1x1 DO-Conv is a plain conv"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, groups=4), ValueError, "out_channels=6 must be divisible"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, padding=-1), ValueError, "padding must be a non-negative int"),
    (dict(in_channels=4, out_channels=4, kernel_size=0), ValueError, "kernel_size must be a positive integer"),
    (dict(in_channels=4, out_channels=4, kernel_size=3, D_mul=9.0), TypeError, "D_mul must be an int"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DOConv2d(**kwargs)


def official_kernel_reference(layer: DOConv2d) -> torch.Tensor:
    """The official DO-Conv forward, one entry at a time: W read as (out/groups, in, D_mul) rows, row o' meeting
    D[i] at column block i, the (out/groups, in, K*K) result read back as (out, in/groups, K, K)."""
    out, cin, g, k = layer.out_channels, layer.in_channels, layer.groups, layer.kernel_size[0]
    rows = layer.W.detach().reshape(out // g, cin, layer.D_mul)
    depthwise = (layer.D + layer.d_diag).detach()
    kernel = torch.zeros(out // g, cin, k * k, dtype=layer.W.dtype)
    for o, i in itertools.product(range(out // g), range(cin)):
        kernel[o, i] = depthwise[i] @ rows[o, i]
    return kernel.reshape(out, cin // g, k, k)


@pytest.mark.parametrize("cin, cout, groups, matters", [
    (16, 32, 4, True), (16, 32, 16, True), (8, 8, 2, True), (6, 6, 1, False), (4, 4, 4, False)])  # the shapes
def test_official_grouping_matches_the_official_composition(cin, cout, groups, matters):
    layer = randomized(DOConv2d(cin, cout, 3, groups=groups, bias=True, grouping="official").double())
    reference = official_kernel_reference(layer)
    torch.testing.assert_close(layer.weight, reference, rtol=0, atol=1e-12)
    x = torch.randn(2, cin, 7, 7, dtype=F64)
    torch.testing.assert_close(layer(x), F.conv2d(x, reference, layer.bias, 1, 1, groups=groups), rtol=0, atol=1e-11)
    torch.testing.assert_close(layer.reparameterize()(x), layer(x), rtol=0, atol=1e-10)
    ours = DOConv2d(cin, cout, 3, groups=groups, bias=True).double()
    ours.load_state_dict(layer.state_dict())
    assert ours.grouping_matters == (not torch.equal(ours.weight, layer.weight)) == matters


def test_official_grouped_checkpoint_needs_its_grouping(tmp_path):
    """Regression: an official groups=4 checkpoint loaded strictly into the default layer and computed outputs
    1.2-1.4 away from the official ones; loading now asks which composition the file has."""
    from visionmix.models import load_checkpoint

    official = randomized(DOConv2d(16, 32, 3, groups=4, grouping="official").double())
    path = tmp_path / "doconv_official.pth"
    torch.save(nn.Sequential(official).state_dict(), path)
    x = torch.randn(1, 16, 6, 6, dtype=F64)
    model = nn.Sequential(DOConv2d(16, 32, 3, groups=4)).double()
    with pytest.raises(ValueError, match="doconv_grouping='official'"):
        load_checkpoint(model, path)
    load_checkpoint(model, path, doconv_grouping="official")
    assert model[0].grouping == "official"
    torch.testing.assert_close(model(x), official(x), rtol=0, atol=1e-12)
    plain = nn.Sequential(DOConv2d(16, 32, 3)).double()  # groups=1: nothing to choose
    torch.save(plain.state_dict(), path)
    load_checkpoint(plain, path)
    with pytest.raises(ValueError, match="grouping must be one of"):
        DOConv2d(4, 4, 3, grouping="pytorch")
