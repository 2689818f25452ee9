"""load_checkpoint: .pth / .safetensors round trips, training-script wrappers, clear errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import visionmix
from visionmix.models import create_model, load_checkpoint
from visionmix.models.loading import read_state_dict


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("spach_ms_nano_attn")
    with torch.no_grad():  # the head is zero-initialised: make every tensor distinguishable
        for p in model.parameters():
            p.normal_()
    return model


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
    lambda sd: {"state_dict_ema": sd},
    lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
], ids=["flat", "state_dict", "model", "state_dict_ema", "module_prefix"])
def test_pth_round_trip_with_wrappers(tmp_path, wrap):
    src, dst = _model(0), _model(1)
    path = tmp_path / "weights.pth"
    torch.save(wrap(src.state_dict()), path)
    assert load_checkpoint(dst, path) is dst
    _assert_same_weights(src, dst)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(src.eval()(x), dst.eval()(x), rtol=0, atol=0)


def test_safetensors_round_trip_and_create_model(tmp_path):
    src = _model(0)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    _assert_same_weights(src, load_checkpoint(_model(1), path))
    _assert_same_weights(src, visionmix.create_model("spach_ms_nano_attn", checkpoint_path=str(path)))


def test_state_dict_ema_is_not_preferred_over_live_weights(tmp_path):
    live, ema = _model(0), _model(1)
    path = tmp_path / "train.pt"
    torch.save({"state_dict_ema": ema.state_dict(), "state_dict": live.state_dict()}, path)
    _assert_same_weights(live, load_checkpoint(_model(2), path))


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _model(0).state_dict(), "obj": object()}, path)
    with pytest.raises(ValueError, match="evil.pth is not a plain state dict: it pickles objects other than"):
        read_state_dict(path)


class _RunsCode:
    """Unpickling this would create ``marker`` (a pickle can call any function)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_a_deit_style_training_checkpoint_loads_and_code_in_its_args_is_refused(tmp_path):
    """SPACH's and UniFormer's DeiT-based main.py save {"model", "optimizer", "lr_scheduler", "epoch", "model_ema",
    "args": argparse.Namespace}: the Namespace of plain values is read, one hiding an object is not."""
    live, ema = _model(0), _model(1)
    args = argparse.Namespace(model="spach_ms_s_patch4_224_conv", lr=5e-4, epochs=300, input_size=224, mixup=0.8,
                              resume="", output_dir="out", cutmix_minmax=None, drop_path=0.1)
    checkpoint = {"model": live.state_dict(), "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
                  "lr_scheduler": {"t_initial": 300}, "epoch": 299, "model_ema": ema.state_dict(), "args": args}
    path = tmp_path / "spach_ms_conv_s.pth"
    torch.save(checkpoint, path)
    _assert_same_weights(live, create_model("spach_ms_nano_attn", checkpoint_path=str(path)))
    marker = tmp_path / "ran"
    torch.save({**checkpoint, "args": argparse.Namespace(lr=5e-4, hook=_RunsCode(marker))}, path)
    with pytest.raises(ValueError, match="spach_ms_conv_s.pth is not a plain state dict"):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"hello world\n", b"", b'{"a": 1}', b"PK\x03\x04 a broken zip archive"])
def test_a_file_that_is_no_checkpoint_is_one_error_naming_it(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"weights\.pth (is damaged or not a \.pth checkpoint|is not a plain state)"):
        read_state_dict(path)


def test_tensors_of_another_kind_are_refused_naming_the_key(tmp_path):
    state = _model(0).state_dict()
    state["head.weight"] = state["head.weight"].long()  # integers where the model holds float weights
    path = tmp_path / "w.safetensors"
    save_file(state, path)
    with pytest.raises(ValueError, match=r"1 dtypes that would convert lossily: head\.weight: checkpoint "
                                         r"torch\.int64 vs model torch\.float32"):
        load_checkpoint(_model(1), path)
    state["head.weight"] = state["head.weight"].double()  # float64 into float32 keeps its meaning: loads
    save_file(state, path)
    load_checkpoint(_model(1), path)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(_model(0), tmp_path / "nope.pth")
    bad = tmp_path / "weights.npz"
    bad.write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"unknown checkpoint suffix '\.npz'.*\.safetensors"):
        load_checkpoint(_model(0), bad)


def test_dict_without_weights_is_explained(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "args": {"lr": 0.1}}, path)
    with pytest.raises(ValueError, match="no tensors and none of the wrapper keys"):
        load_checkpoint(_model(0), path)


def test_key_mismatches_are_listed(tmp_path):
    state = _model(0).state_dict()
    state.pop("head.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"1 missing keys: head\.weight.*1 unexpected keys: extra\.weight"):
        load_checkpoint(_model(1), path)
    model = _model(1)
    before = model.head.weight.clone()
    load_checkpoint(model, path, strict=False)  # non-strict: loads what fits, leaves the rest
    torch.testing.assert_close(model.head.weight, before)
    torch.testing.assert_close(model.norm2.weight, state["norm2.weight"])


def test_shape_mismatch_raises_even_when_not_strict(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(create_model("spach_ms_nano_attn", num_classes=7).state_dict(), path)
    expected = r"2 shape mismatches: head\.weight: checkpoint \(7, 192\) vs model \(10, 192\)"
    with pytest.raises(ValueError, match=expected):
        load_checkpoint(_model(0), path, strict=False)


def test_many_missing_keys_are_abbreviated(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"head.weight": torch.zeros(10, 192), "head.bias": torch.zeros(10)}, path)
    with pytest.raises(ValueError, match=r"missing keys: .*\(\+\d+ more\)"):
        load_checkpoint(_model(0), path)


def test_checkpoint_filter_fn_is_applied(tmp_path):
    class Renamed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(2, 3)

        @staticmethod
        def checkpoint_filter_fn(state, model):
            return {k.replace("linear.", "fc."): v for k, v in state.items()}

    src = torch.nn.Linear(2, 3)
    path = tmp_path / "foreign.pth"
    torch.save({f"linear.{k}": v for k, v in src.state_dict().items()}, path)
    model = load_checkpoint(Renamed(), path)
    torch.testing.assert_close(model.fc.weight, src.weight)


# ---------------------------------------------------------------------------------- another input channel count
def _random(name: str, in_chans: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, in_chans=in_chans)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model.eval()


@pytest.mark.parametrize("name", ["resnet_nano", "spach_ms_nano_attn", "mixer_nano"])
@pytest.mark.parametrize(("trained", "target"), [(3, 1), (1, 3), (3, 6), (3, 4)])
def test_weights_of_another_channel_count_adapt_the_first_conv(tmp_path, caplog, name, trained, target):
    source = _random(name, trained, 0)
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    with caplog.at_level("WARNING", logger="visionmix"):
        model = create_model(name, in_chans=target, checkpoint_path=str(path)).eval()
    first = f"{model.pretrained_cfg['first_conv']}.weight"
    notices = [r.getMessage() for r in caplog.records if first in r.getMessage()]
    assert len(notices) == 1 and f"trained on {trained} input channels; adapted to the model's {target}" in notices[0]
    w, w0 = model.state_dict()[first], source.state_dict()[first]
    expected = (w0.sum(1, keepdim=True) if target == 1
                else torch.stack([w0[:, c % trained] for c in range(target)], 1) * (trained / target))
    torch.testing.assert_close(w, expected, rtol=0, atol=0)
    if target % trained and target != 1:
        return  # 3 -> 4 channels: [r, g, b, r] * 3/4, no equal-response promise
    # an image whose channels are all equal gives what the original gives for that image
    grey = torch.randn(2, 1, *model.pretrained_cfg["input_size"][1:])
    with torch.no_grad():
        torch.testing.assert_close(model(grey.expand(-1, target, -1, -1)), source(grey.expand(-1, trained, -1, -1)),
                                   rtol=1e-4, atol=1e-4)


def test_init_adapts_the_channels_and_a_kernel_mismatch_still_fails(tmp_path):
    from visionmix.engine.run_files import init_from

    path = tmp_path / "rgb.pth"
    torch.save({"model": _random("resnet_nano", 3, 0).state_dict()}, path)
    model = _random("resnet_nano", 1, 1)
    assert init_from(model, path) == []
    first = f"{model.pretrained_cfg['first_conv']}.weight"
    torch.testing.assert_close(model.state_dict()[first], torch.load(path)["model"][first].sum(1, keepdim=True))
    state = _random("resnet_nano", 1, 0).state_dict()
    state[first] = torch.zeros(state[first].shape[0], 3, 5, 5)  # another kernel size: not an adaptation
    torch.save(state, path)
    with pytest.raises(ValueError, match=rf"{first}: checkpoint \({state[first].shape[0]}, 3, 5, 5\)"):
        load_checkpoint(_random("resnet_nano", 1, 1), path)
