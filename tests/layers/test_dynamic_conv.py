"""CondConv2d and WeightNetConv2d against per-sample references built in this file from the papers' equations."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from visionmix.layers import CondConv2d, WeightNetConv2d

# (in, out, kernel, stride, padding, dilation, groups)
GEOMETRIES = [
    (4, 6, 3, 1, None, 1, 1),
    (4, 6, 3, 2, None, 1, 1),
    (6, 4, 3, 2, 0, 2, 2),
    (4, 8, 5, 1, 3, 2, 4),
    (6, 9, (3, 1), (2, 1), (1, 0), 1, 3),
    (4, 6, 1, 1, 0, 1, 1),
    (4, 4, 3, 2, 1, 1, 4),  # depthwise
]


def cond_conv_reference(layer: CondConv2d, x: torch.Tensor) -> torch.Tensor:
    """Eq. 1-2 of 1904.04971, one sample at a time: r = sigmoid(R GAP(x)), W = sum_e r_e W_e, y = W * x."""
    outputs = []
    for sample in x:
        r = torch.sigmoid(layer.routing.weight @ sample.mean((1, 2)) + layer.routing.bias)
        kernel = sum(r[e] * layer.experts[e] for e in range(layer.num_experts))
        bias = None if layer.bias is None else sum(r[e] * layer.bias[e] for e in range(layer.num_experts))
        outputs.append(F.conv2d(sample[None], kernel, bias, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outputs)


def grouped_1x1(weight: torch.Tensor, bias: torch.Tensor | None, inputs: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped 1x1 conv on one vector, written out: output c reads the input slice of group c // (C_out/groups)."""
    out_channels, in_per_group = weight.shape[:2]
    group = torch.arange(out_channels) // (out_channels // groups)
    index = group[:, None] * in_per_group + torch.arange(in_per_group)
    out = (weight[:, :, 0, 0] * inputs[index]).sum(1)
    return out if bias is None else out + bias


def weightnet_reference(layer: WeightNetConv2d, x: torch.Tensor, x_gap: torch.Tensor | None = None) -> torch.Tensor:
    """Sec. 3.2 of 2007.11823 / the official WeightNet and WeightNet_DW, one sample at a time."""
    outputs = []
    for b, sample in enumerate(x):
        if x_gap is None:
            gap = grouped_1x1(layer.reduce.weight, layer.reduce.bias, sample.mean((1, 2)), 1)
        else:
            gap = x_gap[b, :, 0, 0]
        gates = torch.sigmoid(grouped_1x1(layer.wn_fc1.weight, layer.wn_fc1.bias, gap, 1))
        fc2_groups = layer.in_channels if layer.depthwise else layer.G * layer.out_channels
        kernel = grouped_1x1(layer.wn_fc2.weight, None, gates, fc2_groups)
        kernel = kernel.view(layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
        outputs.append(F.conv2d(sample[None], kernel, None, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outputs)


def make_cond(geometry, bias=True, experts=3):
    cin, cout, k, s, p, d, g = geometry
    return CondConv2d(cin, cout, k, s, p, d, g, bias, num_experts=experts)


def make_weightnet(geometry, **kwargs):
    cin, cout, k, s, p, d, g = geometry
    return WeightNetConv2d(cin, cout, k, s, p, d, g, **kwargs)


def expected_shape(geometry, x):
    """Output shape of an nn.Conv2d with the same geometry ("same" padding spelled out)."""
    cin, cout, k, s, p, d, g = geometry
    if p is None:
        kh, kw = (k, k) if isinstance(k, int) else k
        p = (d * (kh - 1) // 2, d * (kw - 1) // 2)
    return nn.Conv2d(cin, cout, k, s, p, d, g)(x).shape


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("batch", [1, 3])
def test_cond_conv_matches_per_sample_reference(geometry, batch):
    layer = make_cond(geometry)
    x = torch.randn(batch, geometry[0], 7, 9)
    y = layer(x)
    assert y.shape == expected_shape(geometry, x)
    torch.testing.assert_close(y, cond_conv_reference(layer, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("batch", [1, 3])
def test_weightnet_matches_per_sample_reference(geometry, batch):
    cin, _, k, *_, groups = geometry
    kernel_entries = cin // groups * (k * k if isinstance(k, int) else k[0] * k[1])
    layer = make_weightnet(geometry, G=2 if kernel_entries % 2 == 0 else 1)  # G must divide the kernel entries
    x = torch.randn(batch, geometry[0], 7, 9)
    y = layer(x)
    assert y.shape == expected_shape(geometry, x)
    torch.testing.assert_close(y, weightnet_reference(layer, x), atol=1e-5, rtol=0)


def test_weightnet_more_gates_and_shared_x_gap():
    layer = WeightNetConv2d(4, 6, 3, stride=2, M=4, G=2, reduce_channels=5, own_reduce=False)
    assert layer.wn_fc1.weight.shape == (24, 5, 1, 1) and layer.wn_fc2.weight.shape == (6 * 4 * 9, 2, 1, 1)
    x, x_gap = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 1, 1)
    torch.testing.assert_close(layer(x, x_gap), weightnet_reference(layer, x, x_gap), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="x_gap is required"):
        layer(x)
    with pytest.raises(ValueError, match=r"x_gap must have shape .*\(2, 5, 1, 1\)"):
        layer(x, torch.randn(2, 4, 1, 1))


def test_cond_conv_shared_routing_weights():
    layer = make_cond((4, 6, 3, 1, None, 1, 2), experts=2)
    x, r = torch.randn(2, 4, 6, 6), torch.rand(2, 2)
    expected = torch.cat([F.conv2d(x[b:b + 1], r[b, 0] * layer.experts[0] + r[b, 1] * layer.experts[1],
                                   r[b] @ layer.bias, padding=1, groups=2) for b in range(2)])
    torch.testing.assert_close(layer(x, routing_weights=r), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"routing_weights must have shape .*\(2, 2\), got \(2, 3\)"):
        layer(x, routing_weights=torch.rand(2, 3))


def test_cond_conv_holds_its_experts_flat_and_saves_them_as_kernels():
    """The bank is a 2-D parameter (channels-last conversion leaves it alone), the state dict keeps the kernel
    layout (E, C_out, C_in/g, kh, kw) that runs saved before, and both load back exactly."""
    layer = make_cond((4, 6, 3, 1, None, 1, 2), experts=3)
    assert layer.weight.shape == (3, 6 * 2 * 9) and layer.state_dict()["weight"].shape == (3, 6, 2, 3, 3)
    torch.testing.assert_close(layer.state_dict()["weight"][1], layer.weight[1].view(6, 2, 3, 3), rtol=0, atol=0)
    other = make_cond((4, 6, 3, 1, None, 1, 2), experts=3)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    nhwc = nn.Sequential(nn.Conv2d(4, 4, 1), layer).to(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc(x), layer(nn.Sequential(nhwc[0])(x)), rtol=0, atol=1e-6)


def _gradcheck_module(layer: nn.Module, x: torch.Tensor) -> None:
    layer = layer.double()
    names, params = zip(*layer.named_parameters(), strict=True)

    def run(inp, *values):
        return functional_call(layer, dict(zip(names, values, strict=True)), (inp,))

    assert torch.autograd.gradcheck(run, (x.double().requires_grad_(), *params), fast_mode=True)


def test_cond_conv_gradcheck():
    _gradcheck_module(make_cond((2, 4, 3, 2, None, 1, 2), experts=2), torch.randn(2, 2, 5, 5))


def test_weightnet_gradcheck():
    _gradcheck_module(WeightNetConv2d(2, 2, 3, stride=2, reduce_channels=3), torch.randn(2, 2, 5, 5))
    _gradcheck_module(WeightNetConv2d(2, 2, 3, groups=2, reduce_channels=3), torch.randn(2, 2, 4, 5))


@pytest.mark.parametrize("factory", [lambda: make_cond((4, 6, 3, 2, None, 1, 2)),
                                     lambda: make_weightnet((4, 4, 3, 1, None, 2, 4))])
def test_backward_double_and_compile(factory):
    layer = factory()
    x = torch.randn(2, 4, 7, 5, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    layer = layer.double()
    assert layer(x.double()).dtype == torch.float64


def test_channels_last_input():
    layer = make_cond((4, 6, 3, 1, None, 1, 1))
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(layer(x.contiguous(memory_format=torch.channels_last)), layer(x))


class _ShuffleV2BlockKeys(nn.Module):
    """The WeightNet part of the official ShuffleNetV2 1.0x ``features.0`` (stride 2, 24 -> 116): one shared reduce."""

    def __init__(self):
        super().__init__()
        self.reduce = nn.Conv2d(24, 16, 1)
        shared = dict(reduce_channels=16, own_reduce=False)
        self.wnet1 = WeightNetConv2d(24, 56, 1, **shared)
        self.wnet2 = WeightNetConv2d(56, 56, 3, stride=2, groups=56, **shared)
        self.wnet3 = WeightNetConv2d(56, 88, 1, **shared)
        self.wnet_proj_1 = WeightNetConv2d(24, 24, 3, stride=2, groups=24, **shared)

    def forward(self, x):
        x_gap = self.reduce(x.mean((2, 3), keepdim=True))
        return self.wnet3(self.wnet2(self.wnet1(x, x_gap), x_gap), x_gap), self.wnet_proj_1(x, x_gap)


OFFICIAL_SHUFFLENET_KEYS = {  # features.0.* of the torch port of the MegEngine checkpoint
    "reduce.weight": (16, 24, 1, 1), "reduce.bias": (16,),
    "wnet1.wn_fc1.weight": (112, 16, 1, 1), "wnet1.wn_fc1.bias": (112,), "wnet1.wn_fc2.weight": (1344, 1, 1, 1),
    "wnet2.wn_fc1.weight": (56, 16, 1, 1), "wnet2.wn_fc1.bias": (56,), "wnet2.wn_fc2.weight": (504, 1, 1, 1),
    "wnet3.wn_fc1.weight": (176, 16, 1, 1), "wnet3.wn_fc1.bias": (176,), "wnet3.wn_fc2.weight": (4928, 1, 1, 1),
    "wnet_proj_1.wn_fc1.weight": (24, 16, 1, 1), "wnet_proj_1.wn_fc1.bias": (24,),
    "wnet_proj_1.wn_fc2.weight": (216, 1, 1, 1),
}


def test_weightnet_loads_official_layout_strict():
    block = _ShuffleV2BlockKeys()
    state = {key: torch.randn(shape) for key, shape in OFFICIAL_SHUFFLENET_KEYS.items()}
    block.load_state_dict(state, strict=True)
    x = torch.randn(2, 24, 8, 8)
    main, proj = block(x)
    assert main.shape == (2, 88, 4, 4) and proj.shape == (2, 24, 4, 4)
    x_gap = block.reduce(x.mean((2, 3), keepdim=True))
    torch.testing.assert_close(proj, weightnet_reference(block.wnet_proj_1, x, x_gap), atol=1e-4, rtol=1e-5)
    mid = weightnet_reference(block.wnet1, x, x_gap)
    torch.testing.assert_close(block.wnet2(mid, x_gap), weightnet_reference(block.wnet2, mid, x_gap),
                               atol=1e-4, rtol=1e-5)


def test_standalone_weightnet_owns_reduce():
    layer = WeightNetConv2d(24, 56, 1)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {
        "reduce.weight": (16, 24, 1, 1), "reduce.bias": (16,), "wn_fc1.weight": (112, 16, 1, 1),
        "wn_fc1.bias": (112,), "wn_fc2.weight": (1344, 1, 1, 1)}
    assert WeightNetConv2d(512, 8, 1).reduce_channels == 32


def test_cond_conv_expert_init_like_conv():
    layer = CondConv2d(64, 32, 3, num_experts=4)
    bound = 1 / (64 * 9) ** 0.5  # nn.Conv2d's kaiming-uniform(a=sqrt(5)) bound
    for expert in layer.weight:
        assert expert.abs().max() <= bound and expert.std() > 0.5 * bound
    assert not torch.equal(layer.weight[0], layer.weight[1])


@settings(max_examples=15, deadline=None)
@given(cin_per_group=st.integers(1, 3), cout_per_group=st.integers(1, 3), groups=st.integers(1, 3),
       kernel=st.sampled_from([1, 2, 3, 5]), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       padding=st.one_of(st.none(), st.integers(0, 2)), batch=st.integers(1, 2), height=st.integers(9, 12),
       width=st.integers(9, 12))  # >= the largest dilated kernel (9) without padding
def test_output_shape_rule(cin_per_group, cout_per_group, groups, kernel, stride, dilation, padding, batch, height,
                           width):
    cin, cout = cin_per_group * groups, cout_per_group * groups
    geometry = (cin, cout, kernel, stride, padding, dilation, groups)
    x = torch.randn(batch, cin, height, width)
    shape = expected_shape(geometry, x)
    assert make_cond(geometry)(x).shape == shape
    assert make_weightnet(geometry, G=1)(x).shape == shape


@pytest.mark.parametrize("kwargs, message", [
    (dict(in_channels=0), "in_channels must be a positive integer, got 0"),
    (dict(out_channels=5, groups=2), "out_channels=5 must be divisible by groups=2"),
    (dict(kernel_size=0), "kernel_size must be a positive integer, got 0"),
    (dict(padding=-1), "padding must be None"),
    (dict(stride=(1, 2, 3)), "stride must be an int or a pair"),
    (dict(num_experts=0), "num_experts must be a positive integer, got 0"),
])
def test_cond_conv_bad_arguments(kwargs, message):
    args = dict(in_channels=4, out_channels=4, kernel_size=3) | kwargs
    with pytest.raises(ValueError, match=message):
        CondConv2d(**args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(M=3), "M=3 must be divisible by G=2"),
    (dict(G=0), "G must be a positive integer, got 0"),
    (dict(in_channels=3, out_channels=6), r"in_channels/groups\*kh\*kw\)=27 must be divisible by G=2"),
    (dict(reduce_channels=0), "reduce_channels must be a positive integer, got 0"),
    (dict(in_channels=6, groups=4), "in_channels=6 must be divisible by groups=4"),
])
def test_weightnet_bad_arguments(kwargs, message):
    args = dict(in_channels=4, out_channels=4, kernel_size=3) | kwargs
    with pytest.raises(ValueError, match=message):
        WeightNetConv2d(**args)


@pytest.mark.parametrize("layer", [CondConv2d(4, 4, 3), WeightNetConv2d(4, 4, 3)])
def test_forward_rejects_wrong_rank_or_channels(layer):
    with pytest.raises(ValueError, match="expected a 4D NCHW input, got a 3D tensor"):
        layer(torch.randn(4, 5, 5))
    with pytest.raises(ValueError, match="expected 4 channels .* got 3"):
        layer(torch.randn(1, 3, 5, 5))


@pytest.mark.parametrize("geometry, factory", [((4, 6, 3, 2, None, 1, 2), make_cond),
                                               ((4, 4, 3, 1, None, 2, 4), make_weightnet)])
def test_empty_batch_gives_empty_output(geometry, factory):
    """groups = B*g is 0 for an empty batch; the layer must still return (0, C_out, H', W') like nn.Conv2d."""
    x = torch.randn(0, 4, 7, 5, requires_grad=True)
    out = factory(geometry)(x)
    assert out.shape == expected_shape(geometry, x) == (0, geometry[1], *expected_shape(geometry, x)[2:])
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("name", ["condconv_resnet_nano", "weightnet_resnet_nano"])
def test_dynamic_conv_resnets_take_an_empty_batch(name):
    from visionmix import create_model

    model = create_model(name, num_classes=7).eval()
    assert model(torch.randn(0, 1, 28, 28)).shape == (0, 7)
