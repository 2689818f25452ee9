"""PSConv2d against a per-channel-pair reference derived here from the official modules' semantics."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from visionmix.layers import PSConv2d


def official_pair_roles(layer: PSConv2d) -> dict[tuple[int, int], tuple[torch.Tensor, int]]:
    """(out, global in) -> (3x3 kernel, dilation), read off the official three-conv layout.

    gwconv (groups*parts groups, dilation d): output o reads input block o // (C_out/(g*P)), slot t -> weight[o, t].
    gwconv_shift (same groups, dilation 2d): the same, but on the input with each conv group's halves swapped.
    conv (groups groups, dilation 1): every other pair of the same conv group.
    """
    cin, cout, g, parts, d = layer.in_channels, layer.out_channels, layer.groups, layer.parts, layer.dilation
    block_in, block_out = cin // (g * parts), cout // (g * parts)
    group_in, group_out = cin // g, cout // g
    swapped = [c // group_in * group_in + (c % group_in + group_in // 2) % group_in for c in range(cin)]
    roles = {}
    for o in range(cout):
        block_inputs = [o // block_out * block_in + t for t in range(block_in)]
        for t, c in enumerate(block_inputs):
            roles[o, c] = layer.gwconv.weight[o, t], d
        for t, c in enumerate(block_inputs):
            assert (o, swapped[c]) not in roles, "gwconv and gwconv_shift would cover the same pair"
            roles[o, swapped[c]] = layer.gwconv_shift.weight[o, t], 2 * d
        for i in range(group_in):
            roles.setdefault((o, o // group_out * group_in + i), (layer.conv.weight[o, i], 1))
    return roles


def pairwise_reference(layer: PSConv2d, x: torch.Tensor) -> torch.Tensor:
    """For every (out, in) pair, a kxk conv at that pair's dilation; summed over the inputs."""
    k = layer.kernel_size
    out = None
    for (o, c), (kernel, dilation) in official_pair_roles(layer).items():
        y = F.conv2d(x[:, c:c + 1], kernel[None, None], None, layer.stride, dilation * (k - 1) // 2, dilation)
        if out is None:
            out = x.new_zeros(y.shape[0], layer.out_channels, *y.shape[2:])
        out[:, o] += y[:, 0]
    return out if layer.conv.bias is None else out + layer.conv.bias[:, None, None]


def randomize(layer: PSConv2d) -> PSConv2d:
    """Random weights everywhere, masked dense entries included: they must not act."""
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# (in, out, kernel, stride, dilation, groups, parts)
CONFIGS = [
    (8, 8, 3, 1, 2, 1, 4),
    (8, 12, 3, 2, 1, 1, 4),
    (16, 8, 3, 1, 2, 2, 4),  # groups != parts
    (24, 12, 3, 2, 2, 3, 4),  # groups != parts, odd groups
    (16, 16, 3, 1, 1, 4, 2),
    (12, 12, 5, 2, 1, 1, 6),
    (8, 8, 3, 1, 3, 1, 2),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("bias", [False, True])
def test_fast_form_equals_pairwise_reference(config, bias):
    cin, cout, k, s, d, g, parts = config
    layer = randomize(PSConv2d(cin, cout, k, s, dilation=d, groups=g, parts=parts, bias=bias)).double()
    x = torch.randn(2, cin, 9, 7, dtype=torch.float64)
    expected = pairwise_reference(layer, x)
    torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.reference_forward(x), expected, atol=1e-10, rtol=0)


def test_float32_matches_reference_and_batch_one():
    layer = randomize(PSConv2d(16, 16, 3, stride=2, groups=2))
    x = torch.randn(1, 16, 11, 10)
    torch.testing.assert_close(layer(x), pairwise_reference(layer, x), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("config", CONFIGS)
def test_dilation_map_matches_official_layout_and_paper_cycle(config):
    cin, cout, k, s, d, g, parts = config
    layer = PSConv2d(cin, cout, k, s, dilation=d, groups=g, parts=parts)
    dilations = layer.dilation_map()
    for (o, c), (_, dilation) in official_pair_roles(layer).items():
        assert dilations[o, c % (cin // g)] == dilation
    assert int(layer.dense_mask.sum()) == cout * (cin // g) * (parts - 2) // parts  # P-2 of P parts stay dense


def test_dilation_map_parts4_cycle():
    # parts 4: output part p sees input parts p, p+1, p+2, p+3 at dilations d, 1, 2d, 1 (d = 2 here).
    expected = torch.tensor([[2, 1, 4, 1], [1, 2, 1, 4], [4, 1, 2, 1], [1, 4, 1, 2]])
    assert torch.equal(PSConv2d(64, 64).dilation_map()[::16, ::16], expected)
    grouped = PSConv2d(16, 16, groups=2).dilation_map()  # 2 conv groups of 8 channels, parts of 2 channels
    assert torch.equal(grouped[::2, ::2], torch.cat([expected, expected]))


@pytest.mark.parametrize("cin, cout, groups, parts", [(64, 64, 1, 4), (128, 128, 32, 4), (16, 24, 2, 4),
                                                      (12, 12, 3, 2), (8, 16, 1, 2)])
def test_effective_parameters_equal_plain_conv(cin, cout, groups, parts):
    layer = PSConv2d(cin, cout, 3, groups=groups, parts=parts)
    assert layer.num_effective_parameters == cin * cout * 9 // groups
    plain = nn.Conv2d(cin, cout, 3, groups=groups, bias=True)
    with_bias = PSConv2d(cin, cout, 3, groups=groups, parts=parts, bias=True)
    assert with_bias.num_effective_parameters == sum(p.numel() for p in plain.parameters())
    assert PSConv2d(64, 64).num_effective_parameters == 36_864


def test_masked_entries_get_no_gradient_and_do_not_act():
    layer = PSConv2d(8, 8, groups=1, parts=4)
    x = torch.randn(2, 8, 6, 6)
    layer(x).square().sum().backward()
    masked = ~layer.dense_mask.expand_as(layer.conv.weight)
    assert layer.conv.weight.grad[masked].abs().max() == 0
    assert layer.conv.weight.grad[~masked].abs().min() > 0
    assert layer.conv.weight[masked].abs().max() == 0
    before = layer(x)
    with torch.no_grad():
        layer.conv.weight[masked] = 5.0
    torch.testing.assert_close(layer(x), before)


@pytest.mark.parametrize("config, keys", [
    (dict(in_channels=64, out_channels=64, padding=1, dilation=2, parts=4),
     {"gwconv.weight": (64, 16, 3, 3), "gwconv_shift.weight": (64, 16, 3, 3), "conv.weight": (64, 64, 3, 3)}),
    (dict(in_channels=128, out_channels=128, padding=1, dilation=2, groups=32, parts=4),  # official PSGConv2d
     {"gwconv.weight": (128, 1, 3, 3), "gwconv_shift.weight": (128, 1, 3, 3), "conv.weight": (128, 4, 3, 3)}),
])
def test_loads_official_layout_strict(config, keys):
    layer = PSConv2d(**config)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == keys
    state = {k: torch.randn(shape) for k, shape in keys.items()}
    state["conv.weight"] *= layer.dense_mask  # official checkpoints hold zeros in the masked blocks
    layer.load_state_dict(state, strict=True)
    x = torch.randn(2, config["in_channels"], 5, 6)
    # The official forward: conv(x) + gwconv(x) + gwconv_shift(x with each group's halves swapped).
    groups = config.get("groups", 1)
    swapped = torch.cat([torch.cat(g.chunk(2, dim=1)[::-1], dim=1) for g in x.chunk(groups, dim=1)], dim=1)
    official = layer.conv(x) + layer.gwconv(x) + layer.gwconv_shift(swapped)
    torch.testing.assert_close(layer(x), official, atol=1e-4, rtol=1e-5)


def test_gradcheck_backward_double_compile():
    layer = PSConv2d(8, 8, 3, stride=2, groups=2, parts=2, bias=True).double()
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: layer(inp), (x,), fast_mode=True)
    layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    layer = layer.float()
    assert layer.dense_mask.dtype == torch.bool
    xf = x.detach().float()
    torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(xf), layer(xf))


@settings(max_examples=15, deadline=None)
@given(groups=st.integers(1, 3), parts=st.sampled_from([2, 4]), in_mult=st.integers(1, 2), out_mult=st.integers(1, 2),
       kernel=st.sampled_from([1, 3, 5]), stride=st.integers(1, 3), dilation=st.integers(1, 3),
       batch=st.integers(1, 2), height=st.integers(4, 9), width=st.integers(4, 9))
def test_output_shape_rule(groups, parts, in_mult, out_mult, kernel, stride, dilation, batch, height, width):
    cin, cout = groups * parts * in_mult, groups * parts * out_mult
    layer = PSConv2d(cin, cout, kernel, stride, dilation=dilation, groups=groups, parts=parts)
    x = torch.randn(batch, cin, height, width)
    assert layer(x).shape == nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups)(x).shape


@pytest.mark.parametrize("kwargs, message", [
    (dict(in_channels=0), "in_channels must be a positive integer, got 0"),
    (dict(parts=3), "parts must be even .* got 3"),
    (dict(in_channels=10), "in_channels=10 must be divisible by groups\\*parts=4"),
    (dict(groups=2, out_channels=12), "out_channels=12 must be divisible by groups\\*parts=8"),
    (dict(kernel_size=4), "kernel_size must be odd .* got 4"),
    (dict(padding=0), r"padding must be None or \(kernel_size-1\)//2=1: .* got 0"),
    (dict(dilation=0), "dilation must be a positive integer, got 0"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PSConv2d(**(dict(in_channels=16, out_channels=16) | kwargs))


def test_forward_rejects_wrong_rank_or_channels():
    layer = PSConv2d(8, 8)
    with pytest.raises(ValueError, match="expected a 4D NCHW input"):
        layer(torch.randn(8, 5, 5))
    with pytest.raises(ValueError, match="expected 8 channels .* got 4"):
        layer(torch.randn(1, 4, 5, 5))
