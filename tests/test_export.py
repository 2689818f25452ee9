"""visionmix.export: ONNX files and torch.export programs that compute what PyTorch computes, checked independently
here."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from visionmix import create_model, list_models, model_entry, reparameterize
from visionmix.cli import main
from visionmix.engine import TrainConfig, load_run, train
from visionmix.errors import ExportError
from visionmix.export import export_onnx, export_program, randomize_weights

pytestmark = pytest.mark.slow  # ONNX and torch.export exports of real models

# The dynamo exporter takes ~15-40 s on these (many small shift/slice or masked-group ops).
SLOW_TO_EXPORT = ("s2mlpv2_nano", "psresnet_nano")
# One grouped conv with groups = batch (per-sample kernels); ONNX's Conv ``group`` is a constant, so the batch
# size is fixed at export.
STATIC_BATCH = {"condconv_resnet_nano": "CondConv", "weightnet_resnet_nano": "WeightNet"}


def _param(name: str):
    return pytest.param(name, marks=pytest.mark.slow) if name in SLOW_TO_EXPORT else name


def _families() -> list:
    """The plainest nano model of each model family (the shortest name in each registry module)."""
    best: dict[str, str] = {}
    for name in list_models("*nano*"):
        module = model_entry(name).module
        if len(model_entry(name).cfg["input_size"]) == 4:
            continue  # video models take clips, not the 28x28 images these tests export with
        if module not in best or len(name) < len(best[module]):
            best[module] = name
    return [_param(name) for name in sorted(best.values())]


def _resnet_variants() -> list:
    """ResNet nano with each pluggable conv / attention layer."""
    return [_param(name) for name in list_models("*resnet_nano") if name != "resnet_nano"]


def _nano(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_weights(create_model(name, num_classes=10, in_chans=1, img_size=28), torch.randn(8, 1, 28, 28))


def _onnx_outputs(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_randomize_weights_makes_a_zero_head_model_non_constant():
    model = create_model("mixer_nano", num_classes=10, in_chans=1, img_size=28).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert model(x).abs().max() == 0  # Mixer's head starts at zero: parity on it would be vacuous
        assert randomize_weights(model, x)(x).std(0).min() > 1e-3


def test_randomize_weights_calibrates_batchnorm_to_the_example():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, momentum=0.3))
    x = 3.0 + 2.0 * torch.randn(16, 2, 8, 8)
    randomize_weights(model, x)
    with torch.no_grad():
        conv_out = model[0](x)
    bn = model[1]
    assert not model.training and bn.momentum == 0.3
    assert torch.allclose(bn.running_mean, conv_out.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, conv_out.var((0, 2, 3), unbiased=True), rtol=1e-4)
    assert bn.running_mean.abs().max() > 0.1  # not the identity statistics a fold error could hide behind


def _check_onnx_parity(name: str, tmp_path) -> None:
    model = _nano(name)
    static = name in STATIC_BATCH
    x = torch.randn(2, 1, 28, 28)
    diff = export_onnx(model, tmp_path / "m.onnx", x, dynamic_batch=not static)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto)
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    other = torch.randn(2 if static else 5, 1, 28, 28)  # otherwise the batch dimension is dynamic
    with torch.no_grad():
        expected = model(other).numpy()
    assert np.abs(expected).max() > 1e-2  # a meaningful comparison
    assert np.abs(_onnx_outputs(tmp_path / "m.onnx", other) - expected).max() < 1e-4
    assert 0 <= diff < 1e-4


@pytest.mark.parametrize("name", _families())
def test_onnx_parity_for_each_family(name, tmp_path):
    _check_onnx_parity(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", _resnet_variants())
def test_onnx_parity_for_each_pluggable_resnet_layer(name, tmp_path):
    _check_onnx_parity(name, tmp_path)


@pytest.mark.parametrize("name", sorted(STATIC_BATCH))
def test_batch_dependent_graphs_need_a_static_batch(name, tmp_path):
    with pytest.raises(ExportError, match="static batch"):
        export_onnx(_nano(name), tmp_path / "m.onnx", torch.randn(2, 1, 28, 28))
    assert not (tmp_path / "m.onnx").exists()


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


def test_program_round_trip(tmp_path):
    model = _nano("spach_ms_nano_conv")
    x = torch.randn(2, 1, 28, 28)
    assert export_program(model, tmp_path / "m.pt2", x) < 1e-4
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()  # torch alone runs it
    other = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded(other), model(other), atol=1e-5)


class _BakedBatch(nn.Module):
    """Traces/exports the example's batch size as a constant, so a larger batch breaks the exported graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) + torch.ones(int(x.shape[0]), 1)


@pytest.mark.parametrize("export, reason", [
    (export_onnx, r"shape \(3, 1, 4, 4\)"),  # the ONNX exporter bakes the batch in: the check on 3 images fails
    (export_program, r"torch.export failed: .*batch.*export a static batch"),  # torch.export refuses it itself
])
def test_a_broken_export_raises_and_leaves_no_file(export, reason, tmp_path):
    with pytest.raises(ExportError, match=reason):
        export(_BakedBatch(), tmp_path / "bad.out", torch.randn(2, 1, 4, 4))
    assert list(tmp_path.iterdir()) == []


def test_existing_files_and_bad_arguments(tmp_path):
    target = tmp_path / "m.pt2"
    target.write_text("keep me")
    model, x = nn.Linear(4, 3), torch.randn(2, 4)
    with pytest.raises(FileExistsError, match="--force"):
        export_program(model, target, x)
    assert target.read_text() == "keep me"
    export_program(model, target, x, force=True)
    assert target.read_text(errors="ignore") != "keep me"
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "m.onnx", x, opset=13)
    with pytest.raises(ValueError, match="example"):
        export_program(model, tmp_path / "n.pt2", torch.randn(0, 4))


def test_export_cli_from_a_trained_run(tmp_path, capsys):
    run = tmp_path / "run"
    train(TrainConfig(model="dbb_resnet_nano", data="digits", epochs=1, batch_size=32, max_train_samples=64,
                      max_eval_samples=32), run, progress=False)
    onnx_path, pt2_path = tmp_path / "m.onnx", tmp_path / "m.pt2"
    assert main(["export", str(run), "--deploy", "--onnx", str(onnx_path), "--pt2", str(pt2_path)]) == 0
    out = capsys.readouterr().out
    assert "deployed vs trained: equivalent" in out and out.count("wrote") == 2
    model, _ = load_run(run)  # the trained (train-form) model: the deployed export must compute it
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(_onnx_outputs(onnx_path, x) - expected).max() < 1e-4
    with torch.no_grad():
        assert np.abs(torch.export.load(str(pt2_path)).module()(x).numpy() - expected).max() < 1e-4
    assert main(["export", str(run), "--onnx", str(onnx_path)]) == 2  # exists, no --force
    assert main(["export", str(run)]) == 2  # nothing to write
    assert "--onnx" in capsys.readouterr().err


def test_export_cli_random_init_and_static_batch(tmp_path, capsys):
    path = tmp_path / "c.onnx"
    assert main(["export", "condconv_resnet_nano", "--random-init", "--static-batch", "--batch-size", "3",
                 "--onnx", str(path)]) == 0
    assert "on batches of 3 (atol" in capsys.readouterr().out
    assert ort.InferenceSession(str(path)).get_inputs()[0].shape[0] == 3
    assert main(["export", "condconv_resnet_nano", "--random-init", "--onnx", str(tmp_path / "d.onnx")]) == 2
    assert "static batch" in capsys.readouterr().err and not (tmp_path / "d.onnx").exists()


@pytest.mark.parametrize("export", [export_onnx, export_program])
def test_export_leaves_the_callers_model_as_it_was(export, tmp_path):
    """Export used to call model.cpu().eval() on the caller's model: now every module keeps its own flag."""
    model = _nano("spach_ms_nano_conv").train()
    frozen = next(m for m in model.modules() if isinstance(m, nn.LayerNorm | nn.GroupNorm | nn.BatchNorm2d))
    frozen.eval()
    flags = [m.training for m in model.modules()]
    assert export(model, tmp_path / "m.out", torch.randn(2, 1, 28, 28)) < 1e-4
    assert [m.training for m in model.modules()] == flags
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.out"]  # no temporary file left
