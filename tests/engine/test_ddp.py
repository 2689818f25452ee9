"""Two gloo processes on 127.0.0.1 against one process on the combined batch.

The engine's loader hands rank r rows r, r+2, ... of each global batch and DDP averages the ranks' gradients, so
for a model without BatchNorm and without drop-path the averaged gradient must equal the single-process gradient
of the whole batch (up to float summation order), step after step; and the trainer itself, run under DDP, must
end where the single-process trainer ends, with only rank 0 writing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import tinynets
from visionmix.data import BatchLoader, build_dataset
from visionmix.engine import TrainConfig, train
from visionmix.engine.distributed import init_distributed, wrap_model
from visionmix.models import create_model

# slow: real processes; tiny_test_net / tiny_test_dbb registered for this module
pytestmark = [pytest.mark.usefixtures("tiny_models"), pytest.mark.slow]

STEPS, BATCH = 3, 32
CFG = TrainConfig(model="tiny_test_net", data="digits", epochs=1, batch_size=BATCH, max_train_samples=128,
                  max_eval_samples=100, lr=1e-2, drop_path_rate=0.0, model_kwargs={"bn": False}, device="cpu")


def gradients(model: torch.nn.Module, wrapped: torch.nn.Module, loader: BatchLoader) -> list[dict[str, torch.Tensor]]:
    """Per-step gradients of ``STEPS`` plain SGD steps (so later steps start from the same moved weights)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    out = []
    for _, (images, labels) in zip(range(STEPS), loader.epoch(0), strict=False):
        optimizer.zero_grad()
        F.cross_entropy(wrapped(images), labels).backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters()})
        optimizer.step()
    return out


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("tiny_test_net", num_classes=10, in_chans=1, bn=False, drop_path_rate=0.0)


def worker(rank: int, out: str) -> None:
    tinynets.register()  # a spawned process: the module's fixture did not run here
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # a file rendezvous: no TCP port to pick (and race for) when tests run in parallel; the engine joins this group
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    ctx = init_distributed("cpu")
    model = make_model()
    loader = BatchLoader(build_dataset("digits", "train", max_samples=128), BATCH, train=True, seed=0, rank=rank,
                         world_size=2)
    torch.save(gradients(model, wrap_model(model, ctx), loader), Path(out) / f"grads{rank}.pt")
    train(CFG, Path(out) / f"run{rank}", progress=False)  # each rank names its own dir: only rank 0's may appear
    assert not ctx.owns_group
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available in this build")
def test_two_gloo_ranks_equal_one_process_on_the_combined_batch(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(worker, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"grads{r}.pt") for r in range(2)]
    model = make_model()
    single = gradients(model, model, BatchLoader(build_dataset("digits", "train", max_samples=128), BATCH,
                                                 train=True, seed=0))
    for step in range(STEPS):
        for name, grad in single[step].items():
            assert torch.equal(ranks[0][step][name], ranks[1][step][name])  # every rank holds the same average
            torch.testing.assert_close(ranks[0][step][name], grad, rtol=1e-5, atol=1e-7, msg=f"{step} {name}")

    summary = train(CFG, tmp_path / "single", progress=False)
    assert not (tmp_path / "run1").exists()  # rank 1 wrote nothing
    ddp_meta = json.loads((tmp_path / "run0" / "checkpoint.json").read_text())
    assert ddp_meta["world_size"] == 2 and ddp_meta["global_step"] == summary["history"][-1]["global_step"] == 4
    ddp_weights = load_file(tmp_path / "run0" / ddp_meta["files"]["weights"])
    single_meta = json.loads((tmp_path / "single" / "checkpoint.json").read_text())
    single_weights = load_file(tmp_path / "single" / single_meta["files"]["weights"])
    for name, tensor in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], tensor, rtol=0, atol=1e-5, msg=name)
    assert ddp_meta["history"][0]["train_loss"] == pytest.approx(summary["history"][0]["train_loss"], rel=1e-5)
    assert ddp_meta["history"][0]["eval_top1"] == summary["top1"]


@pytest.mark.slow
def test_torchrun_cli_two_processes(tmp_path: Path) -> None:
    """The documented command: ``torchrun --nproc_per_node=2 -m visionmix train ...`` (only rank 0 writes/prints)."""
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "visionmix",
           "train", "--model", "mixer_nano", "--data", "digits", "--max-train-samples", "64", "--max-eval-samples",
           "64", "--batch-size", "32", "--epochs", "1", "--device", "cpu", "--no-progress", "--out", str(run)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    report = f"rc={proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-3000:]}"
    assert proc.returncode == 0, report
    meta = json.loads((run / "checkpoint.json").read_text())
    assert meta["world_size"] == 2 and meta["global_step"] == 2 and meta["finished"], report
    assert proc.stdout.count("mixer_nano on digits: top-1") == 1, report
