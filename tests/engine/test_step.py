"""The training step as a GPU runs it, checked on CPU: kernel settings (``--deterministic``, cuDNN autotuning
restored after a run), fp16's gradient scaler (non-finite steps skipped and counted, schedule and EMA advancing
only on applied steps), host synchronisations per step, the EMA update, recompiles under ``--compile``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import tinynets
import visionmix.engine.trainer as trainer_module
from visionmix.engine import TrainConfig, read_meta, run_files, train
from visionmix.engine.optim import ModelEma, warmup_cosine
from visionmix.engine.trainer import Trainer
from visionmix.errors import TrainingError
from visionmix.transfers import HostSyncCounter, device_constant, to_device

pytestmark = pytest.mark.usefixtures("tiny_models")  # tiny_test_net, for this module

CFG = TrainConfig(model="tiny_test_net", data="digits", epochs=1, batch_size=32, max_train_samples=192,
                  max_eval_samples=100, lr=1e-2, device="cpu")


def test_deterministic_sets_the_kernel_switches_for_the_run_and_restores_them(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cudnn = torch.backends.cudnn
    seen = []
    run = Trainer.run

    def spy(self: Trainer) -> dict:
        seen.append((cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled()))
        return run(self)

    monkeypatch.setattr(Trainer, "run", spy)
    monkeypatch.setattr(cudnn, "benchmark", True)  # the process's own settings, to be restored
    monkeypatch.setattr(cudnn, "deterministic", False)
    train(replace(CFG, deterministic=True), tmp_path / "det", progress=False)
    assert seen == [(False, True, True)]  # no autotuning, deterministic kernels
    assert (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled()) == (True, False, False)
    train(CFG, tmp_path / "plain", progress=False)
    assert seen[1] == (False, False, False)  # autotuning is for CUDA only; this run is on the CPU
    assert cudnn.benchmark
    saved = TrainConfig.from_dict({**vars(CFG), "deterministic": True})
    assert saved.deterministic


@pytest.fixture
def autocast_seen(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, torch.dtype | None]]:
    """(autocast on for the CPU, its dtype) at each training forward of the test model."""
    seen: list[tuple[bool, torch.dtype | None]] = []
    forward = tinynets.TinyNet.forward

    def spy(self: tinynets.TinyNet, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            enabled = torch.is_autocast_enabled("cpu")
            seen.append((enabled, torch.get_autocast_dtype("cpu") if enabled else None))
        return forward(self, x)

    monkeypatch.setattr(tinynets.TinyNet, "forward", spy)
    return seen


def test_amp_follows_the_training_device(tmp_path: Path, autocast_seen) -> None:
    small = replace(CFG, max_train_samples=64)  # 2 steps
    train(replace(small, amp="bf16"), tmp_path / "bf16", progress=False)
    train(small, tmp_path / "auto", progress=False)  # auto: fp32 on the CPU
    assert autocast_seen == [(True, torch.bfloat16)] * 2 + [(False, None)] * 2
    assert read_meta(tmp_path / "bf16")["config"]["amp"] == "bf16"
    legacy = {k: v for k, v in vars(small).items() if k != "deterministic"}
    assert TrainConfig.from_dict({**legacy, "amp": "bf16"}).amp == "auto"  # saved when bf16 meant CUDA only


def test_fp16_skips_and_counts_non_finite_steps_and_only_applied_steps_move_schedule_and_ema(
        tmp_path: Path, autocast_seen, monkeypatch: pytest.MonkeyPatch) -> None:
    ema_steps: list[int] = []
    update = ModelEma.update
    monkeypatch.setattr(ModelEma, "update", lambda self, model, step: (ema_steps.append(step), update(self, model,
                                                                                                       step))[1])
    cfg = replace(CFG, amp="fp16", ema_decay=0.9, warmup_epochs=0.0,
                  model_kwargs={"nan_at_call": 2, "inf_grad_at_call": 4})  # an inf loss and inf gradients
    summary = train(cfg, tmp_path / "run", progress=False)  # 6 steps
    assert autocast_seen == [(True, torch.float16)] * 6
    assert summary["history"][-1]["skipped_steps"] == 2
    assert ema_steps == [1, 3, 5, 6]  # the EMA skips the skipped steps
    meta = read_meta(tmp_path / "run")
    state = run_files.load_train_state(tmp_path / "run", meta)
    assert state["scheduler"]["last_epoch"] == 4  # so does the schedule
    assert state["scaler"]["scale"] == 2.0 ** 14  # torch's GradScaler on the CPU halved its scale twice
    assert summary["history"][-1]["lr"] == pytest.approx(cfg.lr * warmup_cosine(4, warmup_steps=0, total_steps=6,
                                                                                 min_ratio=cfg.min_lr_ratio))
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "run" / meta["files"]["weights"]).values())
    assert "skipped 2 steps" in (tmp_path / "run" / "train.log").read_text()


def test_fp16_steps_skipped_in_a_row_stop_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer_module, "SKIPPED_STEPS_LIMIT", 3)
    cfg = replace(CFG, amp="fp16", epochs=2, model_kwargs={"nan_from_call": 3})
    with pytest.raises(TrainingError, match=r"fp16: the gradient scaler skipped 3 steps in a row \(non-finite "
                                            r"gradients down to a loss scale of 8192\) at epoch 1 step 5; try --amp "
                                            r"bf16; the last good checkpoint \(epoch 0, global step 0\)"):
        train(cfg, tmp_path / "run", progress=False)


def counted_epochs(monkeypatch: pytest.MonkeyPatch) -> list[HostSyncCounter]:
    """A :class:`HostSyncCounter` over each training epoch (loader, augmentation, forward, backward, step) of the
    runs that follow."""
    counters: list[HostSyncCounter] = []
    run = Trainer._train_epoch

    def counted(self: Trainer) -> None:
        with HostSyncCounter(self.ctx.device) as counter:
            run(self)
        counters.append(counter)

    monkeypatch.setattr(Trainer, "_train_epoch", counted)
    device_constant.cache_clear()  # the constants' copies are counted when first made
    return counters


# per step: the small recipe copies its crop/flip draws, the deit recipe the streamed batch (images, labels) and
# its augmentation draws; per run: the epoch's order (small) and the normalisation constants (2, deit: 3 with the
# fill colour)
@pytest.mark.parametrize(("recipe", "per_step", "once"), [("small", 1, 3), ("deit", 3, 3)])
def test_a_training_step_waits_for_the_device_nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      recipe: str, per_step: int, once: int) -> None:
    counters = counted_epochs(monkeypatch)
    cfg = TrainConfig.for_recipe(recipe, model="tiny_test_net", data="digits", epochs=1, batch_size=32,
                                 max_train_samples=128, max_eval_samples=100, device="cpu", workers=1,
                                 warmup_epochs=0.5, ema_decay=0.9, lr=1e-3)
    train(cfg, tmp_path / "run", progress=False)  # 4 steps
    (counter,) = counters
    assert dict(counter.counts) == {"reads": 0, "dynamic": 0, "transfers": 4 * per_step + once}, counter.ops
    # every copy is an explicit one: no host tensor meets a device tensor (on CUDA: a device mismatch)
    assert not [op for op in counter.ops if op.startswith("transfers: host tensor into")], counter.ops


def test_fp16_reads_one_flag_per_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counters = counted_epochs(monkeypatch)
    train(replace(CFG, amp="fp16", max_train_samples=128), tmp_path / "run", progress=False)
    assert dict(counters[0].counts) == {"reads": 4, "dynamic": 0, "transfers": 4 + 3}, counters[0].ops


def test_evaluation_reads_from_the_device_once(tmp_path: Path) -> None:
    from visionmix.data import BatchLoader, build_dataset
    from visionmix.engine import evaluate

    data = BatchLoader(build_dataset("digits", "test", max_samples=100), 25, train=False)
    model = tinynets.TinyNet()
    direct = evaluate(model, data)
    device_constant.cache_clear()
    with HostSyncCounter("cpu") as counter:
        metrics = evaluate(model, data)  # 4 batches
    assert dict(counter.counts) == {"reads": 1, "dynamic": 0, "transfers": 2}, counter.ops  # + the 2 constants
    assert metrics == direct


def test_the_counter_sees_what_would_wait_for_a_gpu() -> None:
    with HostSyncCounter("cpu") as counter:
        x = torch.randn(4, 3)  # stands for a device tensor
        host = torch.rand(4, generator=torch.Generator().manual_seed(0))  # an explicit generator: host memory
        float(x.sum())
        x.tolist()
        x[x > 0]
        x.nonzero()
        x + torch.tensor([1.0, 2.0, 3.0])  # Python data meets a device tensor
        x * host[:, None]
        to_device(host, torch.device("cpu"))
        float(host.sum())  # a host value: no wait
        x * torch.tensor(2.0)  # a 0-dim host tensor is a scalar argument
    assert dict(counter.counts) == {"reads": 2, "dynamic": 2, "transfers": 3}, counter.ops
    assert torch.Tensor.tolist is torch._C.TensorBase.tolist  # the watched methods are restored


class _Ops(TorchDispatchMode):
    """The names of the operators run while active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_ema_updates_with_foreach_kernels_and_lists_its_tensors_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tinynets.TinyNet()
    ema = ModelEma(model, decay=0.9)
    listed: list[str] = []
    state_dict = nn.Module.state_dict
    monkeypatch.setattr(nn.Module, "state_dict", lambda self, *a, **k: (listed.append(type(self).__name__),
                                                                       state_dict(self, *a, **k))[1])
    start = {k: v.clone() for k, v in ema.module.named_parameters()}
    with _Ops() as ops:
        for step in (100, 101, 102):
            ema.update(model, step)
    assert listed.count("TinyNet") == 2  # the EMA's and the model's, at the first update only
    assert ops.names.count("_foreach_lerp_") == 3 and "lerp_" not in ops.names
    assert ops.names.count("_foreach_copy_") == 3  # BatchNorm's batch counter
    with torch.no_grad():
        for name, p in model.named_parameters():
            torch.testing.assert_close(ema.module.get_parameter(name), 0.9**3 * start[name] + (1 - 0.9**3) * p)


def test_an_in_memory_training_set_is_held_once_on_the_device() -> None:
    from visionmix.engine.distributed import DistContext
    from visionmix.engine.pipeline import build_pipeline

    pipe = build_pipeline(replace(CFG, max_train_samples=None), DistContext(0, 1, 0, torch.device("meta")))
    assert pipe.train.images.device.type == "meta"  # shapes only: no memory, no GPU needed
    assert pipe.train.images is pipe.bn.images and pipe.train.labels is pipe.bn.labels  # one copy, two loaders


def test_uneven_micro_batches_and_short_batches_compile_one_graph(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    from torch._dynamo.utils import counters

    from visionmix.engine.distributed import DistContext

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # dynamo's guards only
    torch._dynamo.reset()
    counters.clear()
    trainer = Trainer(replace(CFG, compile=True, accum_steps=2), tmp_path / "run",
                      DistContext(0, 1, 0, torch.device("cpu")), None, False, {})
    graphs = []
    # micro-batches 32 + 32, then batches short of unreadable images: 32 + 31, 31 + 30, 25 + 25 (at least 16:
    # a CPU convolution guards on that)
    for size in (64, 63, 61, 50):
        trainer._accumulate(torch.randn(size, 1, 28, 28), torch.randint(10, (size,)))
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs == [1, 1, 1, 1]  # the batch size is dynamic from the first step: no recompile (before: 1, 2, 3)
