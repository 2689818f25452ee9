"""Profile a model: parameters, MACs, latency, throughput, peak memory, train form vs deployed form.

Conventions (SPEC.md, "MACs"): MACs are ``torch.utils.flop_counter.FlopCounterMode``'s flop total / 2 for one image,
so they count matmuls, convolutions and attention, not norms, activations or bias adds. Timings run the model in
``eval()`` under ``torch.inference_mode()``: a few warm-up calls, then ``repeats`` samples, each long enough to be
timed reliably; we report the median and the inter-quartile range relative to it ("spread").

Peak memory is the largest number of bytes held at once by tensors created during one forward pass at the
throughput batch size (activations and outputs; not the weights or the input). On CUDA it is
``torch.cuda.max_memory_allocated`` above the level before the call, which also includes kernel workspaces. On CPU
we track tensor storages with a dispatch mode: ``tracemalloc`` does not see torch's allocator and the process's
peak RSS (``getrusage``) only grows, so neither can attribute a peak to one call.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import re
import subprocess
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from visionmix.checks import check_choice, check_positive
from visionmix.errors import DeployError, InvalidValue
from visionmix.files import write_new
from visionmix.module_state import eval_mode, on_device
from visionmix.tables import format_table, si_format
from visionmix.timing import time_alternately, time_call

FORMS = ("train", "deploy")


def count_params(model: nn.Module) -> int:
    """Number of parameters, ``sum(p.numel())`` (buffers such as BN statistics are not parameters)."""
    return sum(p.numel() for p in model.parameters())


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Flops of the CPU attention kernel: the formula FlopCounterMode uses for the CUDA ones (Q K^T and A V)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode has formulas for the CUDA attention kernels but not for the one scaled_dot_product_attention runs
# on CPU, where attention would count zero.
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_macs(model: nn.Module, inputs: torch.Tensor) -> int:
    """Multiply-adds of one forward pass of ``model(inputs)`` in eval mode (FlopCounterMode flops / 2)."""
    with (eval_mode(model), torch.inference_mode(),
          FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter):
        model(inputs)
    return counter.get_total_flops() // 2


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of storages created under the mode that are still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._tracked.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views and in-place results share an argument's storage (a weight's transpose, ``x.add_``): not new memory.
        existing = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for leaf in tree_leaves(out):
            if not isinstance(leaf, torch.Tensor):
                continue
            storage = leaf.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in existing or key in self._tracked:
                continue
            self._tracked.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


def peak_memory(model: nn.Module, inputs: torch.Tensor) -> int:
    """Peak bytes of the tensors created by one eval-mode forward pass of ``model(inputs)`` (see the module doc)."""
    with eval_mode(model), torch.inference_mode():
        if inputs.device.type == "cuda":
            torch.cuda.synchronize(inputs.device)
            before = torch.cuda.memory_allocated(inputs.device)
            torch.cuda.reset_peak_memory_stats(inputs.device)
            model(inputs)
            torch.cuda.synchronize(inputs.device)
            return torch.cuda.max_memory_allocated(inputs.device) - before
        tracker = _LiveTensorBytes()
        with tracker:
            model(inputs)
        return tracker.peak


def _sync_for(device: torch.device) -> Callable[[], None] | None:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def matmul_workload(n: int = 2048, *, device: str | torch.device = "cpu") -> tuple[Callable[[], Any], int]:
    """A callable doing one fp32 ``n x n @ n x n`` matmul into a preallocated output, and its flop count 2 n^3."""
    check_positive("n", n)
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    out = torch.empty(n, n, device=device)
    return (lambda: torch.mm(a, b, out=out)), 2 * n**3


def matmul_gflops(n: int = 2048, *, device: str | torch.device = "cpu", repeats: int = 10) -> float:
    """GFLOP/s of a 2048^3 fp32 matmul: the machine's practical peak, the yardstick for a model's achieved rate.
    Measure it in the same process as the model (or alternately with it: :func:`time_alternately`)."""
    fn, flops = matmul_workload(n, device=device)
    return flops / time_call(fn, repeats=repeats, sync=_sync_for(torch.device(device))).median / 1e9


@dataclass
class BenchResult:
    """One model in one form, profiled at a given input size. ``gflops`` is the achieved rate at batch
    ``batch_size`` (2 x MACs x images/s); ``matmul_fraction`` compares it with :func:`matmul_gflops`."""

    model: str
    form: str
    compiled: str | None
    device: str
    input_size: tuple[int, ...]
    batch_size: int
    params: int
    macs: int
    latency_ms: float
    latency_spread: float
    throughput: float
    throughput_spread: float
    peak_mem_mb: float
    gflops: float
    matmul_fraction: float | None = None


def profile_model(model: nn.Module, *, name: str, form: str = "train", input_size: Sequence[int] = (3, 224, 224),
                  batch_size: int = 8, device: str | torch.device = "cpu", compile_backend: str | None = None,
                  warmup: int = 3, repeats: int = 10, reference_gflops: float | None = None) -> BenchResult:
    """Profile ``model`` in eval mode on ``device`` (a copy if it lives elsewhere; the caller's model keeps its
    device and mode) on random ``(B, *input_size)`` inputs.

    Latency is at batch 1, throughput (images/s) and peak memory at ``batch_size``. ``compile_backend`` times
    ``torch.compile(model, backend=...)`` instead of the eager model (params, MACs and memory stay eager).
    ``reference_gflops`` (from :func:`matmul_gflops`, same process) fills ``matmul_fraction``.
    """
    check_choice("form", form, FORMS)
    check_positive("batch_size", batch_size)
    input_size = tuple(input_size)
    if len(input_size) not in (3, 4):
        raise InvalidValue(f"input_size must be (channels, height, width) or, for a video model, (channels, "
                           f"frames, height, width), got {input_size!r}")
    device = torch.device(device)
    model = on_device(model, device)  # the caller's model stays where it is, in its own mode
    one = torch.randn(1, *input_size, device=device)
    batch = torch.randn(batch_size, *input_size, device=device)
    runner = torch.compile(model, backend=compile_backend, dynamic=False) if compile_backend else model
    sync = _sync_for(device)
    with eval_mode(model), torch.inference_mode():
        latency = time_call(lambda: runner(one), warmup=warmup, repeats=repeats, sync=sync)
        per_batch = time_call(lambda: runner(batch), warmup=warmup, repeats=repeats, sync=sync)
    macs = count_macs(model, one)
    throughput = batch_size / per_batch.median
    gflops = 2 * macs * throughput / 1e9
    return BenchResult(
        model=name, form=form, compiled=compile_backend, device=str(device), input_size=input_size,
        batch_size=batch_size, params=count_params(model), macs=macs, latency_ms=latency.median * 1e3,
        latency_spread=latency.spread, throughput=throughput, throughput_spread=per_batch.spread,
        peak_mem_mb=peak_memory(model, batch) / 2**20, gflops=gflops,
        matmul_fraction=gflops / reference_gflops if reference_gflops else None,
    )


def bench_models(names: Sequence[str], *, deploy: bool = False, batch_size: int = 8, img_size: int | None = None,
                 in_chans: int | None = None, device: str | torch.device = "cpu", compile_backend: str | None = None,
                 warmup: int = 3, repeats: int = 10, reference_gflops: float | None = None,
                 model_kwargs: dict[str, Any] | None = None) -> list[BenchResult]:
    """Build each registered model (random weights) and profile it at its default input size, or at
    ``img_size``/``in_chans``; with ``deploy`` also profile ``visionmix.reparameterize(model)`` for every model
    that re-parameterisation changes (a row "deploy" follows its "train" row)."""
    from visionmix.models import create_model
    from visionmix.reparam import reparameterize

    results = []
    for name in names:
        model = create_model(name, img_size=img_size, in_chans=in_chans, **(model_kwargs or {}))
        forms = {"train": model}
        if deploy:
            deployed = reparameterize(model.eval())
            if [type(m) for m in deployed.modules()] != [type(m) for m in model.modules()]:
                forms["deploy"] = deployed
        for form, module in forms.items():
            results.append(profile_model(
                module, name=name, form=form, input_size=model.pretrained_cfg["input_size"], batch_size=batch_size,
                device=device, compile_backend=compile_backend, warmup=warmup, repeats=repeats,
                reference_gflops=reference_gflops))
    return results


@dataclass(frozen=True)
class BackendResult:
    """One model on one inference backend (:func:`visionmix.deploy`): images/s at ``batch_size``, its ratio to the
    eager deployed model timed in the same rounds, and the backend's difference from eager; or why it was skipped."""

    model: str
    backend: str
    batch_size: int
    throughput: float | None
    throughput_spread: float | None
    vs_eager: float | None
    max_rel_diff: float | None
    skipped: str | None = None


def bench_backends(names: Sequence[str], backends: Sequence[str], *, batch_size: int = 8, img_size: int | None = None,
                   in_chans: int | None = None, warmup: int = 3, repeats: int = 10,
                   model_kwargs: dict[str, Any] | None = None, quantize: str | None = None) -> list[BackendResult]:
    """For each registered model (random weights, re-parameterised), build every backend in ``backends`` (eager is
    always added as the yardstick; ``quantize="int8"`` adds ``onnxruntime-int8``) with :func:`visionmix.deploy`,
    then time them alternately in one process on one random batch (:func:`time_alternately`). A backend the model
    cannot take gets a row saying why."""
    from visionmix.deployment import deploy
    from visionmix.export import randomize_weights
    from visionmix.models import create_model

    rows = {b: (b, None) for b in dict.fromkeys(("eager", *backends))}
    if quantize is not None:
        rows[f"onnxruntime-{quantize}"] = ("onnxruntime", quantize)
    results = []
    for name in names:
        model = create_model(name, img_size=img_size, in_chans=in_chans, **(model_kwargs or {}))
        example = torch.randn(batch_size, *model.pretrained_cfg["input_size"])
        randomize_weights(model, example)  # BN statistics and a non-constant head, as a trained model has
        built, skipped = {}, {}
        for label, (backend, quantized) in rows.items():
            try:
                built[label] = deploy(model, example, backend, quantize=quantized)
            except DeployError as err:
                skipped[label] = str(err)
        timings = time_alternately({b: (lambda d=d, x=example: d(x)) for b, d in built.items()}, warmup=warmup,
                                   repeats=repeats)
        eager = timings["eager"].median if "eager" in timings else None
        for label in rows:
            if label in skipped:
                results.append(BackendResult(name, label, batch_size, None, None, None, None, skipped[label]))
                continue
            t = timings[label]
            results.append(BackendResult(name, label, batch_size, batch_size / t.median, t.spread,
                                         eager / t.median if eager else None, built[label].max_rel_diff))
    return results


def backend_table(results: Sequence[BackendResult]) -> str:
    """The backend comparison as aligned text: one row per (model, backend)."""
    rows = [("model", "backend", "img/s", "spread", "vs eager", "max rel diff")]
    for r in results:
        if r.skipped is not None:
            rows.append((r.model, r.backend, "-", "-", "-", f"skipped: {r.skipped}"))
        else:
            rows.append((r.model, r.backend, f"{r.throughput:.1f}", f"{100 * r.throughput_spread:.0f}%",
                         f"{r.vs_eager:.2f}x", f"{r.max_rel_diff:.1e}"))
    return format_table(rows, left=2, free_last=True)


def results_table(results: Sequence[BenchResult]) -> str:
    """A plain-text table of ``results`` for the terminal."""
    header = ["model", "form", "input", "params", "MACs", "latency b1 (ms)", "img/s", "peak MB", "GFLOP/s"]
    with_fraction = any(r.matmul_fraction is not None for r in results)
    if with_fraction:
        header.append("of matmul")
    rows = [header]
    for r in results:
        row = [r.model, r.form + (f"+{r.compiled}" if r.compiled else ""), "x".join(map(str, r.input_size)),
               si_format(r.params), si_format(r.macs), f"{r.latency_ms:.2f} ±{r.latency_spread:.0%}",
               f"{r.throughput:.1f} ±{r.throughput_spread:.0%} (b{r.batch_size})", f"{r.peak_mem_mb:.1f}",
               f"{r.gflops:.1f}"]
        if with_fraction:
            row.append("-" if r.matmul_fraction is None else f"{r.matmul_fraction:.2f}")
        rows.append(row)
    return format_table(rows, left=3, rule=True)


# settings that change which float paths the CPU kernels take (and so a run's last bits), recorded when set
NUMERIC_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ATEN_CPU_CAPABILITY",
               "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
_VECTOR_FLAG = re.compile(r"avx\w*|amx\w*|fma\w*|sse4\w*|f16c")
_BUILT_WITH = {"mkl": re.compile(r"Math Kernel Library Version ([\d.]+)"), "onednn": re.compile(r"MKL-DNN (v[\w.]+)")}


def environment() -> dict[str, Any]:
    """Where a measurement or a run was made, as much as a rerun needs to tell a change of code from one of machine:
    visionmix's version and git commit (when imported from a checkout; ``git_dirty`` when it has changes), torch and
    the MKL/oneDNN it was built with, the CPU model and vector flags, the ISA torch's kernels dispatch to
    (``cpu_capability``), threads, the GPUs, and the environment variables of :data:`NUMERIC_ENV` that are set."""
    from visionmix import __version__

    built = torch.__config__.show()
    return {"visionmix": __version__, **_git_commit(), "torch": torch.__version__,
            **{name: (m[1] if (m := pattern.search(built)) else None) for name, pattern in _BUILT_WITH.items()},
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "processor": platform.processor() or None, **_cpu(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [],
            "python": platform.python_version(), "env": {k: os.environ[k] for k in NUMERIC_ENV if k in os.environ}}


def _cpu() -> dict[str, Any]:
    """The CPU's model name, family/model numbers (a virtual machine may show a generic name) and SIMD flags, from
    ``/proc/cpuinfo`` (Linux; ``None`` elsewhere)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu_model": None, "cpu_family_model": None, "cpu_flags": None}
    fields = dict(line.split(":", 1) for line in info.splitlines()[:64] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = [f for f in fields.get("flags", "").split() if _VECTOR_FLAG.fullmatch(f)]
    family_model = f"{fields['cpu family']}/{fields['model']}" if "cpu family" in fields and "model" in fields else None
    return {"cpu_model": fields.get("model name"), "cpu_family_model": family_model, "cpu_flags": sorted(flags)}


def _git_commit() -> dict[str, Any]:
    """``git_commit`` (and ``git_dirty``) of the checkout visionmix is imported from; ``None`` if it is not one."""
    source = Path(__file__).resolve().parent
    try:
        tracked = subprocess.run(["git", "-C", str(source), "ls-files", "--error-unmatch", Path(__file__).name],
                                 capture_output=True, text=True, timeout=10)  # not a repository that merely holds us
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        status = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    if tracked.returncode != 0 or commit.returncode != 0:
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV text of flat dicts (the union of their keys as the header, in first-seen order)."""
    header = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def save_results(results: Sequence[BenchResult | BackendResult], path: str | Path, *, force: bool = False,
                 meta: dict[str, Any] | None = None) -> Path:
    """Write ``results`` as JSON (``{"meta", "results"}``) or CSV, chosen by the suffix of ``path``."""
    path = Path(path)
    check_choice("output suffix", path.suffix, (".json", ".csv"))
    rows = [asdict(r) for r in results]
    if path.suffix == ".json":
        text = json.dumps({"meta": {**environment(), **(meta or {})}, "results": rows}, indent=2) + "\n"
    else:
        text = to_csv([{**row, "input_size": "x".join(map(str, row["input_size"]))} if "input_size" in row else row
                       for row in rows])
    return write_new(path, text, force=force)


@dataclass(frozen=True)
class ModelCard:
    """What ``visionmix models`` lists of a registered model: parameters at its default head, MACs of one image
    (counted for inputs up to 64x64 px, the paper's figure otherwise), its input size and the published top-1."""

    name: str
    params: int | None
    macs: float | None
    input_size: tuple[int, ...]
    top1: float | None


def describe_model(name: str) -> ModelCard:
    """The :class:`ModelCard` of ``name``, built on the meta device (no weights are allocated); a model whose
    construction needs real tensors (NotImplementedError/RuntimeError on meta) gets no counted figures."""
    from visionmix.models import create_model, model_entry

    entry = model_entry(name)
    input_size = tuple(entry.cfg["input_size"])
    small = math.prod(input_size[-2:]) <= 64 * 64  # (C, H, W), or (C, T, H, W) for a video model
    params = macs = None
    try:
        with torch.device("meta"):
            model = create_model(name, num_classes=entry.cfg["num_classes"])
            params = count_params(model)
            if small:
                macs = count_macs(model, torch.empty(1, *input_size))
    except (NotImplementedError, RuntimeError):
        pass
    if not small and entry.reference.gmacs is not None:
        macs = entry.reference.gmacs * 1e9
    return ModelCard(name, params, macs, input_size, entry.reference.top1)
