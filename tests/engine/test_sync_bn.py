"""The end of a two-process ``--sync-bn`` run: the BatchNorm recomputation runs on rank 0 alone, so it must start
no collective (a SyncBatchNorm in train mode starts one per forward, which the other rank, waiting in the buffer
broadcast, never joins: under NCCL the run would hang until the time-out).

torch's SyncBatchNorm has no CPU kernels, so on gloo its train-mode forward is replaced by a stand-in that, like the
real one, starts a collective (an all-reduce of the batch statistics) on every call, and DDP's "GPU modules only"
check is lifted.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import tinynets
from visionmix.engine import TrainConfig, train

pytestmark = [pytest.mark.usefixtures("tiny_models"), pytest.mark.slow]  # slow: real processes

CFG = TrainConfig(model="tiny_test_net", data="digits", epochs=1, batch_size=32, max_train_samples=128,
                  max_eval_samples=100, sync_bn=True, ema_decay=0.9, recompute_bn="on", device="cpu")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier")


def _sync_bn_forward(self: nn.SyncBatchNorm, x: torch.Tensor) -> torch.Tensor:
    """SyncBatchNorm's behaviour that matters here, on CPU: in train mode every forward starts a collective."""
    if self.training:
        dist.all_reduce(x.detach().mean((0, 2, 3)))
    return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                        self.momentum or 0.0, self.eps)


def worker(rank: int, out: str) -> None:
    import visionmix.engine.trainer as trainer_module

    tinynets.register()
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # a hang ends as an error after the time-out instead of blocking the test
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    nn.SyncBatchNorm.forward = _sync_bn_forward
    nn.parallel.DistributedDataParallel._passing_sync_batchnorm_handle = lambda self, module: None  # "GPU only"
    trainer_module.sync_batchnorm = lambda model, ctx: nn.SyncBatchNorm.convert_sync_batchnorm(model)
    started: list[str] = []
    inside = {"on": False}

    def counting(name: str):
        call = getattr(dist, name)

        def counted(*args, **kwargs):
            if inside["on"]:
                started.append(name)
            return call(*args, **kwargs)
        return counted

    for name in COLLECTIVES:
        setattr(dist, name, counting(name))
    recompute = trainer_module.recompute_bn_statistics

    def watched(model: nn.Module, batches) -> int:
        assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
        inside["on"] = True
        try:
            return recompute(model, batches)
        finally:
            inside["on"] = False

    trainer_module.recompute_bn_statistics = watched
    summary = train(CFG, Path(out) / "run", progress=False)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"collectives": started, "steps": len(summary["history"])}))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo in this build")
def test_the_end_of_a_two_process_sync_bn_run_starts_no_collective_on_one_rank(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(worker, args=(str(tmp_path),), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["collectives"] == []  # rank 0 recomputed the model's and the EMA's statistics alone
    assert results == [{"collectives": [], "steps": 1}] * 2  # both ranks finished the run
    log = (tmp_path / "run" / "train.log").read_text()
    assert "recomputed the statistics of 1 BatchNorm layers" in log
