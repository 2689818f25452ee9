"""visionmix.deploy: every backend equals the eager deployed model, auto keeps a verified one, and a backend that
cannot take a model falls back (auto) or says why (by name)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from visionmix import create_model
from visionmix.deployment import BACKENDS, deploy
from visionmix.errors import DeployError
from visionmix.export import randomize_weights
from visionmix.layers import DiverseBranchBlock

pytestmark = pytest.mark.slow  # builds every inference backend (ONNX export, inductor compiles)

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


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_is_built_on_a_batch_of_one(backend):
    model = _model("resnet_nano").eval()
    deployed = deploy(model, _x(1), backend)
    with torch.no_grad():
        expected = model(_x(4))
    assert (deployed(_x(4)) - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


def test_auto_keeps_the_fastest_verified_backend_and_says_why():
    deployed = deploy(_model("resnet_nano"), _x(), repeats=2)
    assert deployed.backend in BACKENDS and set(deployed.seconds) == set(BACKENDS) and not deployed.skipped
    assert deployed.seconds[deployed.backend] == min(deployed.seconds.values())
    assert deployed.reason.startswith("fastest of 4 verified backend(s) on a batch of 3")


def test_dynamic_kernels_fall_back_with_a_reason_and_fail_by_name():
    model = _model("condconv_resnet_nano")
    deployed = deploy(model, _x(), repeats=2)
    assert deployed.backend in deployed.seconds and "onnxruntime" in deployed.skipped
    assert all(reason for reason in deployed.skipped.values())
    with pytest.raises(DeployError, match="^onnxruntime: ExportError: ONNX export failed"):
        deploy(model, _x(), "onnxruntime")


def test_inductor_compiles_each_deployed_model_apart():
    """Frozen, torch.compile(model) would add every model of a class to the cache of the shared forward's code (past
    torch's recompile limit they run eager); deploy compiles each exported graph instead, that cache does not grow."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from visionmix.models._base import ClassifierModel

    before = len(_debug_get_cache_entry_list(ClassifierModel.forward.__code__))  # other tests may compile models
    for _ in range(2):
        deployed = deploy(_model("resnet_nano"), _x(), "inductor")
        assert deployed.backend == "inductor" and deployed.max_rel_diff <= 1e-4
    assert len(_debug_get_cache_entry_list(ClassifierModel.forward.__code__)) == before


def test_a_missing_runtime_is_skipped_or_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    deployed = deploy(_model("resnet_nano"), _x(), repeats=2, candidates=("eager", "onnxruntime"))
    assert deployed.backend == "eager" and "ModuleNotFoundError" in deployed.skipped["onnxruntime"]
    with pytest.raises(DeployError, match="^onnxruntime: .*onnxruntime"):
        deploy(_model("resnet_nano"), _x(), "onnxruntime")


def test_the_callers_model_is_left_as_it_was():
    model = _model("dbb_resnet_nano").train()
    deploy(model, _x(), "channels_last")
    assert model.training and any(isinstance(m, DiverseBranchBlock) for m in model.modules())


def test_bad_arguments():
    model = _model("resnet_nano")
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'eager', 'channels_last', "
                                         "'onnxruntime', 'inductor'; got 'tensorrt'"):
        deploy(model, _x(), "tensorrt")
    with pytest.raises(ValueError, match="example must be a batch"):
        deploy(model, torch.randn(0, 1, 28, 28))


# ------------------------------------------------------------------------------------------------------- int8
def _vnni() -> bool:
    """MLAS's u8s8 int8 kernel is exact with VNNI; without it (vpmaddubsw) pairs of products can saturate int16."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_vnni" in flags or " avx_vnni" in flags


def _dynamic_int8_linear(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """Jacob et al. 2018 eq. 1 as onnxruntime's dynamic quantisation applies it, in float64: the input per tensor
    as asymmetric uint8 (ONNX DynamicQuantizeLinear: scale = range(x ∪ 0) / 255, round half to even), the weight
    per output channel as symmetric int8 (scale = max|w| / 127), an exact integer product, then the scales."""
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    sx = (hi - lo) / 255
    zx = torch.tensor(-lo / sx).round().clamp(0, 255)
    qx = (torch.round(x / sx) + zx).clamp(0, 255).double()
    w = linear.weight.detach().double()
    sw = w.abs().amax(1) / 127
    qw = torch.round(w / sw[:, None]).clamp(-127, 127)
    return ((qx - zx) @ qw.T) * sx * sw + linear.bias.detach().double()


@pytest.mark.skipif(not _vnni(), reason="onnxruntime's int8 kernel saturates int16 pairs on CPUs without VNNI")
@pytest.mark.parametrize("shape", [(6, 32), (4, 5, 32)])  # a Gemm and a batched MatMul in the exported graph
def test_int8_linear_is_dynamic_quantisation_exactly(shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16)
    x = torch.randn(*shape)
    deployed = deploy(torch.nn.Sequential(linear), x, quantize="int8")
    expected = _dynamic_int8_linear(x, linear)
    assert deployed.backend == "onnxruntime" and deployed.quantize == "int8"
    assert (deployed(x).double() - expected).abs().max().item() < 1e-6 * expected.abs().max().item()
    assert (linear(x).double() - expected).abs().max().item() > 1e-3  # really quantised: float32 is elsewhere


def test_int8_mixer_stays_close_to_float_and_reports_its_difference():
    model = _model("mixer_nano").eval()
    deployed = deploy(model, _x(), quantize="int8")
    other = _x(5)
    with torch.no_grad():
        expected = model(other)
    rel = (deployed(other) - expected).abs().max().item() / expected.abs().max().item()
    assert 1e-4 < deployed.max_rel_diff < 0.1 and 1e-4 < rel < 0.1  # lossy (past the float check), but close
    assert deployed.reason.startswith("int8 Linear weights run on onnxruntime only")


def test_int8_bad_arguments():
    model = _model("mixer_nano")
    with pytest.raises(ValueError, match="quantize must be one of 'int8'; got 'int4'"):
        deploy(model, _x(), quantize="int4")
    with pytest.raises(ValueError, match="quantize='int8' runs on the onnxruntime backend .* got backend='eager'"):
        deploy(model, _x(), "eager", quantize="int8")


def test_bad_arguments_are_named() -> None:
    model = create_model("resnet_nano")
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(TypeError, match="model must be an nn.Module, got object"):
        deploy(object(), x)
    with pytest.raises(TypeError, match="example must be a floating-point tensor batch .* got str"):
        deploy(model, "x")
    with pytest.raises(TypeError, match="got a torch.int64 tensor"):
        deploy(model, x.long(), "eager")
    with pytest.raises(ValueError, match="rtol must be a positive number, got -1"):
        deploy(model, x, "eager", rtol=-1)
