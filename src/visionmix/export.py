"""Export a model to ONNX or a ``torch.export`` program and prove the exported file computes what PyTorch computes.

Each export is written to a temporary file next to the target, reloaded in its runtime (onnxruntime, or
``torch.export.load``), run on the example batch and on a batch one larger (so a batch size baked into the graph is
caught), and compared with the eager model in eval mode. Only a file that agrees within ``atol`` (max absolute
difference) is renamed into place; otherwise :class:`ExportError` is raised and nothing is left behind. Works on any
``nn.Module``; call ``visionmix.reparameterize`` first to export the deployed form.

ONNX uses the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, which needs ``onnxscript``) with the
weights inside the one file; it handles every visionmix family, so there is no fallback to the legacy TorchScript
-based exporter. The program (``.pt2``, :func:`export_program`) is ``torch.export``'s ATen graph with its weights,
which ``torch.export.load(path).module()`` runs without visionmix installed; it replaces TorchScript
(``torch.jit.trace``/``torch.jit.save``), deprecated as of torch 2.13.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visionmix.checks import check_positive
from visionmix.errors import ExportError, InvalidValue
from visionmix.files import staged
from visionmix.module_state import eval_mode, on_device
from visionmix.reparam import Equivalence, check_equivalence, reparameterize
from visionmix.transfers import to_device


@torch.no_grad()
def randomize_weights(model: nn.Module, example: torch.Tensor, *, std: float = 0.1, seed: int = 0) -> nn.Module:
    """Stand-in for trained weights, in place: add N(0, std^2) noise to every parameter, then set every BN's running
    statistics to the batch statistics of forward passes on ``example`` (B > 1). Returns ``model`` in eval mode.

    A freshly built model can have a zero-initialised head or 1e-4 layer scales (Mixer, SPACH) that make its output
    (nearly) constant, and a parity check on constant outputs proves nothing. Calibrated (rather than random) BN
    statistics keep the activations of deep nets at a realistic scale, and they are not the identity, so a wrong
    BN fold still shows.
    """
    generator = torch.Generator().manual_seed(seed)  # drawn on the host: the same noise on every device
    for p in model.parameters():
        p.add_(to_device(std * torch.randn(p.shape, generator=generator, dtype=p.dtype), p.device))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration passes
    model.train()
    for _ in range(3):
        model(example)
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum
    return model.eval()


def _reason(err: BaseException) -> str:
    """``Type: first line`` of ``err`` and of the innermost exception it was raised from (ANSI colours removed)."""
    def line(e: BaseException) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        return f"{type(e).__name__}: " + next((s.strip() for s in text.splitlines() if s.strip()), "")

    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    return line(err) if root is err else f"{line(err)} (caused by {line(root)})"


def _check_parity(model: nn.Module, run: Callable[[torch.Tensor], np.ndarray], example: torch.Tensor,
                  atol: float, what: str, other_batch: bool = True) -> float:
    """Max |exported - PyTorch| over the example batch (and a batch one larger); ExportError above ``atol``."""
    worst = 0.0
    for x in (example, torch.cat([example, example[:1]])) if other_batch else (example,):
        with torch.inference_mode():
            expected = model(x).numpy()
        try:
            got = run(x)
        except Exception as err:  # a runtime's own error type; what matters is that the file does not work
            raise ExportError(f"{what} failed on an input of shape {tuple(x.shape)}: {_reason(err)}") from err
        if got.shape != expected.shape:
            raise ExportError(f"{what} returned shape {got.shape} for input {tuple(x.shape)}, "
                              f"PyTorch returns {expected.shape} (batch size baked into the graph?)")
        worst = max(worst, float(np.abs(got - expected).max()))
    if not worst < atol:
        raise ExportError(f"{what} differs from PyTorch by {worst:.3g} (max abs), more than atol={atol:g}")
    return worst


@contextmanager
def _exportable(model: nn.Module, example: torch.Tensor) -> Iterator[nn.Module]:
    """``model`` on the CPU in eval mode for the block (a copy if it lives elsewhere; the caller's model keeps its
    device and its modules' train/eval flags)."""
    if example.dim() == 0 or example.shape[0] < 1:
        raise InvalidValue(f"example must be a batch (B, ...) with B >= 1, got shape {tuple(example.shape)}")
    with eval_mode(on_device(model, "cpu")) as exportable:
        yield exportable


@contextmanager
def _quiet_onnx_registry() -> Iterator[None]:
    """The ONNX exporter logs a warning for each torchvision op it cannot find; visionmix needs none of them."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def deployed_for_export(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, Equivalence]:
    """``visionmix.reparameterize(model)`` and its equivalence with ``model`` on ``example``; :class:`ExportError` if
    the two differ beyond :func:`visionmix.check_equivalence`'s tolerance (nothing is exported then)."""
    deployed = reparameterize(model)
    equivalence = check_equivalence(model, deployed, example)
    if not equivalence.ok:
        raise ExportError(f"the re-parameterised model is not equivalent to the trained one: {equivalence}")
    return deployed, equivalence


def write_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, opset: int = 18,
               dynamic_batch: bool = True) -> None:
    """The dynamo ONNX export of ``model`` (eval mode, CPU) traced on ``example`` into ``path``, weights inside the
    one file, input ``"input"``, output ``"logits"``; :class:`ExportError` with the exporter's reason."""
    if check_positive("opset", opset) < 17:
        raise InvalidValue(f"opset must be at least 17 (LayerNormalization), got {opset}")
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    try:
        with _quiet_onnx_registry(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the exporter's own deprecation notes, not the user's
            torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=opset, external_data=False,
                              input_names=["input"], output_names=["logits"], dynamic_shapes=dynamic_shapes,
                              verbose=False)
    except Exception as err:  # the exporter raises many types; the user needs the reason, not the type
        hint = "; if the graph depends on the batch size, export a static batch" if dynamic_batch else ""
        raise ExportError(f"ONNX export failed: {_reason(err)}{hint}") from err


def onnx_runner(path: str | Path, threads: int | None = None,
                device: str | torch.device = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """An onnxruntime (CPU) session of the ONNX file at ``path`` as a tensor -> tensor callable; ``threads`` intra-op
    threads (default: torch's, so both runtimes use the same cores), which sleep when idle (as torch's do under
    ``OMP_WAIT_POLICY=PASSIVE``). On a CUDA ``device`` the session runs on onnxruntime's CUDA provider; inputs are
    copied to the host for onnxruntime and the output comes back on the input's device."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    # idle worker threads sleep instead of spinning: a spinning pool steals the cores from whatever runs next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), options, providers=providers)

    def run(x: torch.Tensor) -> torch.Tensor:
        out = torch.from_numpy(session.run(None, {"input": x.detach().cpu().numpy()})[0])
        return out if x.device.type == "cpu" else out.to(x.device)

    return run


def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor, *, opset: int = 18, atol: float = 1e-4,
                dynamic_batch: bool = True, force: bool = False) -> float:
    """Export ``model`` with the dynamo ONNX exporter (weights inside the one file), check it in onnxruntime and
    return the max absolute difference from PyTorch.

    The batch dimension is dynamic unless ``dynamic_batch=False``: layers whose graph depends on the batch size
    (CondConv/WeightNet run one grouped conv with ``groups = batch``, and ONNX's ``group`` is a constant) only
    export for the example's batch size, and are then checked on that size alone.
    """
    with _exportable(model, example) as model, staged(path, force) as tmp:
        write_onnx(model, example, tmp, opset=opset, dynamic_batch=dynamic_batch)
        run = onnx_runner(tmp)
        return _check_parity(model, lambda x: run(x).numpy(), example, atol, "the ONNX model (onnxruntime)",
                             other_batch=dynamic_batch)


def trace_program(model: nn.Module, example: torch.Tensor, *,
                  dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` on ``example``, its batch dimension dynamic unless ``dynamic_batch=False``
    (export specialises a batch of one to the constant 1, so a dynamic batch is traced on two or more images);
    :class:`ExportError` with the exporter's reason."""
    if dynamic_batch and example.shape[0] == 1:
        example = torch.cat([example, example])
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own notes; the result is checked against eager instead
            return torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
    except Exception as err:  # the exporter raises many types; the user needs the reason, not the type
        hint = "; if the graph depends on the batch size, export a static batch" if dynamic_batch else ""
        raise ExportError(f"torch.export failed: {_reason(err)}{hint}") from err


def export_program(model: nn.Module, path: str | Path, example: torch.Tensor, *, atol: float = 1e-4,
                   dynamic_batch: bool = True, force: bool = False) -> float:
    """Save the ``torch.export`` program of ``model`` (``.pt2``: the ATen graph and its weights, loadable with
    ``torch.export.load(path).module()`` without visionmix), reload it and return the max absolute difference from
    PyTorch. ``dynamic_batch=False`` fixes and checks the example's batch size only (see :func:`export_onnx`)."""
    with _exportable(model, example) as model, staged(path, force) as tmp:
        torch.export.save(trace_program(model, example, dynamic_batch=dynamic_batch), str(tmp))
        loaded = torch.export.load(str(tmp)).module()

        def run(x: torch.Tensor) -> np.ndarray:
            with torch.inference_mode():
                return loaded(x).numpy()

        return _check_parity(model, run, example, atol, "the torch.export program", other_batch=dynamic_batch)
