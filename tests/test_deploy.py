"""visionmix.deploy: every backend equals the eager deployed model, auto keeps a verified one, and a backend that
cannot take a model falls back (auto) or says why (by name)."""

from __future__ import annotations

import sys

import pytest
import torch

from visionmix import create_model
from visionmix.deployment import BACKENDS, DeployError, deploy
from visionmix.export import randomize_weights
from visionmix.layers import DiverseBranchBlock

ONE_PER_FAMILY = ["resnet_nano", "dbb_resnet_nano", "mixer_nano", "s2mlpv2_nano", "spach_ms_nano_attn",
                  "spach_nano_mlp", "uniformer_nano"]


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name)
    return randomize_weights(model, torch.randn(8, *model.pretrained_cfg["input_size"]))  # no zero-init head


def _x(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_each_backend_equals_eager(name, backend):
    model = _model(name).eval()
    deployed = deploy(model, _x(), backend)
    other = _x(5)  # another batch size than the one it was built on
    with torch.no_grad():
        expected = model(other)
    got = deployed(other)
    assert deployed.backend == backend and deployed.max_rel_diff <= 1e-4
    assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


def test_auto_keeps_the_fastest_verified_backend_and_says_why():
    deployed = deploy(_model("resnet_nano"), _x(), repeats=2)
    assert deployed.backend in BACKENDS and set(deployed.seconds) == set(BACKENDS) and not deployed.skipped
    assert deployed.seconds[deployed.backend] == min(deployed.seconds.values())
    assert deployed.reason.startswith("fastest of 4 verified backend(s) on a batch of 3")


def test_dynamic_kernels_fall_back_with_a_reason_and_fail_by_name():
    model = _model("condconv_resnet_nano")
    deployed = deploy(model, _x(), repeats=2)
    assert deployed.backend in deployed.seconds and {"jit", "onnxruntime"} <= set(deployed.skipped)
    assert all(reason for reason in deployed.skipped.values())
    with pytest.raises(DeployError, match="^onnxruntime: ExportError: ONNX export failed"):
        deploy(model, _x(), "onnxruntime")


def test_a_missing_runtime_is_skipped_or_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    deployed = deploy(_model("resnet_nano"), _x(), repeats=2, candidates=("eager", "onnxruntime"))
    assert deployed.backend == "eager" and "ModuleNotFoundError" in deployed.skipped["onnxruntime"]
    with pytest.raises(DeployError, match="^onnxruntime: .*onnxruntime"):
        deploy(_model("resnet_nano"), _x(), "onnxruntime")


def test_the_callers_model_is_left_as_it_was():
    model = _model("dbb_resnet_nano").train()
    deploy(model, _x(), "jit")
    assert model.training and any(isinstance(m, DiverseBranchBlock) for m in model.modules())


def test_bad_arguments():
    model = _model("resnet_nano")
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'eager', 'channels_last', 'jit', "
                                         "'onnxruntime'; got 'tensorrt'"):
        deploy(model, _x(), "tensorrt")
    with pytest.raises(ValueError, match="example must be a batch"):
        deploy(model, torch.randn(0, 1, 28, 28))
