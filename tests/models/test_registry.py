"""Registry (timm conventions) and the zoo-wide nano budget: 0.5-1.5M parameters, MACs within 2x of one another."""

from __future__ import annotations

import pytest
import torch

import visionmix
from visionmix.models import create_model, is_model, list_models, model_entry

OUR_MODULES = ("mlp_mixer", "s2mlp", "spach")
NANOS = [n for n in list_models("*nano*") if len(model_entry(n).cfg["input_size"]) == 3]  # video: its own tests


def test_list_models_patterns():
    mixers = ["mixer_s16_224", "mixer_s32_224", "mixer_b16_224", "mixer_b32_224", "mixer_l16_224", "mixer_l32_224"]
    assert sorted(list_models("mixer_*_224")) == sorted(mixers)
    assert list_models("s2mlpv2_*") == ["s2mlpv2_medium", "s2mlpv2_nano", "s2mlpv2_small"]
    assert list_models(["s2mlpv2_s*", "mixer_s32*"]) == ["mixer_s32_224", "s2mlpv2_small"]
    ms = list_models("spach_ms_*", exclude_filters="*nano*")
    assert len(ms) == 12 and all(n.startswith("spach_ms_") and "nano" not in n for n in ms)
    assert len(list_models(module="spach")) == 27  # 21 official (with Hybrid-MS-S+) + 6 nano
    assert list_models("spach_ms_x*_conv") == ["spach_ms_xs_patch4_224_conv", "spach_ms_xxs_patch4_224_conv"]
    assert set(list_models()) >= set(mixers) and visionmix.list_models is list_models


def test_is_model():
    assert is_model("mixer_b16_224") and is_model("mixer_b16_224.goog_in21k")
    assert not is_model("mixer_b16_225") and not is_model("")


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'mixer_b16_244'.*closest: mixer_b16_224"):
        create_model("mixer_b16_244")
    with pytest.raises(ValueError, match=r"spach_ms_s_patch4_224_hybrid"):
        visionmix.create_model("spach_ms_s_patch4_224_hybird")


def test_none_kwargs_are_dropped_and_cfg_is_set():
    model = create_model("spach_nano_attn", num_classes=None, drop_path_rate=None, img_size=None)
    cfg = model.pretrained_cfg
    assert model.num_classes == 10 and cfg["num_classes"] == 10 and cfg["input_size"] == (1, 28, 28)
    assert cfg["architecture"] == "spach_nano_attn" and model.default_cfg is cfg
    model = create_model("spach_nano_attn", num_classes=3, in_chans=3, img_size=32)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32) and model.pretrained_cfg["num_classes"] == 3
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_a_model_without_released_weights_says_so():
    with pytest.raises(ValueError, match="no released weights 'mixer_nano': it has no released weights visionmix "
                                         "can download .*checkpoint_path="):
        create_model("mixer_nano", pretrained=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for m in OUR_MODULES for n in list_models(module=m)])
def test_every_model_has_the_timm_api(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=7)
        cfg = model.pretrained_cfg
        x = torch.empty(2, *cfg["input_size"])
        feats = model.forward_features(x)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
        assert model(x).shape == (2, 7) and model.get_classifier().out_features == 7
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
    assert model.in_chans == cfg["input_size"][0] and isinstance(model.no_weight_decay(), set)
    for key in ("mean", "std", "first_conv", "classifier", "fixed_input_size", "interpolation", "crop_pct"):
        assert key in cfg
    assert cfg["classifier"] == "head" and cfg["first_conv"].startswith("stem.proj")
    entry = model_entry(name)
    assert entry.reference.params is not None and entry.reference.gmacs is not None


@pytest.mark.parametrize("name", [n for n in NANOS if model_entry(n).module in OUR_MODULES])
def test_nano_reference_figures_are_measured(name, model_stats):
    ref, stats = model_entry(name).reference, model_stats(name)
    assert stats.params == ref.params
    assert stats.macs / 1e9 == pytest.approx(ref.gmacs, abs=5e-5)


@pytest.mark.slow  # builds every nano model
def test_nano_zoo_budget(model_stats):
    """Every family's nano (at its default 1x1x28x28, 10 classes): 0.5-1.5M parameters, MACs within 2x."""
    assert len(NANOS) >= 8
    stats = {name: model_stats(name) for name in NANOS}
    for name, s in stats.items():
        assert 0.5e6 <= s.params <= 1.5e6, (name, s.params)
        assert model_entry(name).cfg["input_size"][1:] in ((28, 28), (32, 32)), name
    # Re-parameterisable models (DBB, DO-Conv) are compared at their inference cost, as their papers do.
    macs = {name: model_stats(name, deploy=True).macs for name in NANOS}
    assert max(macs.values()) <= 2 * min(macs.values()), macs


@pytest.mark.parametrize("value, error, message", [
    (28.0, TypeError, r"img_size must be an int or a pair of ints, got float \(28.0\)"),
    ("28", TypeError, r"img_size must be an int or a pair of ints, got str \('28'\)"),
    ((28, 28, 1), ValueError, r"img_size must be an int or a pair of ints, got \(28, 28, 1\)"),
])
def test_a_bad_img_size_is_named_before_a_family_sees_it(value, error, message):
    with pytest.raises(error, match=message):  # was "'float' object is not iterable"
        visionmix.create_model("resnet_nano", img_size=value)


def test_an_unknown_name_without_close_matches_says_how_to_list_them():
    with pytest.raises(ValueError, match=r"unknown model 'zzzqqq'; list them with 'visionmix models' \(Python: "
                                         r"visionmix.list_models\(\)\)"):
        visionmix.create_model("zzzqqq")
