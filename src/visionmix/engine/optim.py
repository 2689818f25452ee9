"""Optimisation: AdamW parameter groups (weight decay, layer-wise LR decay, a frozen backbone), the warmup + cosine
schedule (1608.03983) and the EMA of the weights."""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import torch
from torch import nn

from visionmix.errors import InvalidValue


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR factor of optimizer step ``step``: ``(step + 1) / warmup_steps`` during warmup, then a half cosine from
    1 to ``min_ratio`` over the remaining steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Each parameter's layer for layer-wise LR decay (BEiT 2106.08254 sec. 2.6, as timm's
    ``param_groups_layer_decay``): 0 for the stem, then one per group of ``model.group_matcher()`` in order (the
    final norm last), and the classifier (what no pattern matches) one after the last."""
    if not hasattr(model, "group_matcher"):
        raise InvalidValue(f"layer_decay needs a model with group_matcher(); {type(model).__name__} has none")
    matcher = model.group_matcher(coarse=False)
    order = sorted({index for _, (index,) in matcher["blocks"]})
    rank = {index: position + 1 for position, index in enumerate(order)}
    patterns = [(re.compile(matcher["stem"]), 0)] + [(re.compile(p), rank[i]) for p, (i,) in matcher["blocks"]]
    head = len(order) + 1
    return {name: next((layer for pattern, layer in patterns if pattern.match(name)), head)
            for name, _ in model.named_parameters()}


def param_groups(model: nn.Module, weight_decay: float, *, layer_decay: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: decay on weights of rank >= 2, none on 1-d tensors (biases, norm
    affine, layer scales) and on the names ``model.no_weight_decay()`` returns (a name or a module prefix). With
    ``layer_decay`` d, the parameters of layer ``i`` of ``L`` (:func:`layer_ids`) also get ``lr_scale = d^(L-i)``,
    which the schedule multiplies into their LR (the classifier trains at the full LR)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    layers = layer_ids(model) if layer_decay is not None else {}
    last = max(layers.values(), default=0)
    groups: dict[tuple[bool, int], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim <= 1 or name in skip or any(name.startswith(f"{s}.") for s in skip)
        layer = layers.get(name, last)
        group = groups.setdefault((exempt, layer), {
            "params": [], "weight_decay": 0.0 if exempt else weight_decay,
            "lr_scale": 1.0 if layer_decay is None else layer_decay ** (last - layer)})
        group["params"].append(param)
    if layer_decay is None:  # the two groups every run has, in a fixed order (saved optimizer states rely on it)
        for exempt in (False, True):
            groups.setdefault((exempt, 0), {"params": [], "weight_decay": 0.0 if exempt else weight_decay,
                                            "lr_scale": 1.0})
    return [groups[key] for key in sorted(groups)]


def freeze_backbone(model: nn.Module) -> int:
    """Train only the classifier (``model.get_classifier()``): every other parameter stops requiring gradients
    (a linear probe); returns the number of frozen parameters. BatchNorm statistics are frozen by
    :func:`frozen_norms_eval` in the loop."""
    if not hasattr(model, "get_classifier"):
        raise InvalidValue(f"freeze='backbone' needs a model with get_classifier(); {type(model).__name__} has none")
    head = {id(p) for p in model.get_classifier().parameters()}
    if not head:
        raise InvalidValue(f"{type(model).__name__} has no classifier parameters to train (num_classes=0?)")
    frozen = 0
    for param in model.parameters():
        if id(param) not in head:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def frozen_norms_eval(model: nn.Module) -> None:
    """Put every norm layer whose parameters are all frozen into eval mode (a linear probe keeps the backbone's
    running statistics)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


class ModelEma:
    """Exponential moving average of a model's state (params and float buffers): ``ema += (1 - d) (model - ema)``
    with ``d = min(decay, (1 + t) / (10 + t))`` at update ``t``, so early averages are not dominated by the
    random initialisation."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self._pairs: tuple[Any, ...] | None = None  # (model, its tensor lists), see _tensors

    def _tensors(self, model: nn.Module) -> tuple[list[torch.Tensor], ...]:
        """(EMA floats, model floats, EMA others, model others): the state's tensors themselves, listed once per
        model (the lists stay valid: parameters and buffers are updated in place)."""
        if self._pairs is None or self._pairs[0] is not model:
            ema, live = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
            floats = [k for k, v in ema.items() if v.is_floating_point()]
            others = [k for k, v in ema.items() if not v.is_floating_point()]
            self._pairs = (model, [ema[k] for k in floats], [live[k].detach() for k in floats],
                           [ema[k] for k in others], [live[k] for k in others])
        return self._pairs[1:]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        ema_floats, floats, ema_others, others = self._tensors(model)
        torch._foreach_lerp_(ema_floats, floats, 1.0 - d)  # one kernel per group of tensors, not per tensor
        if ema_others:
            torch._foreach_copy_(ema_others, others)
