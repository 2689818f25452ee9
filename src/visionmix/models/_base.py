"""The classifier API every visionmix model shares (timm's shape): features, pooled head, classifier reset.

A family subclasses :class:`ClassifierModel`, builds its trunk, calls :meth:`ClassifierModel._init_head` once it
knows ``num_features`` and implements :meth:`forward_features`. Pooling follows ``feature_fmt``, the layout
``forward_features`` returns: ``"NCHW"`` (CNNs), ``"NHWC"`` or ``"NLC"`` (token models, (B, N, C)).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from visionmix.layers.validation import check_choice

GLOBAL_POOLS = ("avg", "max", "")  # "" = no pooling: the head acts on every position


def stochastic_depth_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Per-block drop-path rates rising linearly from 0 to ``drop_path_rate`` over ``depth`` blocks (1603.09382)."""
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    if depth == 1:
        return [0.0]
    return [drop_path_rate * i / (depth - 1) for i in range(depth)]


class ClassifierModel(nn.Module):
    """Base of every zoo model: ``forward = forward_head(forward_features(x))``.

    Attributes (timm names): ``num_classes``, ``num_features`` (channels entering the head), ``in_chans``,
    ``global_pool``, ``drop_rate``; the classifier lives in the attribute named by ``head_name`` ("head", or "fc"
    for torchvision-style ResNets) so official checkpoints keep their keys.
    """

    feature_fmt: ClassVar[str] = "NCHW"
    head_name: ClassVar[str] = "head"

    def _init_head(self, num_features: int, num_classes: int, in_chans: int, global_pool: str = "avg",
                   drop_rate: float = 0.0) -> None:
        """Create the dropout + linear classifier; ``num_classes=0`` gives an identity (pooled features out)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative int (0 = no classifier), got {num_classes!r}")
        check_choice("global_pool", global_pool, GLOBAL_POOLS)
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.num_features = num_features
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.head_drop = nn.Dropout(drop_rate)
        setattr(self, self.head_name, self._make_classifier(num_classes))

    def _make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features after the final norm, in layout ``feature_fmt``."""
        raise NotImplementedError

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Global pooling of ``forward_features`` output according to ``global_pool``."""
        if not self.global_pool:
            return x
        dims = {"NCHW": (2, 3), "NHWC": (1, 2), "NLC": (1,)}[self.feature_fmt]
        return x.mean(dims) if self.global_pool == "avg" else x.amax(dims)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, dropout and (unless ``pre_logits``) classify: (B, num_features) or (B, num_classes)."""
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.head_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a freshly initialised one (``num_classes=0``: identity)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative int (0 = no classifier), got {num_classes!r}")
        if global_pool is not None:
            check_choice("global_pool", global_pool, GLOBAL_POOLS)
            self.global_pool = global_pool
        self.num_classes = num_classes
        head = self._make_classifier(num_classes)
        like = next(self.parameters(), None)
        if like is not None:
            head = head.to(device=like.device, dtype=like.dtype)
        setattr(self, self.head_name, head)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters an optimizer should not decay beyond the ndim <= 1 ones (none by default)."""
        return set()
