"""The rest of the model API over the whole registry: pretrained_cfg that follows the model built, create_model's
timm keyword arguments, the unpooled head on NCHW models and which parameters escape weight decay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visionmix.models import create_model, list_models, model_entry

ALL = list_models()
NANOS = list_models("*nano*")
LAYER_SCALE_NORM_POS = ("gamma", "layer_scale", "norm", "bn", "pos_embed", "cpe")


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


@pytest.mark.parametrize("name", ALL)
def test_cfg_names_real_keys(name):
    model = _meta(name)
    cfg, keys = model.pretrained_cfg, set(model.state_dict())
    assert f"{cfg['first_conv']}.weight" in keys
    assert isinstance(model.get_submodule(cfg["first_conv"]), nn.Conv2d | nn.Conv3d)  # Conv3d: video models
    assert f"{cfg['classifier']}.weight" in keys and model.get_submodule(cfg["classifier"]) is model.get_classifier()
    assert cfg["num_classes"] == model.num_classes and len(cfg["mean"]) == len(cfg["std"]) == cfg["input_size"][0]
    assert model.default_cfg is cfg


@pytest.mark.parametrize("name, kwargs, first_conv", [
    ("spach_nano_conv", dict(stem_type="conv4"), "stem.proj.0"),
    ("uniformer_small", dict(conv_stem=True), "patch_embed1.proj.0"),
    ("uniformer_small_plus", {}, "patch_embed1.proj.0"),
    ("resnet_nano", dict(conv_layer="dbb"), "stage0.conv1.conv"),
])
def test_cfg_follows_options(name, kwargs, first_conv):
    model = _meta(name, **kwargs)
    assert model.pretrained_cfg["first_conv"] == first_conv
    assert f"{first_conv}.weight" in model.state_dict()


def test_cfg_follows_in_chans_img_size_and_reset_classifier():
    model = create_model("resnet_nano", in_chans=3, img_size=32)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.5,) * 3 and cfg["std"] == (0.5,) * 3
    grey = _meta("resnet18", in_chans=1).pretrained_cfg
    assert grey["mean"] == pytest.approx((sum((0.485, 0.456, 0.406)) / 3,))
    model.reset_classifier(7)
    assert cfg["num_classes"] == 7 and model.default_cfg["num_classes"] == 7
    model.reset_classifier(0)
    assert cfg["num_classes"] == 0


def test_create_model_keywords():
    model = create_model("mixer_nano", dtype=torch.float64, device="cpu",
                         pretrained_cfg_overlay=dict(crop_pct=1.0))
    assert next(model.parameters()).dtype == torch.float64 and model.pretrained_cfg["crop_pct"] == 1.0
    assert create_model("mixer_nano", pretrained_cfg=dict(interpolation="bilinear")).pretrained_cfg[
        "interpolation"] == "bilinear"
    with pytest.raises(ValueError, match="no released weights 'mixer_nano.goog_in21k'"):
        create_model("mixer_nano.goog_in21k")
    with pytest.raises(ValueError, match="no released weights 'mixer_b16_224.nope': its tags: goog_in21k, "):
        create_model("mixer_b16_224.nope")
    with pytest.raises(ValueError, match="output_stride"):
        create_model("resnet_nano", output_stride=8)
    with pytest.raises(TypeError, match="pretrained_cfg_overlay must be a dict"):
        create_model("resnet_nano", pretrained_cfg_overlay="a1_in1k")
    create_model("resnet_nano", scriptable=None, exportable=False)  # timm's defaults pass


def test_unpooled_head_on_nchw_models_is_rejected():
    """Regression: global_pool='' on a ResNet fed (B, C, H, W) to the Linear head, which then mixed the W axis."""
    with pytest.raises(ValueError, match="global_pool='' .* needs num_classes=0 on ResNet"):
        create_model("resnet_nano", global_pool="")
    model = create_model("resnet_nano", global_pool="", num_classes=0).eval()
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 112, 7, 7)  # unpooled features
    with pytest.raises(ValueError, match="global_pool=''"):
        model.reset_classifier(10)
    model.reset_classifier(10, global_pool="avg")
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    # token models keep it: the Linear acts on channels, the last axis
    assert create_model("s2mlpv2_nano", global_pool="").eval()(torch.randn(1, 1, 28, 28)).shape == (1, 7, 7, 10)


@pytest.mark.parametrize("name", NANOS)
def test_no_layer_scale_norm_or_pos_embed_is_decayed(name):
    """Regression (SPACH's (1, 1, C) gamma was decayed): what the engine's param_groups would decay is only the
    parameters of rank >= 2 that no_weight_decay() does not name (exactly or by a module prefix)."""
    model = _meta(name)
    skip = model.no_weight_decay()
    for pname, p in model.named_parameters():
        named = pname in skip or any(pname.startswith(s + ".") for s in skip)
        if any(part in pname for part in LAYER_SCALE_NORM_POS):
            assert p.ndim <= 1 or named, pname
        if name.startswith(("mixer", "resnet_nano")) and p.ndim > 1:
            assert not named, pname  # plain weights stay decayed


def test_no_weight_decay_per_family():
    assert {"blocks.0.gamma_1", "blocks.0.cpe_net.net.1.weight"} <= _meta("spach_nano_attn").no_weight_decay()
    assert "blocks2.0.pos_embed.weight" in _meta("uniformer_nano").no_weight_decay()
    assert "blocks3.0.gamma_1" in _meta("uniformer_base_ls").no_weight_decay()


@pytest.mark.parametrize("name", ALL)
def test_every_model_converts_to_channels_last(name):
    """``model.to(memory_format=torch.channels_last)`` converts every 4-D/5-D tensor a model holds: a parameter that
    is not an image (CondConv's bank of expert kernels) must not be 5-D."""
    video = len(model_entry(name).cfg["input_size"]) == 4  # (C, T, H, W): 5-D kernels, channels_last_3d
    fmt = torch.channels_last_3d if video else torch.channels_last
    model = _meta(name).to(memory_format=fmt)
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv3d if video else nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=fmt) for w in convs)
