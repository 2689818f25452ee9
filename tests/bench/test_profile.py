"""visionmix.bench.profile: parameter and MAC counts against closed forms, memory and timing bookkeeping."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from visionmix import create_model, reparameterize
from visionmix.bench.profile import (
    BenchResult,
    count_macs,
    count_params,
    matmul_workload,
    peak_memory,
    profile_model,
    results_table,
    save_results,
)
from visionmix.cli import main
from visionmix.timing import time_alternately, time_call


def _conv_macs(conv: nn.Conv2d, h: int, w: int) -> int:
    """Closed form: every output element costs (C_in / groups) * kh * kw multiply-adds; bias adds are not MACs."""
    kh, kw = conv.kernel_size
    (ph, pw), (sh, sw), (dh, dw) = conv.padding, conv.stride, conv.dilation
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return conv.out_channels * out_h * out_w * (conv.in_channels // conv.groups) * kh * kw


@pytest.mark.parametrize("kwargs", [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "stride": 2, "padding": 0, "groups": 4},
    {"kernel_size": (1, 5), "dilation": 2, "padding": (0, 3), "bias": False},
])
def test_conv_macs_match_closed_form(kwargs):
    conv = nn.Conv2d(8, 12, **kwargs)
    assert count_macs(conv, torch.randn(1, 8, 13, 11)) == _conv_macs(conv, 13, 11)
    assert count_macs(conv, torch.randn(3, 8, 13, 11)) == 3 * _conv_macs(conv, 13, 11)


@pytest.mark.parametrize("shape", [(1, 20), (5, 20), (2, 7, 20)])
def test_linear_macs_match_closed_form(shape):
    linear = nn.Linear(20, 9)
    rows = torch.Size(shape[:-1]).numel()
    assert count_macs(linear, torch.randn(shape)) == rows * 20 * 9


class _Attention(nn.Module):
    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, q.flip(2), q.flip(3))


def test_attention_macs_are_counted_on_cpu():
    # (B, heads, N, d): Q K^T and A V are B*heads*N*N*d multiply-adds each; FlopCounterMode alone counts 0 on CPU
    assert count_macs(_Attention(), torch.randn(2, 3, 10, 8)) == 2 * (2 * 3 * 10 * 10 * 8)
    model = create_model("spach_xxs_patch16_224_attn")  # the official figure, attention included
    assert count_macs(model, torch.randn(1, 3, 224, 224)) / 1e9 == pytest.approx(0.904, abs=1e-3)


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5))


def test_profile_counts_params_and_per_image_macs():
    net = _tiny_net()
    result = profile_model(net, name="tiny", input_size=(3, 10, 10), batch_size=4, warmup=1, repeats=3)
    assert result.params == sum(p.numel() for p in net.parameters()) == count_params(net) == 3 * 8 * 9 + 8 + 16 + 45
    assert result.macs == 8 * 10 * 10 * 3 * 9 + 8 * 5  # per image, whatever the batch size
    assert result.batch_size == 4 and result.input_size == (3, 10, 10)
    assert result.throughput > 0 and result.latency_ms > 0
    assert result.gflops == pytest.approx(2 * result.macs * result.throughput / 1e9)


def test_macs_are_counted_in_eval_mode_and_the_mode_is_restored():
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    net.train()
    net[1].eval()  # a mixed state must come back exactly as it was
    count_macs(net, torch.randn(2, 4))
    assert net.training and not net[1].training


def test_peak_memory_counts_live_activations_not_weights_or_views():
    batch = 6
    # Linear(8, 32) output and ReLU output are alive together; the weight transposes are views of parameters.
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    assert peak_memory(net, torch.randn(batch, 8)) == 2 * batch * 32 * 4
    # In-place ReLU writes into its input's storage: one activation fewer.
    net[1] = nn.ReLU(inplace=True)
    assert peak_memory(net, torch.randn(batch, 8)) == batch * 32 * 4 + batch * 4 * 4


def test_time_call_counts_calls_and_orders_quartiles():
    calls = []
    timing = time_call(lambda: calls.append(1), warmup=2, repeats=5, min_sample_s=0.0)
    assert len(calls) == 2 + 1 + 5  # warm-up, calibration, one call per sample at min_sample_s=0
    assert timing.samples == 5 and timing.q1 <= timing.median <= timing.q3 and timing.spread >= 0
    with pytest.raises(ValueError, match="repeats"):
        time_call(lambda: None, repeats=1)
    with pytest.raises(ValueError, match="warmup"):
        time_call(lambda: None, warmup=-1)


def test_compile_backend_eager_gives_the_same_counts():
    net = _tiny_net()
    eager = profile_model(net, name="tiny", input_size=(3, 8, 8), batch_size=2, warmup=1, repeats=2)
    compiled = profile_model(net, name="tiny", input_size=(3, 8, 8), batch_size=2, warmup=1, repeats=2,
                             compile_backend="eager")
    assert compiled.compiled == "eager" and (compiled.params, compiled.macs) == (eager.params, eager.macs)


def test_time_alternately_interleaves_the_callables():
    calls = []
    timings = time_alternately({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1,
                               repeats=3, min_sample_s=0.0)
    # warm-up + calibration each, then one of each per round, the order rotating so each follows the other alike
    assert calls == ["a", "a", "b", "b"] + ["a", "b", "b", "a", "a", "b"]
    assert set(timings) == {"a", "b"} and all(t.samples == 3 for t in timings.values())


def test_matmul_workload_computes_a_product_and_counts_its_flops():
    fn, flops = matmul_workload(16)
    out = fn()
    assert flops == 2 * 16**3 and out.shape == (16, 16)


def _result(**overrides) -> BenchResult:
    values = dict(model="m", form="train", compiled=None, device="cpu", input_size=(1, 28, 28), batch_size=8,
                  params=1234, macs=5_600_000, latency_ms=1.5, latency_spread=0.1, throughput=900.0,
                  throughput_spread=0.05, peak_mem_mb=2.0, gflops=10.1)
    return BenchResult(**{**values, **overrides})


def test_save_results_json_csv_and_no_overwrite(tmp_path):
    results = [_result(), _result(model="n", form="deploy", matmul_fraction=0.5)]
    save_results(results, tmp_path / "r.json", meta={"note": "x"})
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["meta"]["note"] == "x" and [r["model"] for r in data["results"]] == ["m", "n"]
    save_results(results, tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[1]["form"] == "deploy" and rows[0]["input_size"] == "1x28x28" and int(rows[0]["params"]) == 1234
    with pytest.raises(FileExistsError, match="--force"):
        save_results(results, tmp_path / "r.csv")
    save_results(results[:1], tmp_path / "r.csv", force=True)
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="suffix"):
        save_results(results, tmp_path / "r.txt")


def test_results_table_lists_every_result():
    table = results_table([_result(), _result(model="other", compiled="inductor", matmul_fraction=0.25)])
    lines = table.splitlines()
    assert len(lines) == 4 and "of matmul" in lines[0]
    assert "other" in lines[3] and "train+inductor" in lines[3] and "0.25" in lines[3] and "5.60M" in lines[2]


def test_bench_cli_train_and_deployed_forms_to_json_and_csv(tmp_path, capsys):
    js, cs = tmp_path / "b.json", tmp_path / "b.csv"
    argv = ["bench", "dbb_resnet_nano", "mixer_nano", "--deploy", "--batch-size", "2", "--repeats", "2",
            "--warmup", "0", "--json", str(js), "--csv", str(cs)]
    assert main(argv) == 0
    assert "dbb_resnet_nano" in capsys.readouterr().out
    rows = json.loads(js.read_text())["results"]
    # Mixer has nothing to re-parameterise, so it gets no deploy row
    assert [(r["model"], r["form"]) for r in rows] == [("dbb_resnet_nano", "train"), ("dbb_resnet_nano", "deploy"),
                                                       ("mixer_nano", "train")]
    model = create_model("dbb_resnet_nano")
    assert rows[0]["params"] == sum(p.numel() for p in model.parameters())
    assert rows[1]["params"] == sum(p.numel() for p in reparameterize(model).parameters()) < rows[0]["params"]
    assert rows[1]["macs"] < rows[0]["macs"]  # the deployed single 3x3 conv does less work than four branches
    assert rows[2]["params"] == sum(p.numel() for p in create_model("mixer_nano").parameters())
    with open(cs, newline="") as f:
        assert [r["form"] for r in csv.DictReader(f)] == ["train", "deploy", "train"]
    assert main(argv) == 2  # both files exist: refused before anything is measured
    assert "already exists; pass --force" in capsys.readouterr().err


def test_bench_cli_rejects_unknown_models(capsys):
    assert main(["bench", "mixer_nano", "no_such_model"]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
    assert main(["bench", "zzz*"]) == 2
    assert "no registered model matches" in capsys.readouterr().err


def test_profile_leaves_the_callers_model_on_its_device_and_in_its_mode():
    net = _tiny_net().train()
    net[0].eval()
    flags = [m.training for m in net.modules()]
    profile_model(net, name="tiny", input_size=(3, 10, 10), batch_size=2, warmup=1, repeats=2)
    assert [m.training for m in net.modules()] == flags


def test_on_device_moves_a_copy_never_the_callers_module():
    from visionmix.module_state import on_device

    net = _tiny_net()
    assert on_device(net, "cpu") is net
    moved = on_device(net, "meta")
    assert moved is not net and all(p.device.type == "meta" for p in moved.parameters())
    assert all(p.device.type == "cpu" for p in net.parameters())
