"""The model API every visionmix model shares (timm 1.0's shape): classifier, feature extraction, training hooks.

A family subclasses :class:`ClassifierModel`, builds its trunk, then calls :meth:`ClassifierModel._init_head` once it
knows ``num_features`` and :meth:`ClassifierModel._init_features` with the names of its stem, of the blocks of each
feature level and of its final norm, and implements :meth:`ClassifierModel._forward_stem`. Everything else derives
from those names: ``forward_features``, ``forward_intermediates``, ``prune_intermediate_layers``, ``feature_info``,
gradient checkpointing, ``group_matcher`` and ``no_weight_decay``. Pooling follows ``feature_fmt``, the layout of
``forward_features`` and of every level: ``"NCHW"`` (CNNs), ``"NHWC"`` or ``"NLC"`` (token models, (B, N, C)).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionmix.checks import check_choice
from visionmix.errors import InvalidValue
from visionmix.layers.mixing import ConvPosEnc

GLOBAL_POOLS = ("avg", "max", "")  # "" = no pooling: the head acts on every position
OUTPUT_FMTS = ("NCHW", "NHWC")
MIN_FEATURE_LEVELS = 3  # timm's default: a features_only model has at least 3 levels
LAST_GROUP = 99999  # group_matcher's index for the final norm (timm's convention: after every block)
_SKIP_DECAY = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, ConvPosEnc)  # + gamma* params


def stochastic_depth_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Per-block drop-path rates rising linearly from 0 to ``drop_path_rate`` over ``depth`` blocks (1603.09382)."""
    if not 0.0 <= drop_path_rate < 1.0:
        raise InvalidValue(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    if depth == 1:
        return [0.0]
    return [drop_path_rate * i / (depth - 1) for i in range(depth)]


class FeatureInfo(list):
    """``feature_info``: one dict (``num_chs``, ``reduction``, ``module``) per feature level, with timm's getters."""

    def channels(self, idx: int | None = None) -> int | list[int]:
        return self._get("num_chs", idx)

    def reduction(self, idx: int | None = None) -> int | list[int]:
        return self._get("reduction", idx)

    def module_name(self, idx: int | None = None) -> str | list[str]:
        return self._get("module", idx)

    def _get(self, key: str, idx: int | None) -> Any:
        return [info[key] for info in self] if idx is None else self[idx][key]


def take_indices(num_levels: int, indices: int | Sequence[int] | None) -> list[int]:
    """Resolve ``forward_intermediates``' ``indices`` (timm's rule): None = all, int n = the last n, a list of
    indices where negative ones count from the end, each level at most once. Returns sorted non-negative indices."""
    if indices is None:
        return list(range(num_levels))
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= num_levels:
            raise InvalidValue(f"indices={indices} (the last n levels) must be in [1, {num_levels}]")
        return list(range(num_levels - indices, num_levels))
    resolved = []
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not -num_levels <= index < num_levels:
            raise InvalidValue(f"indices must be ints in [-{num_levels}, {num_levels - 1}] (this model has "
                               f"{num_levels} feature levels), got {list(indices)}")
        resolved.append(index % num_levels)
    if not resolved:
        raise InvalidValue("indices must name at least one feature level, got an empty sequence")
    if len(set(resolved)) != len(resolved):
        raise InvalidValue(f"indices must name each feature level once, got {list(indices)} (levels "
                           f"{resolved} once counted from the start)")
    return sorted(resolved)


Level = tuple[Sequence[str], int, int, str]  # (module names run in order, num_chs, reduction, module name)
Stage = tuple[Sequence[str], Sequence[str], int, int, str]  # (lead-in names, block names, num_chs, reduction, name)


def is_block(name: str) -> bool:
    """A block is an element of a stage container (its name ends in an index); only blocks are checkpointed."""
    return name.rsplit(".", 1)[-1].isdigit()


def grad_checkpoint(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``torch.utils.checkpoint`` (non-reentrant) whose recomputation replays the forward exactly: a training block's
    buffers (BN running statistics, which DBB's padding also reads) are seen as the forward saw them and are not
    updated a second time."""
    if not block.training:
        return checkpoint(block, x, use_reentrant=False)
    return checkpoint(block, x, use_reentrant=False, context_fn=lambda: _replay_buffers(list(block.buffers())))


def _replay_buffers(buffers: list[torch.Tensor]) -> tuple[AbstractContextManager, AbstractContextManager]:
    before: list[torch.Tensor] = []

    @contextmanager
    def forward() -> Iterator[None]:
        before.extend(b.clone() for b in buffers)
        yield

    @contextmanager
    def recompute() -> Iterator[None]:
        after = [b.clone() for b in buffers]
        with torch.no_grad():
            for b, saved in zip(buffers, before, strict=True):
                b.copy_(saved)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in zip(buffers, after, strict=True):
                    b.copy_(saved)

    return forward(), recompute()


def _within(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def prefix_regex(names: Sequence[str]) -> str:
    return r"^(?:" + "|".join(re.escape(n) for n in names) + r")\."


class ClassifierModel(nn.Module):
    """Base of every zoo model: ``forward = forward_head(forward_features(x))``.

    Attributes (timm names): ``num_classes``, ``num_features`` (channels entering the head), ``head_hidden_size``
    (width of ``forward_head(x, pre_logits=True)``), ``in_chans``, ``global_pool``, ``drop_rate``, ``feature_info``,
    ``grad_checkpointing``, ``output_fmt`` (alias of ``feature_fmt``); the classifier lives in the attribute
    named by ``head_name`` ("head", or "linear" for ResNets) so official checkpoints keep their keys.
    """

    feature_fmt: ClassVar[str] = "NCHW"
    head_name: ClassVar[str] = "head"
    grad_checkpointing: bool = False

    # ------------------------------------------------------------------------------------------------ classifier
    def _init_head(self, num_features: int, num_classes: int, in_chans: int, global_pool: str = "avg",
                   drop_rate: float = 0.0) -> None:
        """Create the dropout + linear classifier; ``num_classes=0`` gives an identity (pooled features out)."""
        self._check_head(num_classes, global_pool)
        if not 0.0 <= drop_rate < 1.0:
            raise InvalidValue(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.num_features = self.head_hidden_size = num_features  # the head pools and classifies: no hidden layer
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.head_drop = nn.Dropout(drop_rate)
        setattr(self, self.head_name, self._make_classifier(num_classes))

    @property
    def output_fmt(self) -> str:
        """timm's name for the layout of ``forward_features`` (``feature_fmt``)."""
        return self.feature_fmt

    def _check_head(self, num_classes: int, global_pool: str) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise InvalidValue(f"num_classes must be a non-negative int (0 = no classifier), got {num_classes!r}")
        check_choice("global_pool", global_pool, GLOBAL_POOLS)
        if not global_pool and num_classes and self.feature_fmt == "NCHW":
            raise InvalidValue(f"global_pool='' (no pooling) needs num_classes=0 on {type(self).__name__}: its "
                               f"features are NCHW and a linear head would act on the W axis; got "
                               f"num_classes={num_classes}")

    def _make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

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
        """Replace the classifier by a freshly initialised one (``num_classes=0``: identity); ``pretrained_cfg``
        follows the new ``num_classes``."""
        self._check_head(num_classes, self.global_pool if global_pool is None else global_pool)
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        head = self._make_classifier(num_classes)
        like = next(self.parameters(), None)
        if like is not None:
            head = head.to(device=like.device, dtype=like.dtype)
        setattr(self, self.head_name, head)
        if isinstance(getattr(self, "pretrained_cfg", None), dict):
            self.pretrained_cfg["num_classes"] = num_classes

    def no_weight_decay(self) -> set[str]:
        """Parameters an optimizer should not decay: every norm's, every layer scale (``gamma*``) and every
        convolutional position encoding (UniFormer's DPE, SPACH's CPE); 1-d ones are listed too."""
        skip_modules = [name for name, m in self.named_modules() if isinstance(m, _SKIP_DECAY)]
        return {name for name, _ in self.named_parameters()
                if _within(name.rsplit(".", 1)[0], skip_modules) or name.rsplit(".", 1)[-1].startswith("gamma")}

    # ------------------------------------------------------------------------------------------ feature levels
    def _init_features(self, stem: Sequence[str], levels: Sequence[Level], norm: str | None,
                       stage_ends: Sequence[int] | None = None) -> None:
        """Declare the trunk: ``stem`` module names (run by :meth:`_forward_stem`), then per feature level
        ``(block names run in order, num_chs, reduction, module name)``, and the final norm's name (or None).
        ``stage_ends`` are the levels that end a stage (default: every level of a pyramid, the last of a model whose
        levels share one reduction); :meth:`default_out_indices` starts from them.

        Levels whose output shares the last level's channels and reduction are the ones ``norm=True`` normalises
        (every block of a single-stage model, the last stage of a pyramid).
        """
        self._stem_names = list(stem)
        self._level_blocks = [list(blocks) for blocks, *_ in levels]
        self.feature_info = FeatureInfo(dict(num_chs=c, reduction=r, module=m) for _, c, r, m in levels)
        self._norm_name = norm
        last = (self.feature_info[-1]["num_chs"], self.feature_info[-1]["reduction"])
        self._normed_levels = {i for i, f in enumerate(self.feature_info) if (f["num_chs"], f["reduction"]) == last}
        if stage_ends is None:
            single_stage = len(set(self.feature_info.reduction())) == 1
            stage_ends = [len(levels) - 1] if single_stage else range(len(levels))
        self._stage_ends = sorted(stage_ends)

    def _init_stages(self, stem: Sequence[str], stages: Sequence[Stage], norm: str | None) -> None:
        """:meth:`_init_features` from stages ``(lead-in names, block names, num_chs, reduction, stage name)`` (the
        lead-in downsamples; it may be empty): one level per stage, or, with fewer than :data:`MIN_FEATURE_LEVELS`
        stages, one per block as timm does for single-stage models (a stage's lead-in joins its first block)."""
        if len(stages) >= MIN_FEATURE_LEVELS:
            self._init_features(stem, [([*lead, *blocks], chs, r, name) for lead, blocks, chs, r, name in stages],
                                norm)
            return
        levels = [([*(lead if j == 0 else ()), block], chs, r, block)
                  for lead, blocks, chs, r, _ in stages for j, block in enumerate(blocks)]
        ends = list(itertools.accumulate(len(blocks) for _, blocks, *_ in stages))
        self._init_features(stem, levels, norm, stage_ends=[end - 1 for end in ends])

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Check the input and run the stem (whatever precedes the first feature level's blocks)."""
        raise NotImplementedError

    def _forward_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._norm_name is None else self.get_submodule(self._norm_name)(x)

    def _forward_level(self, index: int, x: torch.Tensor) -> torch.Tensor:
        use_checkpoint = self.grad_checkpointing and torch.is_grad_enabled()
        for name in self._level_blocks[index]:
            block = self.get_submodule(name)
            x = grad_checkpoint(block, x) if use_checkpoint and is_block(name) else block(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features after the final norm, in layout ``feature_fmt``."""
        x = self._forward_stem(x)
        for index in range(len(self._level_blocks)):
            x = self._forward_level(index, x)
        return self._forward_norm(x)

    def _to_map(self, x: torch.Tensor, reduction: int, size: tuple[int, int], output_fmt: str) -> torch.Tensor:
        """A level's output as an (B, C, H, W) map (token grids reshaped), or (B, H, W, C) for ``"NHWC"``."""
        if self.feature_fmt == "NLC":
            x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], size[0] // reduction, size[1] // reduction)
        elif self.feature_fmt == "NHWC":
            x = x.permute(0, 3, 1, 2)
        return x.permute(0, 2, 3, 1) if output_fmt == "NHWC" else x

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The outputs of the feature levels ``indices`` (see :func:`take_indices`) as maps in ``output_fmt``.

        ``norm`` applies the final norm to the levels it fits (see :meth:`_init_features`). Returns the list, or with
        ``intermediates_only=False`` ``(forward_features(x), list)``. ``stop_early`` skips the levels after the last
        one taken when only intermediates are returned (the final features need them all).
        """
        check_choice("output_fmt", output_fmt, OUTPUT_FMTS)
        take = take_indices(len(self._level_blocks), indices)
        size = (x.shape[-2], x.shape[-1])
        last = take[-1] if stop_early and intermediates_only else len(self._level_blocks) - 1
        x = self._forward_stem(x)
        intermediates = []
        for index in range(last + 1):
            x = self._forward_level(index, x)
            if index in take:
                y = self._forward_norm(x) if norm and index in self._normed_levels else x
                intermediates.append(self._to_map(y, self.feature_info[index]["reduction"], size, output_fmt))
        if intermediates_only:
            return intermediates
        return self._forward_norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] | None = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Delete the levels after the last of ``indices`` (and with ``prune_norm`` the final norm, with
        ``prune_head`` the classifier); returns the resolved indices. ``feature_info`` keeps the levels left."""
        take = take_indices(len(self._level_blocks), indices)
        for names in reversed(self._level_blocks[take[-1] + 1:]):
            for name in reversed(names):
                self._delete_module(name)
        del self._level_blocks[take[-1] + 1:]
        del self.feature_info[take[-1] + 1:]
        if prune_norm and self._norm_name is not None:
            parent, _, leaf = self._norm_name.rpartition(".")
            setattr(self.get_submodule(parent), leaf, nn.Identity())
        if prune_head:
            self.reset_classifier(0)
        return take

    def _delete_module(self, name: str) -> None:
        """Remove a submodule, then every container left empty above it."""
        while name:
            parent_name, _, leaf = name.rpartition(".")
            parent = self.get_submodule(parent_name)
            delattr(parent, leaf)
            if parent is self or len(parent._modules) or not isinstance(parent, nn.Sequential | nn.ModuleList):
                return
            name = parent_name

    # ------------------------------------------------------------------------------------------ training hooks
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in backward (``torch.utils.checkpoint``, non-reentrant) to save activation memory."""
        self.grad_checkpointing = bool(enable)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups for layer-wise LR decay: ``{"stem": regex, "blocks": [(regex, (index,)), ...]}``.

        Fine: one group per block (a stage's downsampling joins its first block); coarse: one per feature level.
        The final norm comes last (index 99999); parameters no regex matches (the classifier) follow it.
        """
        blocks: list[tuple[str, tuple[int]]] = []
        block_index = 0
        for level, names in enumerate(self._level_blocks):
            for name in names:
                if _within(name, self._stem_names):
                    continue
                if any(True for _ in self.get_submodule(name).parameters()):
                    blocks.append((prefix_regex([name]), (level if coarse else block_index,)))
                block_index += is_block(name)
        if self._norm_name is not None:
            blocks.append((prefix_regex([self._norm_name]), (LAST_GROUP,)))
        return {"stem": prefix_regex(self._stem_names), "blocks": blocks}

    def default_out_indices(self) -> tuple[int, ...]:
        """``features_only``'s default: every stage end, topped up to :data:`MIN_FEATURE_LEVELS` with the latest
        other levels (timm's rule: a pyramid's stages, a single-stage model's last 3 blocks)."""
        n = len(self.feature_info)
        ends = [i for i in self._stage_ends if i < n]
        others = [i for i in range(n) if i not in ends]
        missing = max(0, MIN_FEATURE_LEVELS - len(ends))
        return tuple(sorted(ends + others[max(0, len(others) - missing):]))


class FeatureListNet(nn.Module):
    """``create_model(..., features_only=True)``: the model pruned after its last wanted level; ``forward`` returns
    the list of ``out_indices`` maps (NCHW unless ``output_fmt="NHWC"``) and ``feature_info`` lists exactly those."""

    def __init__(self, model: ClassifierModel, out_indices: Sequence[int] | int | None = None, *,
                 output_fmt: str = "NCHW", norm: bool = False) -> None:
        super().__init__()
        check_choice("output_fmt", output_fmt, OUTPUT_FMTS)
        if out_indices is None:
            out_indices = model.default_out_indices()
        self.out_indices = model.prune_intermediate_layers(out_indices, prune_norm=not norm, prune_head=True)
        self.feature_info = FeatureInfo(dict(model.feature_info[i]) for i in self.out_indices)
        self.model = model
        self.output_fmt = output_fmt
        self.norm = norm

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, self.out_indices, norm=self.norm, output_fmt=self.output_fmt,
                                                intermediates_only=True)
