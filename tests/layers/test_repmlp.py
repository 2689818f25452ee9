"""RepMLPBlock v1 (2105.01883v1): a per-partition loop reference, exact deploy in float64/32, official keys."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from training import randomized, sgd_losses

from visionmix.layers import RepMLPBlock

F64 = torch.float64


def reference_eval(block: RepMLPBlock, x: torch.Tensor) -> torch.Tensor:
    """Section 3 written partition by partition with explicit matmuls (eval-mode BNs as modules)."""
    b, c, big_h, big_w = x.shape
    h, w, g, o = block.h, block.w, block.fc3_groups, block.out_channels
    out = torch.zeros(b, o, big_h, big_w, dtype=x.dtype)
    for i in range(0, big_h, h):
        for j in range(0, big_w, w):
            part = x[:, :, i:i + h, j:j + w]
            if block.fc1_fc2 is not None:  # global perceptron, evaluated per partition
                pooled = block.avg.bn(F.avg_pool2d(x, (h, w))).flatten(1)
                fc = block.fc1_fc2
                glob = F.linear(F.relu(F.linear(pooled, fc.fc1.weight, fc.fc1.bias)), fc.fc2.weight, fc.fc2.bias)
                glob = glob.reshape(b, c, big_h // h, big_w // w)[:, :, i // h, j // w]
                part = part + glob[:, :, None, None]
            flat = part.flatten(1).chunk(g, dim=1)  # partition perceptron: one FC per group
            weights = block.fc3.weight.flatten(1).chunk(g, dim=0)
            fc3 = torch.cat([f @ wg.T for f, wg in zip(flat, weights, strict=True)], dim=1)
            local = block.fc3_bn(fc3).reshape(b, o, h, w)
            for k in block.reparam_conv_k:  # local perceptron on the partition alone (zero padding at its border)
                branch = getattr(block, f"repconv{k}")
                local = local + branch.bn(F.conv2d(part, branch.conv.weight, padding=k // 2, groups=g))
            out[:, :, i:i + h, j:j + w] = local
    return out



CONFIGS = [  # in, out, H, W, h, w, reparam_conv_k, fc3_groups, fc1_fc2_reduction
    (4, 6, 8, 8, 4, 4, (1, 3, 5), 1, 1),  # in != out
    (4, 4, 6, 9, 3, 3, (1, 3, 5), 2, 2),  # non-square map, groups, reduced global MLP
    (8, 4, 4, 6, 4, 2, (3,), 4, 1),  # non-square partitions, fc3_groups = 4
    (4, 4, 5, 5, 5, 5, (1, 3), 1, 1),  # one partition: no global perceptron
    (2, 6, 6, 4, 2, 2, None, 2, 1),  # no local perceptron
]


@pytest.mark.parametrize("cin, cout, H, W, h, w, ks, groups, reduction", CONFIGS)
def test_reference_and_exact_deploy(cin, cout, H, W, h, w, ks, groups, reduction):
    block = randomized(RepMLPBlock(cin, cout, H, W, h, w, reparam_conv_k=ks, fc3_groups=groups,
                                   fc1_fc2_reduction=reduction).double(), scale=0.3)
    x = torch.randn(3, cin, H, W, dtype=F64)
    out = block(x)
    assert out.shape == (3, cout, H, W)
    torch.testing.assert_close(out, reference_eval(block, x), rtol=0, atol=1e-11)

    deployed = block.reparameterize()
    plain = RepMLPBlock(cin, cout, H, W, h, w, fc3_groups=groups, fc1_fc2_reduction=reduction, deploy=True)
    assert deployed.deploy and not deployed.training
    assert sum(p.numel() for p in deployed.parameters()) == sum(p.numel() for p in plain.parameters())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deployed.modules())
    assert (deployed(x) - out).abs().max().item() < 1e-10
    assert deployed.reparameterize() is deployed  # converting a deployed block is a no-op

    block32, x32 = block.float(), x.float()
    out32 = block32(x32)
    assert (block32.reparameterize()(x32) - out32).abs().max().item() < 1e-4 * out32.abs().max().item()


def test_official_v1_layout_train_and_deploy():
    block = RepMLPBlock(8, 8, H=14, W=14, h=7, w=7, reparam_conv_k=(1, 3, 5), fc3_groups=4)
    shapes = {name: tuple(t.shape) for name, t in block.state_dict().items()}
    bn = {"weight", "bias", "running_mean", "running_var"}
    expected = {"fc1_fc2.fc1.weight": (32, 32), "fc1_fc2.fc1.bias": (32,), "fc1_fc2.fc2.weight": (32, 32),
                "fc1_fc2.fc2.bias": (32,), "fc3.weight": (392, 98, 1, 1),
                **{f"avg.bn.{k}": (8,) for k in bn}, **{f"fc3_bn.{k}": (392,) for k in bn},
                **{f"repconv{k}.conv.weight": (8, 2, k, k) for k in (1, 3, 5)},
                **{f"repconv{k}.bn.{n}": (8,) for k in (1, 3, 5) for n in bn},
                **{f"{p}.num_batches_tracked": () for p in ("avg.bn", "fc3_bn", "repconv1.bn", "repconv3.bn",
                                                             "repconv5.bn")}}
    assert shapes == expected
    g = torch.Generator().manual_seed(0)
    state = {n: torch.rand(s, generator=g) + 0.5 if "var" in n else torch.randn(s, generator=g) * 0.1
             for n, s in shapes.items()}
    block.load_state_dict({n: torch.tensor(3) if "num_batches" in n else t for n, t in state.items()}, strict=True)
    deployed = block.eval().reparameterize()
    deploy_keys = {"fc1_fc2.fc1.weight": (32, 32), "fc1_fc2.fc1.bias": (32,), "fc1_fc2.fc2.weight": (32, 32),
                   "fc1_fc2.fc2.bias": (32,), "fc3.weight": (392, 98, 1, 1), "fc3.bias": (392,)}
    assert {n: tuple(t.shape) for n, t in deployed.state_dict().items()} == deploy_keys
    # a deploy-form checkpoint loads strictly into a deploy=True block and reproduces the outputs
    buffer = io.BytesIO()
    torch.save(deployed.state_dict(), buffer)
    buffer.seek(0)
    fresh = RepMLPBlock(8, 8, 14, 14, 7, 7, fc3_groups=4, deploy=True)
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    x = torch.randn(2, 8, 14, 14)
    out = block(x)
    assert (fresh(x) - out).abs().max().item() < 1e-4 * out.abs().max().item()


def test_train_form_trains_and_compiles():
    torch.manual_seed(0)
    block = RepMLPBlock(4, 4, 8, 8, 4, 4, reparam_conv_k=(1, 3))
    inputs = torch.randn(8, 4, 8, 8)
    target = F.avg_pool2d(inputs, 3, 1, 1).roll(1, dims=1)  # a local, learnable map
    losses = sgd_losses(block, inputs, target, lr=0.1)
    assert losses[-1] < 0.7 * losses[0]
    block.eval()
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(inputs), block(inputs), rtol=0, atol=0)


def test_gradcheck_eval_mode():
    block = randomized(RepMLPBlock(2, 2, 4, 4, 2, 2, reparam_conv_k=(1, 3), fc3_groups=2).double(), scale=0.3)
    x = torch.randn(2, 2, 4, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), fast_mode=True)


@pytest.mark.parametrize("args, kwargs, match", [
    ((4, 4, 14, 14, 5, 7), {}, "H=14 must be divisible by h=5"),
    ((4, 4, 14, 14, 7, 4), {}, "W=14 must be divisible by w=4"),
    ((4, 6, 8, 8, 4, 4), {"fc3_groups": 4}, "out_channels=6 must be divisible by fc3_groups=4"),
    ((4, 4, 8, 8, 4, 4), {"reparam_conv_k": (1, 2)}, "reparam_conv_k must hold odd kernel sizes"),
    ((4, 4, 8, 8, 4, 4), {"reparam_conv_k": (3, 3)}, "repeated sizes"),
    ((1, 4, 4, 4, 2, 2), {"fc1_fc2_reduction": 8}, "leaves no hidden units"),
])
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        RepMLPBlock(*args, **kwargs)


def test_bad_input_size():
    block = RepMLPBlock(4, 4, 8, 8, 4, 4)
    with pytest.raises(ValueError, match="expected a 8x8 input"):
        block(torch.randn(1, 4, 8, 12))
    with pytest.raises(ValueError, match="expected 4 channels"):
        block(torch.randn(1, 3, 8, 8))
