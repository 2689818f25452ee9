"""Fine-tuning (--init, --freeze backbone, --layer-decay), gradient accumulation and the config-built CLI."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionmix.data import load_digits
from visionmix.engine import TrainConfig, load_run, read_meta, run_files, train
from visionmix.engine.config import (
    GROUPS,
    RECIPES,
    Range,
    add_config_options,
    config_values,
    option_flag,
    report_fields,
)
from visionmix.engine.optim import freeze_backbone, layer_ids, param_groups
from visionmix.models import create_model

pytestmark = pytest.mark.usefixtures("tiny_models")  # tiny_test_net / tiny_test_dbb, for this module

BASE = TrainConfig(model="resnet_nano", data="digits", epochs=3, batch_size=64, max_train_samples=640,
                   max_eval_samples=200, lr=3e-3, warmup_epochs=0.2, device="cpu", recompute_bn="on")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet_nano trained on the 10 digit classes: the checkpoint the fine-tuning tests start from."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(BASE, run, progress=False)
    return run


@pytest.fixture(scope="module")
def three_digit_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder of the digits 0, 1, 2 only (train and val): the same images, another class count."""
    root = tmp_path_factory.mktemp("tree")
    for split, ds in (("train", load_digits("train")), ("val", load_digits("test"))):
        for i, (image, label) in enumerate(zip(ds.images, ds.labels.tolist(), strict=True)):
            if label < 3:
                folder = root / split / f"digit{label}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_init_loads_every_key_but_a_resized_classifier(digits_run: Path) -> None:
    source = run_files.read_weights(digits_run / read_meta(digits_run)["files"]["weights"])
    model = create_model("resnet_nano", num_classes=3)
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(f"{model.head_name}.")}
    dropped = run_files.init_from(model, digits_run)
    assert sorted(dropped) == sorted(head) and dropped  # exactly the classifier's keys
    for key, value in model.state_dict().items():
        if key in head:
            torch.testing.assert_close(value, head[key], rtol=0, atol=0)  # fresh, as initialised
        else:
            torch.testing.assert_close(value, source[key], rtol=0, atol=0)
    same = create_model("resnet_nano", num_classes=10)
    assert run_files.init_from(same, digits_run) == []  # same class count: the classifier loads too
    torch.testing.assert_close(same.state_dict()[f"{same.head_name}.weight"], source[f"{same.head_name}.weight"])


@pytest.mark.slow  # trains the digits run it starts from
def test_init_rejects_a_checkpoint_of_another_architecture(digits_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"does not fit MlpMixer \(beyond its classifier\)"):
        run_files.init_from(create_model("mixer_nano", num_classes=3), digits_run)
    with pytest.raises(ValueError, match="not a visionmix run"):
        run_files.init_from(create_model("resnet_nano"), tmp_path)


@pytest.mark.slow  # trains the digits run it starts from
def test_finetuning_starts_from_the_loaded_features(digits_run: Path, three_digit_tree: Path,
                                                    tmp_path: Path) -> None:
    """A linear probe on 3 digit classes: on the features learnt from 10 digits it scores far above the same probe
    on random features, and its backbone (weights and BN statistics) stays exactly the loaded one."""
    probe = replace(BASE, data="imagefolder", data_dir=str(three_digit_tree), image_size=28, epochs=1,
                    batch_size=32, max_train_samples=None, max_eval_samples=None, freeze="backbone", workers=0,
                    lr=1e-2, recompute_bn="off")
    tuned = train(replace(probe, init=str(digits_run)), tmp_path / "tuned", progress=False)
    scratch = train(probe, tmp_path / "scratch", progress=False)
    assert tuned["history"][0]["train_loss"] < scratch["history"][0]["train_loss"]
    assert tuned["top1"] > scratch["top1"] + 20
    meta = read_meta(tmp_path / "tuned")
    assert meta["init"]["source"] == str(digits_run) and meta["init"]["dropped"] == ["linear.bias", "linear.weight"]
    model, _ = load_run(tmp_path / "tuned")
    source = run_files.read_weights(digits_run / read_meta(digits_run)["files"]["weights"])
    for key, value in model.state_dict().items():
        if not key.startswith("linear."):
            torch.testing.assert_close(value, source[key], rtol=0, atol=0)


def test_freeze_backbone_leaves_only_the_classifier_trainable() -> None:
    model = create_model("mixer_nano")
    frozen = freeze_backbone(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{model.head_name}.weight", f"{model.head_name}.bias"]
    assert frozen == sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in model.get_classifier().parameters())


def test_layer_decay_scales_follow_the_group_matcher() -> None:
    model = create_model("resnet_nano")
    ids = layer_ids(model)
    assert ids["stage0.conv1.conv.weight"] == 0
    assert ids["stage1.0.conv1.conv.weight"] == 1 and ids["stage3.1.conv2.conv.weight"] == 6
    assert ids["linear.weight"] == 7  # the classifier: one after the last block
    groups = param_groups(model, 0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for p in group["params"]:
            assert group["lr_scale"] == 0.5 ** (7 - ids[names[id(p)]])
            assert group["weight_decay"] == (0.0 if p.ndim <= 1 else 0.05)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_gradient_accumulation_equals_the_large_batch(tmp_path: Path) -> None:
    """K micro-batches of b/K give the same update as one batch of b (a model without batch statistics)."""
    cfg = TrainConfig(model="tiny_test_net", data="digits", epochs=1, batch_size=64, max_train_samples=256,
                      max_eval_samples=50, device="cpu", model_kwargs={"bn": False}, drop_path_rate=0.0,
                      clip_grad=None)
    whole = train(cfg, tmp_path / "whole", progress=False)
    parts = train(replace(cfg, accum_steps=4), tmp_path / "parts", progress=False)
    a, _ = load_run(tmp_path / "whole")
    b, _ = load_run(tmp_path / "parts")
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=key)
    assert whole["history"][0]["train_loss"] == pytest.approx(parts["history"][0]["train_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="divisible by accum_steps"):
        replace(cfg, accum_steps=3).validate()


def test_every_config_field_is_a_command_line_option() -> None:
    parser = argparse.ArgumentParser()
    add_config_options(parser)
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    assert {f.name for f in fields(TrainConfig)} <= set(flags)
    args = parser.parse_args(["--model", "mixer_nano", "--recipe", "deit", "--lr", "1e-3", "--amp", "off",
                              "--channels-last", "--ema", "--clip-grad", "0", "--model-arg", "width=3",
                              "--accum-steps", "2"])
    values = config_values(args)
    assert values == {"model": "mixer_nano", "recipe": "deit", "lr": 1e-3, "amp": "off", "channels_last": True,
                      "ema_decay": 0.999, "clip_grad": None, "model_kwargs": {"width": 3}, "accum_steps": 2}
    cfg = TrainConfig.for_recipe(values.pop("recipe"), **values)
    assert cfg.lr == 1e-3 and cfg.warmup_epochs == RECIPES["deit"]["warmup_epochs"]  # explicit beats the recipe
    assert cfg.peak_lr == pytest.approx(1e-3 * 1024 / 512)
    assert option_flag(next(f for f in fields(TrainConfig) if f.name == "time_budget_min")) == "--time-budget"
    assert config_values(parser.parse_args(["--model", "m"])) == {"model": "m"}  # nothing else given
    with pytest.raises(SystemExit):
        parser.parse_args(["--clip-grad", "-1"])


def test_config_rejects_bad_new_fields() -> None:
    for change, match in (({"amp": "fp8"}, "amp"), ({"freeze": "all"}, "freeze"), ({"layer_decay": 1.5}, "layer"),
                          ({"recipe": "imagenet"}, "recipe"), ({"workers": -1}, "workers"),
                          ({"val_fraction": 0.2}, "imagefolder"), ({"reprob": 2.0}, "reprob"),
                          ({"repeated_aug": 3}, "recipe='deit'"), ({"repeated_aug": 0}, "repeated_aug"),
                          ({"data": "imagefolder"}, "max_train_samples and max_eval_samples apply to in-memory")):
        with pytest.raises((ValueError, TypeError), match=match):
            replace(BASE, **change).validate()
    assert TrainConfig.from_dict({"model": "m", "amp": False}).amp == "off"
    assert np.isclose(replace(BASE, lr_base_batch=32).peak_lr, BASE.lr * 2)


def test_report_fields_list_what_applies_and_amp_as_used():
    small = TrainConfig(model="resnet_nano", data="digits")
    assert report_fields(small, "cpu")["amp"] == "off" and report_fields(small, "cuda:0")["amp"] == "bf16"
    assert "augment" in report_fields(small, "cpu") and "mixup" not in report_fields(small, "cpu")
    deit = TrainConfig.for_recipe("deit", model="resnet_nano", data="imagefolder", data_dir="x")
    shown = report_fields(deit, "cpu")
    assert {"mixup", "randaug_m", "val_fraction"} <= shown.keys()
    assert not {"augment", "max_train_samples"} & shown.keys()


def test_every_option_sits_in_a_help_section_and_every_range_is_checked():
    parser = argparse.ArgumentParser()
    sections = add_config_options(parser)
    assert list(sections) == list(GROUPS)
    assert sum(len(s._group_actions) for s in sections.values()) == len(fields(TrainConfig))
    for f in fields(TrainConfig):
        valid = f.metadata["valid"]
        if isinstance(valid, Range):  # just outside each closed or open end is refused, naming the field
            below = valid.low if valid.low_open else valid.low - 1e-9
            with pytest.raises(ValueError, match=f"^{f.name} must be in "):
                replace(TrainConfig(model="resnet_nano"), **{f.name: below}).validate()
