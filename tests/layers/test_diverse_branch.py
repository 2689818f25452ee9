"""DiverseBranchBlock (2103.13425): eval-mode branches against a padded-input reference, exact deploy, official keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from training import randomized, sgd_losses

from visionmix.layers import ConvBN, DiverseBranchBlock
from visionmix.reparam import randomize_batchnorm

F64 = torch.float64


def reference_eval(block: DiverseBranchBlock, x: torch.Tensor) -> torch.Tensor:
    """The four branches of fig. 2 in eval mode, written on the zero-padded input.

    BN-and-pad exists to make each branch equal to "pad the input with zeros, then run the branch without padding";
    this reference runs exactly that, so it does not share BNAndPad's code path.
    """
    k, s, p, g = block.kernel_size, block.stride, block.padding, block.groups
    xp = F.pad(x, [p] * 4)

    def conv(t, weight, stride=1):
        return F.conv2d(t, weight, stride=stride, groups=g)

    out = block.dbb_origin.bn(conv(xp, block.dbb_origin.conv.weight, s))
    if block.dbb_1x1 is not None:  # the pixel under the KxK kernel's centre
        centre = conv(xp[..., k // 2:, k // 2:], block.dbb_1x1.conv.weight, s)
        out = out + block.dbb_1x1.bn(centre[..., : out.shape[-2], : out.shape[-1]])
    avg = block.dbb_avg
    pooled = F.avg_pool2d(avg.bn.bn(conv(xp, avg.conv.weight)) if hasattr(avg, "conv") else xp, k, s)
    out = out + avg.avgbn(pooled)
    seq = block.dbb_1x1_kxk
    first = seq.idconv1.weight + seq.idconv1.identity if hasattr(seq, "idconv1") else seq.conv1.weight
    return out + seq.bn2(conv(seq.bn1.bn(conv(xp, first)), seq.conv2.weight, s))



CONFIGS = [  # in, out, k, stride, padding, groups, internal
    (4, 6, 3, 1, None, 1, None),  # dense: idconv1
    (6, 6, 3, 1, None, 6, None),  # depthwise: conv1 with 2x internal, avg-pool+BN only
    (4, 6, 3, 2, None, 2, None),  # stride 2, grouped
    (4, 6, 5, 1, 0, 1, None),  # padding 0 ("valid")
    (4, 4, 5, 2, 1, 1, 6),  # padding 1 < k//2, internal != in
    (4, 8, 3, 1, 1, 2, 8),
    (6, 6, 5, 2, 1, 6, 6),  # depthwise, padding < k//2, stride 2
]


@pytest.mark.parametrize("cin, cout, k, stride, padding, groups, internal", CONFIGS)
def test_branches_and_exact_deploy(cin, cout, k, stride, padding, groups, internal):
    block = randomized(DiverseBranchBlock(cin, cout, k, stride, padding, groups=groups,
                                          internal_channels=internal).double(), scale=0.5)
    x = torch.randn(2, cin, 9, 8, dtype=F64)
    out = block(x)
    torch.testing.assert_close(out, reference_eval(block, x), rtol=0, atol=1e-11)

    deployed = block.reparameterize()
    conv = deployed.dbb_reparam
    plain = nn.Conv2d(cin, cout, k, stride, block.padding, groups=groups)
    assert type(conv) is nn.Conv2d and len(deployed) == 1
    assert (conv.stride, conv.padding, conv.groups) == (plain.stride, plain.padding, plain.groups)
    assert sum(p.numel() for p in deployed.parameters()) == sum(p.numel() for p in plain.parameters())
    assert (deployed(x) - out).abs().max().item() < 1e-10

    block32, x32 = block.float(), x.float()
    out32 = block32(x32)
    assert (block32.reparameterize()(x32) - out32).abs().max().item() < 1e-4 * out32.abs().max().item()


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def _bn_keys(prefix: str, n: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{k}": (n,) for k in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()}


def test_official_layout_dense():
    block = DiverseBranchBlock(32, 64, 3, 1, 1)
    expected = {"dbb_origin.conv.weight": (64, 32, 3, 3), **_bn_keys("dbb_origin.bn", 64),
                "dbb_avg.conv.weight": (64, 32, 1, 1), **_bn_keys("dbb_avg.bn.bn", 64), **_bn_keys("dbb_avg.avgbn", 64),
                "dbb_1x1.conv.weight": (64, 32, 1, 1), **_bn_keys("dbb_1x1.bn", 64),
                "dbb_1x1_kxk.idconv1.weight": (32, 32, 1, 1), **_bn_keys("dbb_1x1_kxk.bn1.bn", 32),
                "dbb_1x1_kxk.conv2.weight": (64, 32, 3, 3), **_bn_keys("dbb_1x1_kxk.bn2", 64)}
    assert _shapes(block) == expected
    _load_random_official(block, expected)
    assert _shapes(block.reparameterize()) == {"dbb_reparam.weight": (64, 32, 3, 3), "dbb_reparam.bias": (64,)}


def test_official_layout_depthwise():
    block = DiverseBranchBlock(32, 32, 3, padding=1, groups=32)
    expected = {"dbb_origin.conv.weight": (32, 1, 3, 3), **_bn_keys("dbb_origin.bn", 32),
                **_bn_keys("dbb_avg.avgbn", 32),
                "dbb_1x1_kxk.conv1.weight": (64, 1, 1, 1), **_bn_keys("dbb_1x1_kxk.bn1.bn", 64),
                "dbb_1x1_kxk.conv2.weight": (32, 2, 3, 3), **_bn_keys("dbb_1x1_kxk.bn2", 32)}
    assert _shapes(block) == expected
    _load_random_official(block, expected)
    assert _shapes(block.reparameterize()) == {"dbb_reparam.weight": (32, 1, 3, 3), "dbb_reparam.bias": (32,)}


def _load_random_official(block: DiverseBranchBlock, shapes: dict[str, tuple[int, ...]]) -> None:
    """A checkpoint with the official names loads strictly and the block then deploys exactly."""
    g = torch.Generator().manual_seed(1)
    state = {name: (torch.rand(shape, generator=g) + 0.5 if "var" in name else torch.randn(shape, generator=g))
             for name, shape in shapes.items()}
    state = {name: torch.tensor(7) if name.endswith("num_batches_tracked") else t for name, t in state.items()}
    block.load_state_dict(state, strict=True)
    block.double().eval()
    x = torch.randn(1, block.in_channels, 6, 6, dtype=F64)
    assert (block.reparameterize()(x) - block(x)).abs().max().item() < 1e-10


def test_identity_conv_starts_as_identity_and_pad_value_is_bn_of_zero():
    block = DiverseBranchBlock(4, 4, 3).double()
    x = torch.randn(1, 4, 5, 5, dtype=F64)
    idconv = block.dbb_1x1_kxk.idconv1
    assert torch.equal(idconv(x), x) and "identity" not in idconv.state_dict()
    bn_and_pad = randomize_batchnorm(block.dbb_1x1_kxk.bn1).eval()
    padded = bn_and_pad(x)
    assert padded.shape == (1, 4, 7, 7)
    torch.testing.assert_close(padded[..., 1:-1, 1:-1], bn_and_pad.bn(x), rtol=0, atol=0)
    border = bn_and_pad.bn(torch.zeros(1, 4, 1, 1, dtype=F64)).expand(1, 4, 7, 7)
    ring = torch.ones(7, 7, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    torch.testing.assert_close(padded[..., ring], border[..., ring], rtol=0, atol=1e-15)


def test_train_form_trains_and_compiles():
    torch.manual_seed(0)
    block, teacher = DiverseBranchBlock(3, 4, 3), nn.Conv2d(3, 4, 3, padding=1)
    inputs = torch.randn(8, 3, 6, 6)
    target = teacher(inputs).detach()
    losses = sgd_losses(block, inputs, target, lr=0.1)
    assert losses[-1] < 0.7 * losses[0]
    block.eval()
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(inputs), block(inputs), rtol=0, atol=0)


def test_gradcheck_train_mode():
    block = randomized(DiverseBranchBlock(2, 2, 3).double(), scale=0.5).train()
    for bn in block.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = 0.0  # keep the running statistics (and so the pad values) fixed between evaluations
    x = torch.randn(2, 2, 4, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), fast_mode=True)


@pytest.mark.parametrize("source", ["conv", "conv_no_bias", "conv_bn", "depthwise"])
def test_from_conv_keeps_eval_outputs(source):
    torch.manual_seed(0)
    conv = {"conv": lambda: nn.Conv2d(4, 6, 3, 2, 1), "conv_no_bias": lambda: nn.Conv2d(4, 6, 5, padding=1, bias=False),
            "conv_bn": lambda: randomize_batchnorm(ConvBN(4, 6, 3)).eval(),
            "depthwise": lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4)}[source]().double()
    block = DiverseBranchBlock.from_conv(conv).eval()
    x = torch.randn(2, 4, 8, 8, dtype=F64)
    assert (block(x) - conv(x)).abs().max().item() < 1e-12
    assert all(bn.weight.abs().sum() == 0 for bn in block.branch_output_bns()[1:])
    if source == "conv_bn":
        assert torch.equal(block.dbb_origin.bn.running_var, conv.bn.running_var)
    # the other branches start to learn: their output BNs get gradients
    block.train()
    block(x).square().sum().backward()
    assert all(bn.weight.grad.abs().sum() > 0 for bn in block.branch_output_bns()[1:])


@pytest.mark.parametrize("args, kwargs, match", [
    ((4, 4, 4), {}, "kernel_size must be odd"),
    ((4, 4, 3), {"dilation": 2}, "dilation must be 1"),
    ((4, 4, 3), {"padding": 2}, "padding must be an int in \\[0, 1\\]"),
    ((4, 8, 3), {"groups": 8}, "out_channels=8 must be divisible|in_channels=4 must be divisible"),
    ((8, 4, 3), {"groups": 4}, "needs in_channels == out_channels"),
    ((4, 4, 3), {"groups": 2, "internal_channels": 3}, "internal_channels=3 must be divisible by groups=2"),
    ((4, 4, 3), {"internal_channels": 0}, "internal_channels must be a positive integer"),
])
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiverseBranchBlock(*args, **kwargs)
