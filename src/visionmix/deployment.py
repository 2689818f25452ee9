"""Deploy for speed: re-parameterise, then run on the fastest inference backend that computes what eager PyTorch does.

``deploy(model, example, backend="auto")`` folds every multi-branch block and conv+BN pair
(:func:`visionmix.reparameterize`), builds each candidate backend, checks its output against the eager deployed
model on ``example`` (and on a batch one larger: a graph that baked in the batch size is rejected) and, for
``"auto"``, times the verified candidates alternately on ``example`` and keeps the fastest. Backends:

- ``eager``: the deployed model in ``torch.inference_mode``;
- ``channels_last``: the same with NHWC weights and inputs (oneDNN's preferred layout for convolutions);
- ``onnxruntime``: the dynamo ONNX export (:mod:`visionmix.export`) in an onnxruntime CPU session;
- ``inductor``: ``torch.export`` (batch dimension dynamic) compiled by ``torch.compile``'s inductor with freezing on:
  weights become constants, so Linear/conv weights are pre-packed for MKL/oneDNN and the pointwise ops between them
  (LayerNorm, GELU, residual adds, layout changes) fuse into generated C++ loops. It needs a C++ compiler, compiles
  for tens of seconds (once for the example's batch size, once more for any other size; CondConv/WeightNet, whose
  grouped conv has the batch size as its group count, once per size) and caches the result under torch's cache
  directory. Compiling the exported graph, not the model, gives every deployed model its own
  compiled-code cache: frozen weights are guarded by identity, so models of one class compiled in one process would
  otherwise each add entries to the cache of their shared ``forward`` and, past torch's recompile limit, run eager.

A backend that cannot take a model (CondConv/WeightNet build one grouped conv whose group count is the batch size)
is skipped with its reason when choosing automatically, and is a :class:`DeployError` when asked for by name.

``quantize="int8"`` (opt-in, lossy) runs on onnxruntime with the weights of every MatMul/Gemm (the Linear layers:
the token- and channel-MLPs of Mixer/S2-MLP/SPACH-MLP, attention projections, heads) quantised to int8 and the
activations quantised per call (``onnxruntime.quantization.quantize_dynamic``; Jacob et al., CVPR 2018, eq. 1:
``r = S (q - Z)``). Its difference from the float model is reported, not bounded: measure what it costs in
accuracy with ``visionmix eval --quantize int8`` on real data.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from visionmix.checks import check_choice
from visionmix.errors import DeployError, InvalidType, InvalidValue, first_line

BACKENDS = ("eager", "channels_last", "onnxruntime", "inductor")
QUANTIZE = ("int8",)  # dynamic int8 Linear weights, onnxruntime only
DEFAULT_RTOL = 1e-4  # max |backend - eager| relative to the output's scale (SPEC section 3's float32 bound)


@dataclass
class Deployed:
    """An inference callable: ``deployed(x)`` returns the logits of the chosen ``backend``.

    ``max_rel_diff``: the backend's largest |difference| from the eager deployed model on the checks, relative to the
    output's scale; ``seconds``: median seconds per call of each timed candidate (``auto``); ``skipped``: the
    backends that were not usable and why; ``reason``: why this backend was chosen; ``quantize``: ``"int8"`` or
    ``None`` (float32).
    """

    backend: str
    run: Callable[[torch.Tensor], torch.Tensor]
    max_rel_diff: float
    reason: str
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    quantize: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where it takes its inputs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


def _eager(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return run


def _channels_last(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    import copy

    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return nhwc(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)

    return run


def _onnxruntime(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    if example.device.type != "cpu":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DeployError(f"onnxruntime has no CUDA provider here (install onnxruntime-gpu) for a model on "
                              f"{example.device}")
    return _onnx_session(model, example, quantize=False)


def _onnx_session(model: nn.Module, example: torch.Tensor, *, quantize: bool) -> Callable[[torch.Tensor],
                                                                                           torch.Tensor]:
    from visionmix.export import onnx_runner, write_onnx
    from visionmix.module_state import on_device

    with tempfile.TemporaryDirectory(prefix="visionmix-deploy-") as tmp:
        path = Path(tmp) / "model.onnx"
        write_onnx(on_device(model, "cpu"), example.cpu(), path)  # ONNX is traced on the host
        if quantize:
            from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

            # shape inference first (ORT's recommended pre-processing), then int8 weights per output channel
            quant_pre_process(str(path), str(path.with_suffix(".pre.onnx")), skip_symbolic_shape=True)
            with _root_logger_untouched():
                quantize_dynamic(path.with_suffix(".pre.onnx"), path.with_suffix(".int8.onnx"), per_channel=True,
                                 op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
            path = path.with_suffix(".int8.onnx")
        return onnx_runner(path, device=example.device)  # the session holds the model; the file may go


def _inductor(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch._inductor.config as inductor_config

    from visionmix.export import trace_program

    program = trace_program(model, example)
    compiled = torch.compile(program.module())

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), inductor_config.patch(freezing=True):  # freezing applies when (re)compiling
            return compiled(x)

    return run


@contextmanager
def _root_logger_untouched() -> Iterator[None]:
    """onnxruntime's quantiser logs through ``logging.info``, which configures the root logger when it has no handler
    (every later log line of the program would then print); a handler that drops records keeps it as it was."""
    root, null = logging.getLogger(), logging.NullHandler()
    root.addHandler(null)
    try:
        yield
    finally:
        root.removeHandler(null)


_BUILDERS: dict[str, Callable[[nn.Module, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "eager": _eager, "channels_last": _channels_last, "onnxruntime": _onnxruntime,
    "inductor": _inductor}


def _verified(name: str, model: nn.Module, checks: list[tuple[torch.Tensor, torch.Tensor]], example: torch.Tensor,
              rtol: float, *, quantize: bool = False) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """Build backend ``name`` (int8 with ``quantize``) and check it on every (input, eager output) pair: the same
    shapes, and within ``rtol`` of the output's scale; :class:`DeployError` if it fails."""
    try:
        run = _onnx_session(model, example, quantize=True) if quantize else _BUILDERS[name](model, example)
        worst = 0.0
        for x, expected in checks:
            got = run(x)
            if got.shape != expected.shape:
                raise DeployError(f"returned shape {tuple(got.shape)} for input {tuple(x.shape)}, eager returns "
                                  f"{tuple(expected.shape)} (batch size baked into the graph?)")
            scale = max(expected.abs().max().item(), 1e-12)
            worst = max(worst, (got.float() - expected.float()).abs().max().item() / scale)
    except DeployError as err:
        raise DeployError(f"{name}: {err}") from err
    except Exception as err:  # each runtime raises its own types; what matters is that this backend does not work
        raise DeployError(f"{name}: {first_line(err)}") from err
    if not worst <= rtol:
        raise DeployError(f"{name}: differs from eager by {worst:.3g} of the output's scale, more than rtol={rtol:g}")
    return run, worst


def deploy(model: nn.Module, example: torch.Tensor, backend: str = "auto", *, rtol: float = DEFAULT_RTOL,
           repeats: int = 5, candidates: tuple[str, ...] = BACKENDS, quantize: str | None = None,
           device: str | torch.device = "cpu") -> Deployed:
    """``model`` re-parameterised and on ``backend`` (``"auto"``: the fastest verified of ``candidates`` on
    ``example``), as a :class:`Deployed` callable taking inputs on ``device``. ``model`` itself is not changed;
    inference runs on ``device`` in float32 (onnxruntime on a GPU only with its CUDA provider installed), or with
    ``quantize="int8"`` on onnxruntime's CPU session with int8 Linear weights (``backend`` "auto" or "onnxruntime";
    ``rtol`` does not apply). The checks run without TF32. See the module docstring for the checks."""
    from visionmix.module_state import no_tf32, on_device
    from visionmix.reparam import reparameterize
    from visionmix.timing import time_alternately

    if not isinstance(model, nn.Module):
        raise InvalidType(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example, torch.Tensor) or not example.is_floating_point():
        got = f"a {example.dtype} tensor" if isinstance(example, torch.Tensor) else type(example).__name__
        raise InvalidType(f"example must be a floating-point tensor batch (B, C, H, W), got {got}")
    if not rtol > 0:
        raise InvalidValue(f"rtol must be a positive number, got {rtol}")
    check_choice("backend", backend, ("auto", *BACKENDS))
    for name in candidates:
        check_choice("candidates", name, BACKENDS)
    if quantize is not None:
        check_choice("quantize", quantize, QUANTIZE)
        if backend not in ("auto", "onnxruntime"):
            raise InvalidValue(f"quantize={quantize!r} runs on the onnxruntime backend (or auto), got "
                               f"backend={backend!r}")
    if example.dim() == 0 or example.shape[0] < 1:
        raise InvalidValue(f"example must be a batch (B, ...) with B >= 1, got shape {tuple(example.shape)}")
    device = inference_device(device)
    if quantize is not None and device.type != "cpu":
        raise InvalidValue(f"quantize={quantize!r} runs on onnxruntime's CPU session; got device={str(device)!r}")
    deployed = reparameterize(on_device(model, device)).eval()  # a copy: the caller's model is left as it was
    example = example.to(device)
    inputs = (example, torch.cat([example, example[:1]]))
    with no_tf32():
        with torch.inference_mode():
            checks = [(x, deployed(x)) for x in inputs]
        if quantize is not None:
            run, worst = _verified("onnxruntime", deployed, checks, example, float("inf"), quantize=True)
            return Deployed("onnxruntime", run, worst, quantize=quantize, device=device,
                            reason=f"{quantize} Linear weights run on onnxruntime only; they differ from float32 "
                                   f"by {worst:.2g} of the output's scale on the example")
        if backend != "auto":
            run, worst = _verified(backend, deployed, checks, example, rtol)
            return Deployed(backend, run, worst, reason="asked for by name", device=device)
        verified, skipped = {}, {}
        for name in candidates:
            try:
                verified[name] = _verified(name, deployed, checks, example, rtol)
            except DeployError as err:
                skipped[name] = str(err).split(": ", 1)[1]
    if not verified:
        raise DeployError("no backend computes what the eager model does: " + "; ".join(
            f"{name}: {why}" for name, why in skipped.items()))
    timings = time_alternately({name: (lambda run=run: run(example)) for name, (run, _) in verified.items()},
                               warmup=2, repeats=max(2, repeats))
    seconds = {name: t.median for name, t in timings.items()}
    best = min(seconds, key=seconds.__getitem__)
    eager = seconds.get("eager")
    versus = f", {eager / seconds[best]:.2f}x eager" if eager else ""
    reason = (f"fastest of {len(verified)} verified backend(s) on a batch of {example.shape[0]}: "
              f"{seconds[best] * 1e3:.2f} ms per call{versus}")
    return Deployed(best, verified[best][0], verified[best][1], reason, seconds, skipped, device=device)


def inference_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` ("auto": CUDA when available, else the CPU); ``ValueError`` for a device
    this machine does not have."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidValue(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from err
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise InvalidValue(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise InvalidValue(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {str(device)!r}")
    return device
