"""Process-group set-up for ``torchrun --nproc_per_node=N -m visionmix train ...`` (gloo on CPU, nccl on CUDA).

Without torchrun's environment (``WORLD_SIZE`` unset or 1) everything here is a no-op on a single process, so
the trainer has one code path. Only rank 0 writes files; the others take part in the collectives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from visionmix.errors import InvalidValue


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size`` processes, running on ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # this context created the process group and destroys it in :func:`shutdown`

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_rank() -> int:
    """This process's rank as torchrun set it in the environment (0 outside torchrun), before any group exists."""
    return int(os.environ.get("RANK", "0"))


def resolve_device(device: str | torch.device, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without CUDA is a ``ValueError``."""
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidValue(f"device={device!r} but CUDA is not available here; use --device cpu or auto")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if name != "cpu":
        raise InvalidValue(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return torch.device("cpu")


def init_distributed(device: str | torch.device = "auto") -> DistContext:
    """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and join the process group (once per process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(0, 1, 0, resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device, local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    if dist.get_world_size() != world_size:
        raise RuntimeError(f"WORLD_SIZE={world_size} but the process group has {dist.get_world_size()} ranks")
    return DistContext(rank, world_size, local_rank, target, owns_group)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group if :func:`init_distributed` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around ``model`` (already on ``ctx.device``) when distributed, else ``model``.

    DDP averages gradients over ranks during ``backward``: with equal per-rank batches that is the gradient of
    the mean loss over the global batch. BatchNorm statistics stay per rank (no SyncBatchNorm on gloo).
    """
    if not ctx.enabled:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def sync_batchnorm(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``model`` with every BatchNorm a :class:`~torch.nn.SyncBatchNorm` when distributed (``--sync-bn``), else
    ``model``; CUDA only (torch's SyncBatchNorm has no CPU kernels)."""
    if not ctx.enabled:
        return model
    if ctx.device.type != "cuda":
        raise InvalidValue("sync_bn needs CUDA devices (torch's SyncBatchNorm runs on GPUs only); on CPU each "
                           "process keeps its own BatchNorm statistics")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op on one process) and return it."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), e.g. before a sharded evaluation."""
    if ctx.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
