"""Feature extraction (timm 1.0's API): forward_intermediates, feature_info, prune_intermediate_layers,
features_only, gradient checkpointing and group_matcher, on every nano model and one 224 px model per family."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import visionmix.models._base as base
from visionmix import reparameterize
from visionmix.models import create_model, list_models, model_entry

# image models; the video models' 5-D levels are tested in test_uniformer_video.py
IMAGES = [n for n in list_models() if len(model_entry(n).cfg["input_size"]) == 3]  # video models: their own tests
NANOS = [n for n in IMAGES if "nano" in n]
FAMILY_224 = ["mixer_s32_224", "s2mlpv2_small", "spach_xxs_patch16_224_attn", "spach_ms_xxs_patch4_224_attn",
              "uniformer_small", "resnet18"]
ONE_PER_FAMILY = ["mixer_nano", "s2mlpv2_nano", "spach_nano_attn", "spach_ms_nano_mlp", "uniformer_nano",
                  "resnet_nano", "dbb_resnet_nano"]


def _input(model, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *model.pretrained_cfg["input_size"], generator=g)


def _check_intermediates(model, x: torch.Tensor) -> None:
    final, intermediates = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
    assert len(intermediates) == len(model.feature_info)
    for t, info in zip(intermediates, model.feature_info, strict=True):
        r = info["reduction"]
        assert t.shape == (x.shape[0], info["num_chs"], x.shape[2] // r, x.shape[3] // r)
        model.get_submodule(info["module"])  # names a real submodule
    # the last level, normalised and pooled, is what the head sees
    last = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[-1]
    torch.testing.assert_close(last.mean((2, 3)), model.forward_head(final, pre_logits=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NANOS)
def test_intermediates_match_feature_info_and_forward(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    with torch.no_grad():
        _check_intermediates(model, _input(model))


@pytest.mark.parametrize("name", FAMILY_224)
def test_intermediates_224(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    with torch.no_grad():
        _check_intermediates(model, _input(model, batch=1))


@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGES)
def test_every_registered_model_has_feature_levels_that_match_its_intermediates(name):
    """Shapes only, on the meta device (no memory, no arithmetic), so the whole registry is cheap."""
    with torch.device("meta"):
        model = create_model(name).eval()
        x = torch.empty(1, *model.pretrained_cfg["input_size"])
        intermediates = model.forward_intermediates(x, intermediates_only=True)
        features = create_model(name, features_only=True).eval()(x)
    assert [tuple(t.shape[1:]) for t in intermediates] == [
        (info["num_chs"], x.shape[2] // info["reduction"], x.shape[3] // info["reduction"])
        for info in model.feature_info]
    assert [t.shape for t in features] == [intermediates[i].shape for i in model.default_out_indices()]


def test_feature_levels_per_family():
    """Stage ends for pyramids (ResNets with timm's stem level first), every block for single-stage models and for
    models of fewer than 3 stages (timm's minimum of 3 levels; a stage's downsampling joins its first block)."""
    assert create_model("resnet18").feature_info.reduction() == [2, 4, 8, 16, 32]
    assert create_model("resnet18").feature_info.module_name() == ["stage0.relu", *(f"stage{i}" for i in range(1, 5))]
    assert create_model("uniformer_small").feature_info.channels() == [64, 128, 320, 512]
    assert create_model("uniformer_small").feature_info.reduction() == [4, 8, 16, 32]
    s2mlp = create_model("s2mlpv2_nano")
    assert s2mlp.feature_info.module_name() == ["stages.0.0", "stages.0.1", *(f"stages.1.{j}" for j in range(1, 6))]
    assert s2mlp.feature_info.reduction() == [2, 2, 4, 4, 4, 4, 4] and s2mlp._level_blocks[2] == ["stages.1.0",
                                                                                                 "stages.1.1"]
    assert create_model("spach_ms_nano_conv").feature_info.module_name() == [
        "layer1.0", "layer1.1", *(f"layer2.{j}" for j in range(1, 7))]
    assert create_model("spach_ms_xxs_patch4_224_conv").feature_info.module_name() == [f"layer{i}" for i in range(1, 5)]
    uniformer = create_model("uniformer_nano")
    assert uniformer.feature_info.module_name() == ["blocks1.0", "blocks1.1", *(f"blocks2.{j}" for j in range(4))]
    assert uniformer._level_blocks[:3] == [["patch_embed1", "blocks1.0"], ["blocks1.1"], ["patch_embed2", "blocks2.0"]]
    assert create_model("spach_nano_conv").feature_info.module_name() == [f"blocks.{i}" for i in range(8)]
    info = create_model("mixer_nano").feature_info
    assert info.reduction() == [4] * 6 and info.channels() == [160] * 6 and info.channels(-1) == 160


def test_indices_int_negative_list_and_formats():
    model = create_model("spach_nano_conv").eval()  # 8 levels
    x = _input(model)
    with torch.no_grad():
        every = model.forward_intermediates(x, intermediates_only=True)
        last3 = model.forward_intermediates(x, indices=3, intermediates_only=True)
        picked = model.forward_intermediates(x, indices=[-1, 0, 2], intermediates_only=True)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        nhwc = model.forward_intermediates(x, indices=[-1], output_fmt="NHWC", intermediates_only=True)
    for got, want in [(last3, every[5:]), (picked, [every[0], every[2], every[7]]), (early, [every[1]])]:
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert torch.equal(nhwc[0], every[7].permute(0, 2, 3, 1))
    for bad in (0, 9, [8], [-9], [], [1.0], [1, 1], [-1, 7]):
        with pytest.raises(ValueError, match="indices"):
            model.forward_intermediates(x, indices=bad)
    with pytest.raises(ValueError, match=r"each feature level once, got \[1, 1\]"):
        create_model("spach_nano_conv", features_only=True, out_indices=(1, 1))
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")


@pytest.mark.parametrize("name", NANOS)
def test_prune_keeps_outputs(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = _input(model)
    n_levels = len(model.feature_info)
    keep = [0, -2] if n_levels > 2 else [-2]  # each level once: in a 2-level model -2 is level 0
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=keep, intermediates_only=True)
        taken = model.prune_intermediate_layers(keep)
        got = model.forward_intermediates(x, indices=taken, intermediates_only=True)  # -2 now means another level
    assert taken == sorted({0, n_levels - 2}) and len(model.feature_info) == n_levels - 1
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert model.num_classes == 0
    dropped = create_model(name).feature_info[-1]["module"]
    assert not any(k.startswith(dropped + ".") for k in model.state_dict())


def test_prune_removes_later_levels_norm_and_head():
    model = create_model("uniformer_nano")
    model.prune_intermediate_layers(indices=[0], prune_norm=True)
    assert not any(k.startswith(("blocks2.", "patch_embed2.", "norm.", "head.")) for k in model.state_dict())
    mixer = create_model("mixer_nano")
    mixer.prune_intermediate_layers(indices=[1], prune_head=False)
    assert len(mixer.blocks) == 2 and mixer.num_classes == 10 and "norm.weight" in mixer.state_dict()


@pytest.mark.parametrize("name", NANOS)
def test_features_only_deploys(name):
    torch.manual_seed(0)
    features = create_model(name, features_only=True).eval()
    model = create_model(name).eval()
    x = _input(model)
    outs = features(x)
    assert isinstance(outs, list) and len(outs) == len(features.feature_info)
    for t, info in zip(outs, features.feature_info, strict=True):
        assert t.shape[1] == info["num_chs"] and t.shape[2] == x.shape[2] // info["reduction"]
    deployed = reparameterize(features)
    with torch.no_grad():
        for a, b in zip(deployed(x), features(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_features_only_compiles(name):
    features = create_model(name, features_only=True, out_indices=(-2, -1)).eval()
    x = _input(features)
    compiled = torch.compile(features, backend="eager", fullgraph=True)
    with torch.no_grad():
        for a, b in zip(compiled(x), features(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_features_only_info_and_defaults():
    features = create_model("resnet18", features_only=True, out_indices=(1, 2, 3))  # timm's seresnet18 probe
    assert features.feature_info.channels() == [64, 128, 256] and features.feature_info.reduction() == [4, 8, 16]
    assert [t.shape[1:] for t in features(torch.randn(1, 3, 224, 224))] == [(64, 56, 56), (128, 28, 28),
                                                                             (256, 14, 14)]
    assert not any(k.startswith(("model.stage4.", "model.linear.")) for k in features.state_dict())
    assert create_model("mixer_nano", features_only=True).out_indices == [3, 4, 5]  # timm: last 3 blocks
    # fewer than 3 stages: the stage ends, then the latest blocks until there are 3
    assert create_model("uniformer_nano", features_only=True).out_indices == [1, 4, 5]
    assert create_model("s2mlpv2_small", features_only=True).feature_info.module_name() == [
        "stages.0.3", "stages.1.13", "stages.1.14"]
    assert create_model("resnet_nano", features_only=True).out_indices == [0, 1, 2, 3]  # every level of a pyramid
    with pytest.raises(ValueError, match="features_only"):
        create_model("resnet_nano", out_indices=(1,))


@pytest.mark.slow
@pytest.mark.parametrize("name", NANOS)
def test_grad_checkpointing_changes_nothing(name, monkeypatch):
    torch.manual_seed(0)
    plain = create_model(name, drop_path_rate=0.1).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    calls = []
    real = base.checkpoint
    monkeypatch.setattr(base, "checkpoint", lambda fn, *a, **kw: calls.append(kw) or real(fn, *a, **kw))
    x = _input(plain, batch=2)
    outputs = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # the same drop-path draws for both
        out = model(x)
        out.square().sum().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=n)
    n_blocks = sum(base.is_block(n) for names in ckpt._level_blocks for n in names)
    assert len(calls) == n_blocks and all(kw["use_reentrant"] is False for kw in calls)
    for (n, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers(), strict=True):  # BN stats updated once
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("name", [*NANOS, "uniformer_small", "resnet50", "spach_ms_xs_patch4_224_hybrid"])
def test_group_matcher_covers_every_parameter(name):
    with torch.device("meta"):
        model = create_model(name)
    classifier = {f"{model.head_name}.{n}" for n, _ in model.get_classifier().named_parameters()}
    for coarse in (False, True):
        groups = model.group_matcher(coarse)
        assert set(groups) == {"stem", "blocks"}
        stem = re.compile(groups["stem"])
        blocks = [(re.compile(r), index) for r, index in groups["blocks"]]
        for pname, _ in model.named_parameters():
            hits = [index for r, index in blocks if r.match(pname)] + ([("stem",)] if stem.match(pname) else [])
            assert len(hits) == (pname not in classifier), (pname, hits)
        indices = [index for _, (index,) in groups["blocks"]]
        assert indices == sorted(indices)  # depth order, the final norm last
        if coarse:
            assert set(indices) - {base.LAST_GROUP} <= set(range(len(model.feature_info)))


def test_group_matcher_fine_is_one_group_per_block():
    groups = create_model("resnet_nano").group_matcher()
    assert groups["stem"] == r"^(?:stage0)\."
    assert [index for _, index in groups["blocks"]] == [(i,) for i in range(6)]
    assert re.match(groups["blocks"][2][0], "stage2.0.conv1.conv.weight")
