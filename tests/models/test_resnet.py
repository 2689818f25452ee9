"""ResNet with pluggable convs and attention: torchvision semantics and keys, published sizes, the official DBB layout,
exact deployment, every conv x attention combination, nano models."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visionmix import reparameterize
from visionmix.layers import ConvBN
from visionmix.layers.attention import SelectiveKernel
from visionmix.layers.diverse_branch import DiverseBranchBlock
from visionmix.layers.overparam import DOConv2d
from visionmix.models import create_model, list_models, load_checkpoint, model_entry
from visionmix.models.resnet import ATTN_LAYERS, CONV_LAYERS, ResNet
from visionmix.reparam import check_equivalence, randomize_batchnorm

REFERENCE_FILE = Path(__file__).resolve().parent / "reference" / "checkpoint_keys_reparam_blocks.md"
NANOS = list_models("*nano", module="resnet")
TINY = dict(layers=(1, 1), widths=(8, 16), stem_width=8, small_input=True, in_chans=1, num_classes=3)


# ------------------------------------------------------------------------- torchvision layout and semantics
def _torchvision_layout(block: str, layers, widths, stem=64, in_chans=3, num_classes=1000, se=False):
    """Key -> shape of torchvision's ResNet (timm's SE-ResNet when ``se``), written from torchvision's naming."""

    def bn(p, c):
        return {f"{p}.weight": (c,), f"{p}.bias": (c,), f"{p}.running_mean": (c,), f"{p}.running_var": (c,),
                f"{p}.num_batches_tracked": ()}

    rows = {"conv1.weight": (stem, in_chans, 7, 7), **bn("bn1", stem)}
    chs = stem
    for i, (n, planes) in enumerate(zip(layers, widths, strict=True), start=1):
        for j in range(n):
            p, stride = f"layer{i}.{j}", 2 if i > 1 and j == 0 else 1
            if block == "basic":
                out = planes
                convs = [(planes, chs, 3), (planes, planes, 3)]
            else:
                out = 4 * planes
                convs = [(planes, chs, 1), (planes, planes, 3), (out, planes, 1)]
            for k, (o, c, ks) in enumerate(convs, start=1):
                rows |= {f"{p}.conv{k}.weight": (o, c, ks, ks), **bn(f"{p}.bn{k}", o)}
            if se:
                rd = round(out / 16)
                rows |= {f"{p}.se.fc1.weight": (rd, out, 1, 1), f"{p}.se.fc1.bias": (rd,),
                         f"{p}.se.fc2.weight": (out, rd, 1, 1), f"{p}.se.fc2.bias": (out,)}
            if stride != 1 or chs != out:
                rows |= {f"{p}.downsample.0.weight": (out, chs, 1, 1), **bn(f"{p}.downsample.1", out)}
            chs = out
    return rows | {"fc.weight": (num_classes, chs), "fc.bias": (num_classes,)}


def _torchvision_forward(sd, x, block: str, layers, se=False):
    """torchvision's ResNet (+ SE before the addition) written with functional ops on a torchvision state dict."""

    def bn(h, p):
        return F.batch_norm(h, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"])

    x = F.max_pool2d(F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    for i, n in enumerate(layers, start=1):
        for j in range(n):
            p, s = f"layer{i}.{j}", 2 if i > 1 and j == 0 else 1
            if block == "basic":
                out = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=s, padding=1), f"{p}.bn1"))
                out = bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            else:
                out = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
                out = F.relu(bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=s, padding=1), f"{p}.bn2"))
                out = bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            if se:
                g = F.relu(F.conv2d(out.mean((2, 3), keepdim=True), sd[f"{p}.se.fc1.weight"], sd[f"{p}.se.fc1.bias"]))
                out = out * torch.sigmoid(F.conv2d(g, sd[f"{p}.se.fc2.weight"], sd[f"{p}.se.fc2.bias"]))
            short = x
            if f"{p}.downsample.0.weight" in sd:
                short = bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=s), f"{p}.downsample.1")
            x = F.relu(out + short)
    return x.mean((2, 3)) @ sd["fc.weight"].T + sd["fc.bias"]


@pytest.mark.parametrize(("block", "se"), [("basic", False), ("bottleneck", False), ("bottleneck", True)])
def test_torchvision_checkpoint_loads_and_computes_the_same(block, se, tmp_path):
    """A torchvision-layout (timm for SE) state dict loads strictly and our model computes torchvision's function."""
    g = torch.Generator().manual_seed(0)
    layers, widths = (1, 2), (8, 16)
    sd = {}
    for key, shape in _torchvision_layout(block, layers, widths, stem=8, num_classes=5, se=se).items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            sd[key] = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
        else:
            sd[key] = 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    torch.save(sd, tmp_path / "torchvision.pth")
    model = ResNet(block, layers, widths=widths, stem_width=8, attn_layer="se" if se else None, num_classes=5)
    load_checkpoint(model.double().eval(), tmp_path / "torchvision.pth")
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    torch.testing.assert_close(model(x), _torchvision_forward(sd, x, block, layers, se), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "seresnet50"])
def test_torchvision_and_timm_keys_map_onto_every_key(name):
    with torch.device("meta"):
        model = create_model(name)
    block = "basic" if name in ("resnet18", "resnet34") else "bottleneck"
    layers = {"resnet18": (2, 2, 2, 2)}.get(name, (3, 4, 6, 3))
    foreign = {k: torch.empty(s, device="meta")
               for k, s in _torchvision_layout(block, layers, (64, 128, 256, 512), se=name == "seresnet50").items()}
    mapped = ResNet.checkpoint_filter_fn(foreign, model)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------- sizes vs published
@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "seresnet50", "skresnet50", "dbb_resnet18"])
def test_params_and_macs_match_published(name, model_stats):
    ref, stats = model_entry(name).reference, model_stats(name)
    assert stats.params == pytest.approx(ref.params, rel=1e-3)
    if ref.gmacs is not None:
        assert stats.macs / 1e9 == pytest.approx(ref.gmacs, rel=0.02)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "kwargs", "train", "deploy"), [
    ("resnet18", dict(conv_layer="dbb"), 26.29e6, 11.68e6),
    ("resnet18", dict(conv_layer="doconv"), None, 11.68e6),
    ("resnet50", dict(conv_layer="dbb"), 40.68e6, 25.53e6),
])
def test_deployed_size_is_the_plain_resnets(name, kwargs, train, deploy, model_stats):
    """SPEC: DBB-ResNet-18 26.29M -> 11.68M, DBB-ResNet-50 40.68M -> 25.53M, exactly the deployed plain model."""
    with torch.device("meta"):
        model = create_model(name, **kwargs)
        plain = reparameterize(create_model(name))
        deployed = reparameterize(model)
    if train is not None:
        assert _params(model) == pytest.approx(train, rel=1e-3)
    assert _params(deployed) == _params(plain) == pytest.approx(deploy, rel=1e-3)
    assert [(k, v.shape) for k, v in plain.state_dict().items() if "linear" in k or "stage0" in k] == \
           [(k, v.shape) for k, v in deployed.state_dict().items() if "linear" in k or "stage0" in k]
    assert model_stats(name).macs == _deployed_macs(deployed)


def _deployed_macs(model: nn.Module) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224))
    return counter.get_total_flops() / 2


def test_skresnet50_is_sknet50():
    with torch.device("meta"):
        model = create_model("skresnet50")
    sk = model.stage1[0].conv2
    assert isinstance(sk, SelectiveKernel) and sk.paths[0].conv.groups == 32 and sk.out_channels == 128
    assert sk.paths[1].conv.dilation == (2, 2) and sk.attn.fc_reduce.out_channels == 32  # d = max(128/16, L=32)
    assert model.stage4[0].conv2.attn.fc_reduce.out_channels == 64  # 1024 / 16


# ------------------------------------------------------------------------------------------- official DBB layout
def _dbb_reference() -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    sec = re.split(r"^## ", REFERENCE_FILE.read_text(), flags=re.M)
    sec = next(s for s in sec if s.startswith("DBB ResNet-18"))
    blocks = sec.split("```")
    rows = {}
    for form, listing in (("train", blocks[1]), ("deploy", blocks[3])):
        rows[form] = [(k, tuple(int(d) for d in re.findall(r"\d+", s)))
                      for k, s in (line.split(" ", 1) for line in listing.strip().splitlines())]
    return rows


def test_dbb_resnet18_layout_equals_official():
    """The official DBB-ResNet-18 keys and shapes, train form and deploy form, in order."""
    ref = _dbb_reference()
    with torch.device("meta"):
        model = create_model("dbb_resnet18")
        deployed = reparameterize(model)
    train = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    deploy = [(k, tuple(v.shape)) for k, v in deployed.state_dict().items()]
    assert train[:len(ref["train"])] == ref["train"]
    assert deploy[:len(ref["deploy"])] == ref["deploy"]
    assert deploy[len(ref["deploy"]):] == [("linear.weight", (1000, 512)), ("linear.bias", (1000,))]


# ------------------------------------------------------------------------------------------- deployment
@pytest.mark.parametrize("conv_layer", ["dbb", "doconv"])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_reparameterize_is_exact_and_plain(conv_layer, dtype, rtol):
    torch.manual_seed(0)
    model = create_model(f"{conv_layer}_resnet_nano").to(dtype)
    randomize_batchnorm(model)
    with torch.no_grad():  # move DO-Conv's D and DBB's identity residuals away from their zero init
        for name, p in model.named_parameters():
            if name.endswith(".D") or "idconv1" in name:
                p.normal_(std=0.3)
    deployed = reparameterize(model)
    plain = reparameterize(create_model("resnet_nano"))
    assert _params(deployed) == _params(plain) == model_entry(f"{conv_layer}_resnet_nano").reference.deploy_params
    assert {type(m) for m in deployed.modules()}.isdisjoint({nn.BatchNorm2d, ConvBN, DiverseBranchBlock, DOConv2d})
    x = torch.randn(4, 1, 28, 28, dtype=dtype)
    result = check_equivalence(model, deployed, x, rtol=rtol)
    assert result.ok, result
    assert model.training  # the original is left as it was


@pytest.mark.slow
def test_dbb_resnet18_deploys_exactly():
    torch.manual_seed(0)
    model = randomize_batchnorm(create_model("dbb_resnet18"))
    result = check_equivalence(model, reparameterize(model), torch.randn(2, 3, 64, 64))
    assert result.ok, result


@pytest.mark.parametrize("conv_layer", list(CONV_LAYERS))
def test_every_part_deploys_equivalently(conv_layer):
    """reparameterize never changes the function, also where it can only fold some BNs (dynamic convs, SK)."""
    for attn_layer in ATTN_LAYERS:
        torch.manual_seed(0)
        model = randomize_batchnorm(ResNet(conv_layer=conv_layer, attn_layer=attn_layer, **TINY).double())
        result = check_equivalence(model, reparameterize(model), torch.randn(2, 1, 8, 8, dtype=torch.float64))
        assert result.ok, (attn_layer, result)


# ------------------------------------------------------------------------------------------- combinations
@pytest.mark.parametrize("conv_layer", list(CONV_LAYERS))
def test_every_combination_builds_runs_and_learns(conv_layer):
    for block, attn_layer in itertools.product(("basic", "bottleneck"), ATTN_LAYERS):
        if block == "bottleneck" and attn_layer == "sk" and conv_layer != "conv":
            with pytest.raises(ValueError, match="no effect"):
                ResNet(block, conv_layer=conv_layer, attn_layer=attn_layer, **TINY)
            continue
        torch.manual_seed(0)
        model = ResNet(block, conv_layer=conv_layer, attn_layer=attn_layer, **TINY)
        out = model(torch.randn(2, 1, 12, 12))
        assert out.shape == (2, 3) and torch.isfinite(out).all(), (block, attn_layer)
        out.sum().backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), (block, attn_layer)


@pytest.mark.parametrize("kwargs", [dict(conv_layer=c) for c in CONV_LAYERS] + [dict(attn_layer=a) for a in
                                                                                   ("se", "sk", "ulsam")])
def test_compiles_without_graph_breaks(kwargs):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ResNet(layers=(1,), widths=(8,), stem_width=8, small_input=True, in_chans=1, num_classes=3, **kwargs)
    model = randomize_batchnorm(model).eval()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(torch.compile(model, backend="eager", fullgraph=True)(x), model(x))


def test_parts_sit_where_the_papers_put_them():
    model = ResNet(conv_layer="psconv", attn_layer="ulsam", **TINY)
    block = model.stage2[0]
    assert type(block.conv1.conv).__name__ == "PSConv2d" and type(block.conv2.conv).__name__ == "PSConv2d"
    assert type(block.shortcut) is ConvBN and type(model.stage0.conv1) is ConvBN  # 1x1 and stem stay plain
    assert type(block.attn).__name__ == "ULSAM" and block.attn.groups == 4
    sk = ResNet(attn_layer="sk", **TINY).stage1[0]
    assert isinstance(sk.conv1, SelectiveKernel) and type(sk.conv2) is ConvBN
    dbb = ResNet("bottleneck", conv_layer="dbb", **TINY).stage1[0]
    assert isinstance(dbb.conv2, DiverseBranchBlock) and type(dbb.conv1) is ConvBN and type(dbb.conv3) is ConvBN
    cond = create_model("condconv_resnet_nano")
    assert cond.stage1[0].conv1.conv.num_experts == 2 and create_model("condconv_resnet18").stage1[0].conv1.conv \
        .num_experts == 4


def test_bad_arguments_name_the_choices():
    with pytest.raises(ValueError, match=r"conv_layer must be one of .*'dbb'.*got 'dcn'"):
        create_model("resnet_nano", conv_layer="dcn")
    with pytest.raises(ValueError, match=r"attn_layer must be one of .*'se'.*got 'cbam'"):
        create_model("resnet_nano", attn_layer="cbam")
    with pytest.raises(ValueError, match="block must be one of"):
        ResNet("basicblock")
    with pytest.raises(ValueError, match="BasicBlock supports only groups=1"):
        ResNet("basic", groups=32)
    with pytest.raises(ValueError, match="channels=6 must be divisible by groups=4"):
        ResNet(attn_layer="ulsam", widths=(6, 12), layers=(1, 1))
    with pytest.raises(TypeError, match="num_experts"):
        create_model("resnet_nano", conv_layer="dbb", conv_kwargs=dict(num_experts=2))
    with pytest.raises(ValueError, match="expected 1 channels"):
        create_model("resnet_nano")(torch.randn(1, 3, 28, 28))


# ------------------------------------------------------------------------------------------- API and nano models
def test_any_input_size():
    """ResNet-specific: any input size, and img_size only sets pretrained_cfg (shared head API:
    test_every_model.py)."""
    model = create_model("resnet_nano", num_classes=7).eval()
    assert model.forward_features(torch.randn(3, 1, 28, 28)).shape == (3, 112, 7, 7) and model.num_features == 112
    assert model(torch.randn(2, 1, 33, 20)).shape == (2, 7) and model.get_classifier() is model.linear
    with torch.device("meta"):
        big = create_model("resnet50", img_size=320)
        assert big.forward_features(torch.empty(1, 3, 320, 256)).shape == (1, 2048, 10, 8)
    assert big.pretrained_cfg["input_size"] == (3, 320, 320)


def test_drop_path_rises_linearly_over_all_blocks():
    model = ResNet(layers=(2, 1), widths=(8, 16), stem_width=8, drop_path_rate=0.2)
    rates = [b.drop_path.drop_prob for b in (*model.stage1, *model.stage2)]
    assert rates == pytest.approx([0.0, 0.1, 0.2])


def test_init_is_torchvisions():
    torch.manual_seed(0)
    model = create_model("resnet50")
    w = model.stage3[0].conv2.conv.weight  # kaiming normal, fan_out, gain sqrt(2): std sqrt(2 / (256 * 9))
    assert abs(w.std().item() / (2 / (256 * 9)) ** 0.5 - 1) < 0.02
    assert torch.equal(model.stage3[0].conv2.bn.weight, torch.ones(256))


@pytest.mark.parametrize("name", [n if n == "resnet_nano" else pytest.param(n, marks=pytest.mark.slow) for n in NANOS])
def test_nano_trains(name, toy_training_losses):
    losses = toy_training_losses(name)
    assert losses[-1] < 0.5 * losses[0], losses


def test_nano_reference_figures_are_measured(model_stats):
    assert len(NANOS) == 9
    for name in NANOS:
        ref, stats = model_entry(name).reference, model_stats(name)
        assert stats.params == ref.params and 0.5e6 <= stats.params <= 1.5e6, name
        assert stats.macs / 1e9 == pytest.approx(ref.gmacs, abs=5e-6), name
