"""Inference on the user's device and float32 equivalence checks (issue 27, items 5 and 6), checked on the CPU:
TF32 off inside every train-vs-deploy check, batches sent to the model's device, no host tensor meeting a device
tensor (``visionmix.transfers.HostSyncCounter``), a clear error for a device this machine lacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visionmix.deployment import Deployed, deploy, inference_device
from visionmix.export import onnx_runner, randomize_weights, write_onnx
from visionmix.module_state import no_tf32
from visionmix.predict import _classify, model_device
from visionmix.reparam import check_equivalence
from visionmix.transfers import HostSyncCounter


def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def tf32_on():
    saved = _tf32_flags()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class FlagRecorder(nn.Module):
    """A linear model that records the TF32 switches each time it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(_tf32_flags())
        return self.fc(x.flatten(1))


def test_no_tf32_switches_tf32_off_and_restores_the_flags_even_on_error(tf32_on) -> None:
    with no_tf32():
        assert _tf32_flags() == (False, False)
    assert _tf32_flags() == (True, True)
    with pytest.raises(RuntimeError, match="boom"), no_tf32():
        raise RuntimeError("boom")
    assert _tf32_flags() == (True, True)


def test_check_equivalence_runs_both_models_without_tf32(tf32_on) -> None:
    a, b = FlagRecorder(), FlagRecorder()
    b.load_state_dict(a.state_dict())
    assert check_equivalence(a, b, torch.randn(2, 4)).ok
    assert a.seen == b.seen == [(False, False)]
    assert _tf32_flags() == (True, True)


def test_deploy_verifies_without_tf32_and_keeps_the_callers_flags(tf32_on) -> None:
    model = FlagRecorder()
    deployed = deploy(model, torch.randn(3, 4), "eager")
    assert deployed.device == torch.device("cpu")
    assert _tf32_flags() == (True, True)
    runs = deployed.run.__closure__[0].cell_contents  # the deployed copy deploy() verified
    assert runs.seen == [(False, False)] * 4  # eager reference and backend, on the batch and on a batch one larger


def test_a_device_this_machine_lacks_is_named() -> None:
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
        inference_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda:0': this machine has 0 CUDA device\(s\)"):
            deploy(FlagRecorder(), torch.randn(2, 4), "eager", device="cuda:0")
    assert inference_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_randomize_weights_adds_no_host_tensor_to_device_weights() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    example = torch.randn(4, 1, 6, 6)
    model(example)
    with HostSyncCounter("cpu") as counter:
        randomize_weights(model, example)
    mixed = [op for op in counter.ops if op.startswith("transfers: host tensor into")]
    assert not mixed, mixed
    assert counter.counts["transfers"] == sum(1 for _ in model.parameters())  # one copy per parameter


class OnDevice(nn.Module):
    """Stand-in for a model on an accelerator: its weights live on the meta device, and an input elsewhere fails
    as a CUDA model fails for a CPU batch; it returns host logits (meta tensors hold no values to read)."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(classes, device="meta"))
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device != self.weight.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, got {x.device} and "
                               f"{self.weight.device}")
        return torch.arange(x.shape[0] * self.classes, dtype=torch.float32).reshape(x.shape[0], self.classes)


def test_predict_sends_each_batch_to_the_models_device(tmp_path) -> None:
    model = OnDevice(3)
    assert model_device(model) == torch.device("meta")
    assert model_device(Deployed("eager", model, 0.0, "test", device=torch.device("meta"))) == torch.device("meta")
    assert model_device(lambda x: x) == torch.device("cpu")
    pending = [(tmp_path / f"{i}.png", torch.zeros(1, 4, 4)) for i in range(2)]
    results = list(_classify(model, pending, ("a", "b", "c"), topk=2))
    assert [[s.name for s in r.top] for r in results] == [["c", "b"], ["c", "b"]]


@pytest.mark.slow  # an ONNX export
def test_the_onnxruntime_runner_takes_any_tensor_and_answers_on_its_device(tmp_path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    write_onnx(model, torch.randn(2, 1, 2, 2), tmp_path / "m.onnx")
    run = onnx_runner(tmp_path / "m.onnx")
    x = torch.randn(2, 1, 2, 2, requires_grad=True)  # a tensor .numpy() refuses, as it refuses a CUDA one
    out = run(x)
    assert out.device == x.device
    torch.testing.assert_close(out, model(x).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["eager", "channels_last", "inductor"])
def test_deploy_on_cuda_equals_eager(backend: str) -> None:
    from visionmix import create_model

    model = create_model("resnet_nano")
    x = torch.randn(4, 1, 28, 28)
    deployed = deploy(model, x, backend, device="cuda")
    assert deployed.device.type == "cuda"
    torch.testing.assert_close(deployed(x.cuda()).cpu(), model.eval()(x), rtol=1e-4, atol=1e-4)
