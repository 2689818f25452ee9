"""visionmix.export: ONNX and TorchScript files that compute what PyTorch computes, checked independently here."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from visionmix import create_model, list_models, model_entry, reparameterize
from visionmix.export import ExportError, export_onnx, export_torchscript, randomize_weights

SLOW_TO_EXPORT = ("s2mlpv2_nano",)  # ~15 s in the dynamo exporter (many small shift/slice ops)


def _one_nano_per_family() -> list:
    first: dict[str, str] = {}
    for name in list_models("*nano*"):
        first.setdefault(model_entry(name).module, name)
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_TO_EXPORT else name
            for name in sorted(first.values())]


def _nano(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_weights(create_model(name, num_classes=10, in_chans=1, img_size=28)).eval()


def _onnx_outputs(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_randomize_weights_makes_a_zero_head_model_non_constant():
    model = create_model("mixer_nano", num_classes=10, in_chans=1, img_size=28).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert model(x).abs().max() == 0  # Mixer's head starts at zero: parity on it would be vacuous
        assert randomize_weights(model)(x).std(0).min() > 1e-3


@pytest.mark.parametrize("name", _one_nano_per_family())
def test_onnx_parity_for_each_family(name, tmp_path):
    model = _nano(name)
    x = torch.randn(2, 1, 28, 28)
    diff = export_onnx(model, tmp_path / "m.onnx", x)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto)
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    other = torch.randn(5, 1, 28, 28)  # the batch dimension is dynamic
    with torch.no_grad():
        expected = model(other).numpy()
    assert np.abs(expected).max() > 1e-2  # a meaningful comparison
    assert np.abs(_onnx_outputs(tmp_path / "m.onnx", other) - expected).max() < 1e-4
    assert 0 <= diff < 1e-4


def test_onnx_parity_for_a_deployed_dbb_resnet(tmp_path):
    model = _nano("dbb_resnet_nano")
    deployed = reparameterize(model)
    assert not any(type(m).__name__ == "DiverseBranchBlock" for m in deployed.modules())
    x = torch.randn(2, 1, 28, 28)
    export_onnx(deployed, tmp_path / "d.onnx", x)
    with torch.no_grad():
        train_form = model(x).numpy()  # the exported deployed graph must still compute the trained model
    got = _onnx_outputs(tmp_path / "d.onnx", x)
    assert np.abs(got - train_form).max() < 1e-4 * max(1.0, float(np.abs(train_form).max()))


def test_torchscript_round_trip(tmp_path):
    model = _nano("spach_ms_nano_conv")
    x = torch.randn(2, 1, 28, 28)
    assert export_torchscript(model, tmp_path / "m.pt", x) < 1e-4
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    other = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded(other), model(other), atol=1e-5)


class _BakedBatch(nn.Module):
    """Traces/exports the example's batch size as a constant, so a larger batch breaks the exported graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) + torch.ones(int(x.shape[0]), 1)


@pytest.mark.parametrize("export", [export_onnx, export_torchscript])
def test_a_broken_export_raises_and_leaves_no_file(export, tmp_path):
    with pytest.raises(ExportError, match=r"shape \(3, 1, 4, 4\)"):
        export(_BakedBatch(), tmp_path / "bad.out", torch.randn(2, 1, 4, 4))
    assert list(tmp_path.iterdir()) == []


def test_existing_files_and_bad_arguments(tmp_path):
    target = tmp_path / "m.pt"
    target.write_text("keep me")
    model, x = nn.Linear(4, 3), torch.randn(2, 4)
    with pytest.raises(FileExistsError, match="--force"):
        export_torchscript(model, target, x)
    assert target.read_text() == "keep me"
    export_torchscript(model, target, x, force=True)
    assert target.read_text(errors="ignore") != "keep me"
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "m.onnx", x, opset=13)
    with pytest.raises(ValueError, match="example"):
        export_torchscript(model, tmp_path / "n.pt", torch.randn(0, 4))
