"""Host <-> device traffic of the training step: :func:`to_device`, the one way the step's data reach the training
device, and :class:`HostSyncCounter`, which counts what would make the host wait for a GPU.

On a GPU every read of a device value by the host (``.item()``, ``float(t)``, ``.tolist()``, ``.cpu()``), every
operation whose output size depends on device values (``nonzero``, boolean indexing, ``unique``, ``bincount``)
and every blocking copy from host memory drains the device's queue. The counter records them per category:

- ``reads``: a scalar read (``aten._local_scalar_dense``) or ``tolist``/``cpu``/``numpy`` of a device tensor;
- ``dynamic``: an operation whose output shape depends on a device tensor's values;
- ``transfers``: a copy to the device (:func:`to_device`'s, or an ``aten._to_copy`` of a host tensor to a
  device), or a host tensor of one or more dimensions meeting a device tensor in an operation (on CUDA a device
  mismatch, so the code made a copy the counter did not see).

On a CUDA (or other accelerator) run "device tensor" means what it says. On the CPU, where everything lives in one
memory, it is tracked: host tensors are those made from Python data (``torch.tensor``), those drawn from an
explicit CPU ``torch.Generator`` (host-side randomness) and whatever is computed from host tensors alone; every
other tensor (model, optimizer, batches, factories) stands for a device tensor, but for those made inside
:func:`host_side`. The step's code follows two rules that keep this count faithful: work meant for the host (drawing
augmentation parameters) runs inside :func:`host_side` or draws from an explicit generator, and copies to the device
go through :func:`to_device` (constants: :func:`device_constant`, copied once per device).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten
_READS = {aten._local_scalar_dense.default}
_DYNAMIC = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
            aten.unique_consecutive.default, aten.bincount.default, aten.repeat_interleave.Tensor,
            aten.nonzero_static.default}
_FROM_PYTHON = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
_HOST_METHODS = ("tolist", "cpu", "numpy")  # reads that do not dispatch on a CPU tensor


_HOST_SIDE: ContextVar[bool] = ContextVar("host_side", default=False)
_TO_DEVICE: ContextVar[bool] = ContextVar("to_device", default=False)  # inside to_device's copy


@contextmanager
def host_side() -> Iterator[None]:
    """Mark the tensors made inside as host memory (for :class:`HostSyncCounter` on a CPU run): code that draws
    parameters on the host says so, and a read of them is no device read."""
    token = _HOST_SIDE.set(True)
    try:
        yield
    finally:
        _HOST_SIDE.reset(token)


@functools.lru_cache(maxsize=64)
def device_constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``values`` as a float32 tensor on ``device``, copied there once per process (do not modify it)."""
    with host_side():
        host = torch.tensor(values, dtype=torch.float32)
    return to_device(host, device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` copied to ``device``: on CUDA from pinned memory without blocking the host; always a copy (on the
    CPU a cheap one), so that :class:`HostSyncCounter` sees it."""
    token = _TO_DEVICE.set(True)
    try:
        if device.type == "cuda":
            if tensor.device.type == "cpu" and not tensor.is_pinned():
                tensor = tensor.pin_memory()
            return tensor.to(device, non_blocking=True)
        return tensor.to(device, copy=True)
    finally:
        _TO_DEVICE.reset(token)


class HostSyncCounter(TorchDispatchMode):
    """Count, while active, the operations that would make the host wait for ``device`` (see the module
    docstring): ``counter.counts`` is ``{"reads": n, "dynamic": n, "transfers": n}``, ``counter.ops`` the
    operators behind them (for a failure message)."""

    def __init__(self, device: torch.device | str) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.counts: Counter[str] = Counter(reads=0, dynamic=0, transfers=0)
        self.ops: Counter[str] = Counter()
        self._host = WeakIdKeyDictionary()  # CPU runs: the tensors that stand for host memory
        self._saved: dict[str, Any] = {}

    def is_host(self, tensor: torch.Tensor) -> bool:
        if self.device.type != "cpu":
            return tensor.device.type == "cpu"
        return tensor in self._host or _HOST_SIDE.get()

    def _count(self, kind: str, what: str) -> None:
        self.counts[kind] += 1
        self.ops[f"{kind}: {what}"] += 1

    def __enter__(self) -> HostSyncCounter:
        for name in _HOST_METHODS:  # no dispatch on a CPU tensor: watched at the Python level
            self._saved[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name, self._watch(name, getattr(torch.Tensor, name)))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for name, method in self._saved.items():
            if method is None:
                delattr(torch.Tensor, name)  # the base class's method again
            else:
                setattr(torch.Tensor, name, method)
        self._saved.clear()

    def _watch(self, name: str, method: Any) -> Any:
        def watched(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not self.is_host(tensor):
                self._count("reads", f"Tensor.{name}")
            return method(tensor, *args, **kwargs)
        return watched

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        host = [t for t in inputs if self.is_host(t)]
        device = [t for t in inputs if not self.is_host(t)]
        if func in _READS and device:
            self._count("reads", str(func))
        if device and (func in _DYNAMIC or (func is aten.index.Tensor and _bool_index(args))
                       or (func in (aten.index_put_.default, aten.index_put.default) and _bool_index(args))):
            self._count("dynamic", str(func))
        copy_to_device = func is aten._to_copy.default and (_TO_DEVICE.get() or "device" in kwargs and bool(host))
        if copy_to_device:
            self._count("transfers", str(func))
        elif device:
            for t in host:
                if t.dim() > 0:  # a 0-dim CPU tensor is a scalar argument on CUDA, no copy
                    self._count("transfers", f"host tensor into {func}")
                    self._host.pop(t, None)  # copied once; on a CPU run it now stands for the copy
        out = func(*args, **kwargs)
        if self.device.type == "cpu" and not copy_to_device:
            generator = kwargs.get("generator")
            from_host = (_HOST_SIDE.get() or func in _FROM_PYTHON
                         or (generator is not None and generator.device.type == "cpu") or (host and not device))
            if from_host:
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        self._host[t] = True
        return out


def _bool_index(args: tuple) -> bool:
    """Whether an ``index``/``index_put`` call indexes with a boolean mask (a ``nonzero`` on the device)."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
