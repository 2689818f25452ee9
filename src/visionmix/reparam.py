"""Structural re-parameterisation for any ``nn.Module`` (SPEC section 3): train rich, deploy plain.

- :func:`reparameterize` converts every module that has ``reparameterize()``, ``switch_to_deploy()`` or ``fuse()``.
- :func:`check_equivalence` measures how far two models' eval-mode outputs are apart.
- :func:`convert_convs` turns the KxK convs of any model (1 < K < 7, the DBB-ResNet rule) into DO-Conv or DBB.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from visionmix.checks import check_choice
from visionmix.errors import InvalidType, InvalidValue
from visionmix.layers.basic import ConvBN
from visionmix.layers.diverse_branch import DiverseBranchBlock
from visionmix.layers.fusion import square_conv_geometry
from visionmix.layers.overparam import DOConv2d
from visionmix.module_state import eval_mode, no_tf32

__all__ = ["Equivalence", "Reparameterizable", "check_equivalence", "convert_convs", "randomize_batchnorm",
           "reparameterize"]


@runtime_checkable
class Reparameterizable(Protocol):
    """A train-time module that can build its inference form (exact in eval mode)."""

    def reparameterize(self) -> nn.Module: ...


# The conversion methods real models define, tried in this order: visionmix's and MobileOne/FastViT's
# ``reparameterize()``, the official DBB/RepVGG/ACNet ``switch_to_deploy()``, timm's ``fuse()``.
DEPLOY_METHODS = ("reparameterize", "switch_to_deploy", "fuse")


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every re-parameterisable module converted to its inference form, in eval mode.

    A module converts through the first of :data:`DEPLOY_METHODS` it has: a method that returns a module replaces
    it (visionmix's and timm's ``fuse()`` convention), one that returns ``None`` has converted it in place (the
    official DBB/RepVGG ``switch_to_deploy()``, timm's MobileOne ``reparameterize()``), so models visionmix did not
    build deploy too. The walk is top-down: a module that re-parameterises owns its children (a DBB folds its own
    conv+BN branches); the walk then goes on inside its inference form. A model that is already deployed comes back
    unchanged. Works on a deep copy unless ``inplace``; always use the returned model (the root itself may be
    replaced). Raises ``ValueError`` if a BN to be folded has no running statistics.
    """
    if not inplace:
        model = copy.deepcopy(model)
    with torch.no_grad():
        model = _deploy(model)
    return model.eval()


def _deploy(module: nn.Module) -> nn.Module:
    method = _deploy_method(module)
    if method is not None:
        deployed = method()
        if deployed is not None and not isinstance(deployed, nn.Module):
            raise InvalidType(f"{type(module).__name__}.{method.__name__}() returned a {type(deployed).__name__}; "
                              "expected the inference module or None (converted in place)")
        module = module if deployed is None else deployed
    for name, child in module.named_children():
        deployed = _deploy(child)
        if deployed is not child:
            setattr(module, name, deployed)
    return module


def _deploy_method(module: nn.Module) -> Callable[[], nn.Module | None] | None:
    """The module's first bound method among :data:`DEPLOY_METHODS` that takes no arguments (a child module named
    ``fuse`` is not one, nor is a VAE's ``reparameterize(mu, logvar)``)."""
    for name in DEPLOY_METHODS:
        method = getattr(module, name, None)
        if inspect.ismethod(method) and _takes_no_arguments(method):
            return method
    return None


def _takes_no_arguments(method: Callable[..., Any]) -> bool:
    try:
        inspect.signature(method).bind()
    except TypeError:
        return False
    return True


@dataclass(frozen=True)
class Equivalence:
    """Distance between two models' outputs: ``max_rel = max_abs / scale`` with ``scale = max |output of a|``."""

    max_abs: float
    max_rel: float
    scale: float
    rtol: float

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.rtol

    def __str__(self) -> str:
        verdict = "equivalent" if self.ok else "NOT equivalent"
        return (f"{verdict}: max abs diff {self.max_abs:.3g}, relative to the output scale {self.scale:.3g}: "
                f"{self.max_rel:.3g} (tolerance {self.rtol:g})")


_DEFAULT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def check_equivalence(model_a: nn.Module, model_b: nn.Module, example: torch.Tensor | tuple[Any, ...],
                      rtol: float | None = None) -> Equivalence:
    """Run both models in eval mode without gradients on ``example`` (a tensor or a tuple of arguments) and compare.

    Outputs may be tensors or (nested) tuples/lists/dicts of tensors. ``rtol`` bounds ``max_rel`` for ``.ok``;
    by default 1e-10 for float64 outputs, 1e-4 for float32 and 1e-2 for lower precision (SPEC section 3).
    Each module's train/eval flag is restored afterwards; both run without TF32 (:func:`no_tf32`).
    """
    args = example if isinstance(example, tuple) else (example,)
    with eval_mode(model_a), eval_mode(model_b), torch.no_grad(), no_tf32():
        outs_a, outs_b = _tensors(model_a(*args)), _tensors(model_b(*args))
    if not outs_a or len(outs_a) != len(outs_b) or any(a.shape != b.shape for a, b in zip(outs_a, outs_b, strict=True)):
        raise InvalidValue(f"the models' outputs differ in structure: {[tuple(a.shape) for a in outs_a]} vs "
                           f"{[tuple(b.shape) for b in outs_b]}")
    max_abs = max((a - b).abs().max().item() for a, b in zip(outs_a, outs_b, strict=True))
    scale = max(a.abs().max().item() for a in outs_a)
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    if rtol is None:
        rtol = _DEFAULT_RTOL.get(outs_a[0].dtype, 1e-2)
    return Equivalence(max_abs=max_abs, max_rel=max_rel, scale=scale, rtol=rtol)


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN random running statistics and affine parameters, in place; returns ``model``.

    Fresh BNs compute the identity (mean 0, var 1, gamma 1, beta 0) and would let a train-vs-deploy check pass with
    a wrong fold, so equivalence checks first randomise them, as the official DBB/RepVGG tests do: mean ~ N(0, 1),
    var ~ U(0.5, 2), gamma ~ U(0.5, 1.5), beta ~ N(0, 1).
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator, dtype=torch.float64)

    def uniform(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(t.shape, generator=generator, dtype=torch.float64)

    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            if bn.running_mean is not None:
                bn.running_mean.copy_(normal(bn.running_mean))
                bn.running_var.copy_(uniform(bn.running_var, 0.5, 2.0))
            if bn.affine:
                bn.weight.copy_(uniform(bn.weight, 0.5, 1.5))
                bn.bias.copy_(normal(bn.bias))
    return model


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for key in sorted(output) for t in _tensors(output[key])]
    if isinstance(output, Sequence) and not isinstance(output, str):
        return [t for item in output for t in _tensors(item)]
    raise InvalidType(f"cannot compare model outputs of type {type(output).__name__}; return tensors or "
                      "tuples/lists/dicts of tensors")


def _doconv_eligible(conv: nn.Conv2d) -> bool:
    return 1 < square_conv_geometry(conv)[0] < 7


def _dbb_eligible(conv: nn.Conv2d) -> bool:
    k, _, padding, dilation = square_conv_geometry(conv)
    depthwise_ok = conv.groups != conv.out_channels or conv.in_channels == conv.out_channels
    return 1 < k < 7 and k % 2 == 1 and dilation == 1 and padding <= k // 2 and depthwise_ok


# target -> (eligibility test, builder from a conv or ConvBN, keyword options the builder takes)
_TARGETS: dict[str, tuple[Callable[[nn.Conv2d], bool], Callable[..., nn.Module], frozenset[str]]] = {
    "doconv": (_doconv_eligible, DOConv2d.from_conv, frozenset({"D_mul"})),
    "dbb": (_dbb_eligible, DiverseBranchBlock.from_conv, frozenset({"internal_channels"})),
}


def convert_convs(model: nn.Module, to: str, inplace: bool = False, **kwargs: Any) -> nn.Module:
    """Replace the KxK convs of any model (1 < K < 7, the rule DBB-ResNet uses) by an over-parameterised form.

    Candidates are modules of type exactly ``nn.Conv2d`` (subclasses may have their own forward) with a square kernel,
    one stride/dilation/padding for both axes and zero padding; ``to="dbb"`` also needs an odd K, dilation 1 and
    padding <= K//2. A :class:`ConvBN` is one unit: ``"dbb"`` replaces it whole (it becomes ``dbb_origin``),
    ``"doconv"`` replaces its conv. Modules that already re-parameterise are left alone, and so is everything else.

    - ``to="doconv"`` (:class:`DOConv2d`, keyword ``D_mul``): outputs are identical at conversion in any mode
      (D starts at zero, the conv's kernel goes into W).
    - ``to="dbb"`` (:class:`DiverseBranchBlock`, keyword ``internal_channels``): eval-mode outputs are identical at
      conversion (see :meth:`DiverseBranchBlock.from_conv`); train-mode outputs differ because every branch ends in
      a BN using batch statistics. A bias-free conv that was not in a ConvBN deploys with a bias (the BN shifts).

    :func:`reparameterize` turns the converted (and trained) model back into plain convs. Works on a deep copy unless
    ``inplace``; use the returned model.
    """
    check_choice("to", to, _TARGETS)
    eligible, build, options = _TARGETS[to]
    unknown = set(kwargs) - options
    if unknown:
        raise InvalidType(f"convert_convs(to={to!r}) got unexpected options {sorted(unknown)}; "
                          f"it accepts {sorted(options)}")
    if not inplace:
        model = copy.deepcopy(model)

    def convert(module: nn.Module) -> nn.Module | None:
        conv = module.conv if isinstance(module, ConvBN) and to == "dbb" else module
        if type(conv) is not nn.Conv2d:
            return None
        try:
            if not eligible(conv):
                return None
        except ValueError:  # not square / asymmetric / non-zero padding mode: not a candidate
            return None
        return build(module, **kwargs).train(module.training)

    def walk(module: nn.Module) -> None:
        for name, child in module.named_children():
            new = convert(child)
            if new is not None:
                setattr(module, name, new)
            elif isinstance(child, ConvBN) or not isinstance(child, Reparameterizable):
                walk(child)

    with torch.no_grad():
        root = convert(model)
        if root is not None:
            return root
        walk(model)
    return model
