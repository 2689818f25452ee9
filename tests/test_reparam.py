"""visionmix.reparameterize / check_equivalence / convert_convs on whole models, including a user's own."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionmix
from visionmix.layers import ConvBN, DiverseBranchBlock, DOConv2d, RepMLPBlock
from visionmix.reparam import Equivalence, Reparameterizable, randomize_batchnorm

F64 = torch.float64


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Block(nn.Module):
    """A residual block with DBB convs and a ConvBN shortcut, named like the official DBB-ResNet."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = DiverseBranchBlock(cin, cout, 3, stride)
        self.conv2 = DiverseBranchBlock(cout, cout, 3)
        self.shortcut = ConvBN(cin, cout, 1, stride) if stride > 1 else nn.Identity()

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class TinyDBBResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stage0 = nn.Sequential()
        self.stage0.add_module("conv1", ConvBN(3, 8, 7, 2))
        self.stage1 = nn.Sequential(Block(8, 8, 1))
        self.stage2 = nn.Sequential(Block(8, 16, 2))
        self.mix = RepMLPBlock(16, 16, 4, 4, 2, 2, fc3_groups=2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 5))

    def forward(self, x):
        return self.head(self.mix(self.stage2(self.stage1(self.stage0(x)))))


def trained_model() -> TinyDBBResNet:
    torch.manual_seed(0)
    return randomize_batchnorm(TinyDBBResNet().double(), seed=3)


def test_deploys_every_block_with_official_keys():
    model = trained_model()
    x = torch.randn(2, 3, 16, 16, dtype=F64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deployed = visionmix.reparameterize(model)
    assert model.training and not deployed.training and all(not m.training for m in deployed.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    keys = set(deployed.state_dict())
    assert {"stage0.conv1.conv.weight", "stage0.conv1.conv.bias", "stage1.0.conv1.dbb_reparam.weight",
            "stage1.0.conv2.dbb_reparam.bias", "stage2.0.shortcut.conv.weight", "stage2.0.shortcut.conv.bias",
            "mix.fc3.bias", "mix.fc1_fc2.fc1.weight"} <= keys
    leftovers = [m for m in deployed.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 or (isinstance(m, Reparameterizable) and not isinstance(m, RepMLPBlock))]
    assert not leftovers
    result = visionmix.check_equivalence(model, deployed, x)
    assert result.ok and result.max_abs < 1e-10 and model.training  # modes restored
    # exactly the plain model's parameter count: a biased conv for every conv+BN, the deploy-form RepMLP
    convs = [model.stage0.conv1.conv, model.stage2[0].shortcut.conv] + [
        m.dbb_origin.conv for m in model.modules() if isinstance(m, DiverseBranchBlock)]
    plain = sum(c.weight.numel() + c.out_channels for c in convs)
    plain += n_params(RepMLPBlock(16, 16, 4, 4, 2, 2, fc3_groups=2, deploy=True)) + n_params(model.head)
    assert n_params(deployed) == plain


def test_float32_equivalence_and_state_dict_round_trip():
    model = trained_model().float()
    x = torch.randn(2, 3, 16, 16)
    deployed = visionmix.reparameterize(model)
    result = visionmix.check_equivalence(model, deployed, x)
    assert isinstance(result, Equivalence) and result.rtol == 1e-4 and result.max_rel < 1e-4, result
    buffer = io.BytesIO()
    torch.save(deployed.state_dict(), buffer)
    buffer.seek(0)
    fresh = visionmix.reparameterize(TinyDBBResNet())  # the deployed structure, with other weights
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert torch.equal(fresh(x), deployed(x))


def test_inplace_and_deployed_models_are_no_ops():
    model = trained_model()
    x = torch.randn(1, 3, 16, 16, dtype=F64)
    deployed = visionmix.reparameterize(model, inplace=True)
    assert deployed is model and not isinstance(model.stage1[0].conv1, DiverseBranchBlock)
    state = {k: v.clone() for k, v in deployed.state_dict().items()}
    again = visionmix.reparameterize(deployed)
    assert again.state_dict().keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in again.state_dict().items())
    assert torch.equal(again(x), deployed(x))


def test_root_module_and_plain_modules():
    torch.manual_seed(0)
    block = randomize_batchnorm(DiverseBranchBlock(4, 4, 3).double())
    deployed = visionmix.reparameterize(block)
    assert isinstance(deployed, nn.Sequential) and isinstance(deployed.dbb_reparam, nn.Conv2d)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))  # no ConvBN: left as it is
    assert isinstance(visionmix.reparameterize(plain)[1], nn.BatchNorm2d)


def test_bn_without_running_stats_is_a_clear_error():
    block = ConvBN(3, 4, 3)
    block.bn = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="without running statistics"):
        visionmix.reparameterize(nn.Sequential(block))


def test_check_equivalence_reports_differences():
    a, b = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.bias += 1e-3
    x = torch.randn(4, 3, dtype=F64)
    result = visionmix.check_equivalence(a, b, x, rtol=1e-6)
    scale = a(x).abs().max().item()
    assert result.max_abs == pytest.approx(1e-3) and result.max_rel == pytest.approx(1e-3 / scale)
    assert not result.ok and "NOT equivalent" in str(result)
    with pytest.raises(ValueError, match="outputs differ in structure"):
        visionmix.check_equivalence(a, nn.Linear(3, 5).double(), x)


class UserNet(nn.Module):
    """Someone else's model: plain convs in odd places, BNs outside any ConvBN, a subclass conv."""

    class ScaledConv(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 7, 2, 3)  # 7x7: stays
        self.body = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                   nn.Conv2d(8, 8, 5, padding=2, groups=8), ConvBN(8, 12, 3, 2)])
        self.proj = nn.Conv2d(12, 12, 1)  # 1x1: stays
        self.special = self.ScaledConv(12, 12, 3, padding=1)  # a subclass: stays
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.body:
            x = F.relu(layer(x))
        return self.head(self.special(self.proj(x)).mean((2, 3)))


@pytest.mark.parametrize("to, layer", [("doconv", DOConv2d), ("dbb", DiverseBranchBlock)])
def test_convert_convs_converts_by_the_dbb_resnet_rule(to, layer):
    torch.manual_seed(0)
    net = randomize_batchnorm(UserNet().double()).eval()
    converted = visionmix.convert_convs(net, to=to)
    assert isinstance(net.body[0], nn.Conv2d)  # a copy was converted
    assert type(converted.stem) is nn.Conv2d and type(converted.proj) is nn.Conv2d
    assert type(converted.special) is UserNet.ScaledConv
    assert isinstance(converted.body[0], layer) and isinstance(converted.body[2], layer)
    if to == "dbb":
        assert isinstance(converted.body[3], DiverseBranchBlock)  # the ConvBN is one unit
    else:
        assert isinstance(converted.body[3], ConvBN) and isinstance(converted.body[3].conv, DOConv2d)
    x = torch.randn(2, 3, 16, 16, dtype=F64)
    assert visionmix.check_equivalence(net, converted, x).max_abs < 1e-12  # identical at conversion (eval)
    if to == "doconv":
        converted.train()
        net.train()
        assert torch.equal(converted(x), net(x))  # DO-Conv: identical in train mode too
    deployed = visionmix.reparameterize(converted)
    extra_bias = 0 if to == "doconv" else 8  # a DBB deploys with a bias, also where the conv (body.0) had none
    assert n_params(deployed) == n_params(visionmix.reparameterize(net)) + extra_bias


def test_convert_then_train_then_reparameterize_matches():
    torch.manual_seed(0)
    for to in ("doconv", "dbb"):
        net = visionmix.convert_convs(UserNet(), to=to)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
        losses = []
        for _ in range(5):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], (to, losses)
        if to == "doconv":
            assert net.body[0].D.abs().sum() > 0
        deployed = visionmix.reparameterize(net)
        result = visionmix.check_equivalence(net, deployed, x)
        assert result.ok, (to, result)


def test_convert_convs_options_and_bad_input():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))
    assert visionmix.convert_convs(net, to="doconv", D_mul=12)[0].D_mul == 12
    assert visionmix.convert_convs(net, to="dbb", internal_channels=8)[0].dbb_1x1_kxk.conv1.out_channels == 8
    root = visionmix.convert_convs(nn.Conv2d(4, 4, 3), to="doconv")
    assert isinstance(root, DOConv2d)
    with pytest.raises(ValueError, match="to must be one of 'doconv', 'dbb'; got 'unknown'"):
        visionmix.convert_convs(net, to="unknown")
    with pytest.raises(TypeError, match="unexpected options \\['D_mul'\\]; it accepts \\['internal_channels'\\]"):
        visionmix.convert_convs(net, to="dbb", D_mul=12)
    already = visionmix.convert_convs(net, to="dbb")
    again = visionmix.convert_convs(already, to="dbb")  # re-parameterisable modules are left alone
    assert again.state_dict().keys() == already.state_dict().keys()


# ------------------------------------------------- models visionmix did not build: each deploy convention
class _TwoBranch(nn.Module):
    """3x3 + 1x1 branches (RepVGG-like, no BN) whose sum folds into one 3x3 conv."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.kxk = nn.Conv2d(channels, channels, 3, padding=1)
        self.one = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "fused"):
            return self.fused(x)
        return self.kxk(x) + self.one(x)

    @torch.no_grad()
    def folded(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.kxk.in_channels, self.kxk.out_channels, 3, padding=1).to(self.kxk.weight.dtype)
        conv.weight.copy_(self.kxk.weight + F.pad(self.one.weight, (1, 1, 1, 1)))
        conv.bias.copy_(self.kxk.bias + self.one.bias)
        return conv

    def convert_in_place(self) -> None:
        if not hasattr(self, "fused"):  # the official blocks return early once deployed
            self.fused = self.folded()
            del self.kxk, self.one


class InPlaceReparam(_TwoBranch):  # timm's MobileOne / FastViT: reparameterize() converts in place, returns None
    def reparameterize(self) -> None:
        self.convert_in_place()


class SwitchToDeploy(_TwoBranch):  # the official DBB / RepVGG code
    def switch_to_deploy(self) -> None:
        self.convert_in_place()


class Fuse(_TwoBranch):  # timm's fuse(): returns the replacement
    def fuse(self) -> nn.Module:
        return self.folded()


class ChildNamedFuse(nn.Module):  # a submodule called "fuse" is not a deploy method
    def __init__(self) -> None:
        super().__init__()
        self.fuse = SwitchToDeploy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(x)


def test_every_deploy_convention_of_foreign_models():
    """Regression: an in-place reparameterize() returning None crashed the walk with AttributeError."""
    torch.manual_seed(0)
    model = nn.Sequential(InPlaceReparam(), nn.ReLU(), SwitchToDeploy(), nn.ReLU(), Fuse(), ChildNamedFuse()).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    deployed = visionmix.reparameterize(model)
    assert not any(name.endswith(("kxk", "one")) for name, _ in deployed.named_modules())
    assert type(deployed[4]) is nn.Conv2d and all(hasattr(m, "fused") for m in (deployed[0], deployed[2],
                                                                                  deployed[5].fuse))
    assert visionmix.check_equivalence(model, deployed, x).ok
    assert hasattr(model[0], "kxk")  # the caller's model is untouched
    assert visionmix.check_equivalence(model, visionmix.reparameterize(deployed), x).ok  # deploying twice: no-op


def test_a_deploy_method_returning_something_else_is_a_type_error():
    class Odd(nn.Module):
        def fuse(self) -> str:
            return "done"

    with pytest.raises(TypeError, match=r"Odd.fuse\(\) returned a str"):
        visionmix.reparameterize(Odd())


def test_a_method_of_that_name_that_needs_arguments_is_not_a_deploy_method():
    class Vae(nn.Module):  # a VAE's reparameterisation trick is not structural re-parameterisation
        def __init__(self) -> None:
            super().__init__()
            self.block = SwitchToDeploy()

        def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
            return mu + torch.randn_like(mu) * (0.5 * logvar).exp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x)

    deployed = visionmix.reparameterize(Vae())  # crashed: reparameterize() missing 2 required arguments
    assert hasattr(deployed.block, "fused") and not hasattr(deployed.block, "kxk")
