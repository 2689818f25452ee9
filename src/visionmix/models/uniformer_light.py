"""Lightweight UniFormer (Li et al., 2201.09450, TPAMI version: the "hourglass" UniFormer-XXS/XS).

Stages 1-2 are local-MHRA blocks, stages 3-4 :class:`EvoSABlock` s: a class token joins in stage 3 and every block
after the first attends over the class token, the ``prune_ratio`` share of tokens with the highest running class
attention and one token merging the rest (Evo-ViT, 2108.01390). The merged token's update is added to every token
it merged; the running score is carried from block to block with ``trade_off``, avg-pooled with the stage-4 patch
embedding. A second classifier ``head_cls`` reads the class token during training (``forward(x, both_heads=True)``,
losses combined by :func:`two_head_loss`). Layout NCHW between blocks; the state-dict layout is the official one
(Sense-X/UniFormer ``image_classification/models/uniformer_light.py``), so its checkpoints load with
``strict=True``. No module-global state: the class token and the scores travel with the feature map
(:class:`LightTokens`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from visionmix.checks import check_input, check_positive
from visionmix.errors import InvalidValue
from visionmix.layers.basic import DropPath, Mlp
from visionmix.layers.mixing import Attention, ConvPosEnc, LocalMHRA
from visionmix.models._base import (
    LAST_GROUP,
    ClassifierModel,
    grad_checkpoint,
    is_block,
    prefix_regex,
    stochastic_depth_rates,
)
from visionmix.models._registry import Reference, register_variant
from visionmix.models.uniformer import ConvStem, PatchStem, init_weights

__all__ = ["EvoSABlock", "LightTokens", "UniFormerLight", "two_head_loss"]


class LightTokens(NamedTuple):
    """What flows between the blocks of stages 3-4: the patch map (B, C, H, W), the class token (B, 1, C) and the
    running class-attention score of every patch (B, H*W; None before the first block has computed it)."""

    map: torch.Tensor
    cls: torch.Tensor
    score: torch.Tensor | None


class ScoredAttention(Attention):
    """MHSA (:class:`~visionmix.layers.Attention`) that also returns the class token's attention to every other
    token, averaged over heads: ``mean_h softmax(q_0 k^T / sqrt(d))[1:]``, (B, N-1). Input (B, N, C), token 0 the
    class token."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        cls_row = (q[:, :, :1] @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(-1)  # (B, heads, 1, N)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c))), cls_row[:, :, 0, 1:].mean(1)


class EvoSABlock(nn.Module):
    """UniFormer-light's global block with token pruning (TPAMI UniFormer sec. 3.4 after Evo-ViT 2108.01390).

    In: :class:`LightTokens`; out: the same with every patch, the class token and the scores updated.
    ``prune_ratio == 1``: an SABlock over [cls, patches]; the scores become ``a`` (the class row, first block) or
    ``(1 - trade_off) s + trade_off a``. ``prune_ratio < 1``: the K = floor(N * prune_ratio) patches of highest score
    are kept, the others merged into ``r = sum_i s_i x_i / sum_i s_i``; attention and MLP run on [cls, kept, r]; the
    kept patches take their outputs, every merged patch receives r's two residual updates (not drop-pathed, as
    officially); the kept patches' scores blend in their new class attention (all N scores when one patch was
    merged, since r then is that patch). ``pool`` > 1 (last block of stage 3): the scores are avg-pooled ``pool x
    pool`` and rescaled to keep their sum, to follow the next patch embedding.
    """

    def __init__(self, dim: int, head_dim: int, mlp_ratio: float = 3.0, *, prune_ratio: float = 1.0,
                 trade_off: float = 0.5, pool: int = 1, qkv_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        check_positive("dim", dim)
        if not 0.0 < prune_ratio <= 1.0:
            raise InvalidValue(f"prune_ratio must be in (0, 1], got {prune_ratio}")
        if not 0.0 <= trade_off <= 1.0:
            raise InvalidValue(f"trade_off must be in [0, 1], got {trade_off}")
        self.prune_ratio = float(prune_ratio)
        self.trade_off = float(trade_off)
        self.pool = check_positive("pool", pool)
        self.pos_embed = ConvPosEnc(dim, 3)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ScoredAttention(dim, head_dim=head_dim, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                    proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def _blend(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return (1 - self.trade_off) * old + self.trade_off * new

    def forward(self, state: LightTokens) -> LightTokens:
        x = state.map + self.pos_embed(state.map)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, C)
        n = t.shape[1]
        if self.prune_ratio == 1.0:
            u = torch.cat([state.cls, t], dim=1)
            a, cls_attn = self.attn(self.norm1(u))
            u = u + self.drop_path(a)
            u = u + self.drop_path(self.mlp(self.norm2(u)))
            score = cls_attn if state.score is None else self._blend(state.score, cls_attn)
            cls, t = u[:, :1], u[:, 1:]
        else:
            if state.score is None:
                raise InvalidValue("an EvoSABlock that prunes needs the scores of an earlier block: the first block "
                                   "of stage 3 must have prune_ratio 1")
            score = state.score
            keep = score.topk(int(n * self.prune_ratio), dim=1).indices  # (B, K), highest score first
            dropped = torch.ones_like(score, dtype=torch.bool).scatter(1, keep, False)
            weight = score * dropped
            rep = torch.einsum("bn,bnc->bc", weight / weight.sum(1, keepdim=True), t).unsqueeze(1)
            index = keep.unsqueeze(-1).expand(-1, -1, c)
            u = torch.cat([state.cls, t.gather(1, index), rep], dim=1)
            a, cls_attn = self.attn(self.norm1(u))
            u = u + self.drop_path(a)
            m = self.mlp(self.norm2(u))
            u = u + self.drop_path(m)
            t = (t + a[:, -1:] + m[:, -1:]).scatter(1, index, u[:, 1:-1])  # merged patches: r's update
            score = score.scatter(1, keep, self._blend(score.gather(1, keep), cls_attn[:, :-1]))
            if n - keep.shape[1] == 1:
                score = torch.where(dropped, self._blend(state.score, cls_attn[:, -1:]), score)
            cls = u[:, :1]
            if self.pool > 1:
                pooled = F.avg_pool2d(score.reshape(b, 1, h, w), self.pool).flatten(1)
                score = pooled * (score.sum(1, keepdim=True) / pooled.sum(1, keepdim=True))
        return LightTokens(t.transpose(1, 2).reshape(b, c, h, w), cls, score)


class UniFormerLight(ClassifierModel):
    """Hourglass UniFormer (XXS/XS), NCHW input (B, in_chans, H, W) -> logits (B, num_classes).

    Four stages: convolutional stem (stride 4) and patch embeddings ``patch_sizes[1:]``; local-MHRA blocks in
    stages 1-2, :class:`EvoSABlock` s in 3-4 with one ``prune_ratios``/``trade_offs`` entry per block (the first
    block of stage 3 must not prune: it computes the first scores; the last block of stage 3 must prune, as the
    official code pools the scores only there). ``forward_features`` returns the patch map after the final
    BatchNorm; ``forward(x, both_heads=True)`` also returns ``head_cls(LayerNorm(class token))``. ``drop_rate`` is
    dropout before the classifier (timm), ``proj_drop_rate`` the official ``drop_rate`` (after the stem, in MLPs and
    attention outputs). Any size whose stage-4 grid is not empty works (the official floors; 32 px at least).
    """

    @staticmethod
    def combine_head_losses(criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor,
                            cls_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss of ``forward(x, both_heads=True)``'s logits, as ``visionmix train`` asks any model with
        an auxiliary head: :func:`two_head_loss`."""
        return two_head_loss(criterion, logits, cls_logits, target)

    def __init__(self, depths: Sequence[int] = (2, 5, 8, 2), embed_dims: Sequence[int] = (56, 112, 224, 448),
                 head_dim: int = 28, mlp_ratio: float = 3.0, *, patch_sizes: Sequence[int] = (4, 2, 2, 2),
                 prune_ratios: Sequence[Sequence[float]] | None = None,
                 trade_offs: Sequence[Sequence[float]] | None = None, qkv_bias: bool = True,
                 num_classes: int = 1000, in_chans: int = 3, img_size: int | tuple[int, int] | None = None,
                 global_pool: str = "avg", drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        depths, embed_dims, patch_sizes = tuple(depths), tuple(embed_dims), tuple(patch_sizes)
        if not len(depths) == len(embed_dims) == len(patch_sizes) == 4:
            raise InvalidValue(f"depths, embed_dims and patch_sizes need 4 entries (one per stage), got "
                               f"{len(depths)}, {len(embed_dims)} and {len(patch_sizes)}")
        for name, values in (("depths", depths), ("embed_dims", embed_dims), ("patch_sizes", patch_sizes)):
            for v in values:
                check_positive(name, v)
        if patch_sizes[0] != 4:
            raise InvalidValue(f"patch_sizes[0] must be 4 (the convolutional stem), got {patch_sizes[0]}")
        check_positive("in_chans", in_chans)
        prune_ratios = _per_block("prune_ratios", prune_ratios, depths, 0.5)
        trade_offs = _per_block("trade_offs", trade_offs, depths, 0.5)
        if prune_ratios[0][0] != 1:
            raise InvalidValue(f"prune_ratios[2][0] must be 1: the first block of stage 3 computes the first scores, "
                               f"got {prune_ratios[0][0]}")
        if prune_ratios[0][-1] == 1:
            raise InvalidValue("prune_ratios[2][-1] must be < 1: only a pruning block pools the scores to the stage-4 "
                               "grid, as officially (so stage 3 needs 2 blocks at least)")
        self.patch_sizes = patch_sizes
        if img_size is not None:
            self._check_size(*((img_size, img_size) if isinstance(img_size, int) else img_size))

        # Registration order = the official state-dict order.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[2]))
        self.patch_embed1 = ConvStem(in_chans, embed_dims[0], first=True)
        for i in (2, 3, 4):
            self.add_module(f"patch_embed{i}", PatchStem(embed_dims[i - 2], embed_dims[i - 1], patch_sizes[i - 1]))
        self.cls_upsample = nn.Linear(embed_dims[2], embed_dims[3])
        self.pos_drop = nn.Dropout(proj_drop_rate)
        dpr = iter(stochastic_depth_rates(drop_path_rate, sum(depths)))
        for i in (1, 2):
            self.add_module(f"blocks{i}", nn.ModuleList(
                LocalMHRA(embed_dims[i - 1], mlp_ratio, drop=proj_drop_rate, drop_path=next(dpr))
                for _ in range(depths[i - 1])))
        for i in (3, 4):
            ratios, trades, depth = prune_ratios[i - 3], trade_offs[i - 3], depths[i - 1]
            self.add_module(f"blocks{i}", nn.ModuleList(
                EvoSABlock(embed_dims[i - 1], head_dim, mlp_ratio, prune_ratio=ratios[j], trade_off=trades[j],
                           pool=patch_sizes[3] if (i, j) == (3, depth - 1) else 1, qkv_bias=qkv_bias,
                           proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=next(dpr))
                for j in range(depth)))
        self.norm = nn.BatchNorm2d(embed_dims[3])
        self.norm_cls = nn.LayerNorm(embed_dims[3])
        self._init_head(embed_dims[3], num_classes, in_chans, global_pool, drop_rate)
        self.head_cls = self._make_classifier(num_classes)
        reductions = [math.prod(patch_sizes[:i]) for i in range(1, 5)]
        extra = {1: ["pos_drop"], 3: [], 4: ["cls_upsample"]}
        self._init_features(["patch_embed1"], [
            ([f"patch_embed{i}", *extra.get(i, []), *(f"blocks{i}.{j}" for j in range(depths[i - 1]))],
             embed_dims[i - 1], reductions[i - 1], f"blocks{i}") for i in range(1, 5)
        ], norm="norm")
        self.apply(init_weights)

    def _grid(self, size: int) -> list[int]:
        """A side's length after each stage: the stem's two 3x3/s2/p1 convs round up, the patch embeddings down."""
        sides = [(size + 3) // 4]
        for p in self.patch_sizes[1:]:
            sides.append(sides[-1] // p)
        return sides

    def _check_size(self, height: int, width: int) -> None:
        if min(self._grid(height)[-1], self._grid(width)[-1]) < 1:
            raise InvalidValue(f"input size {height}x{width} is too small for {type(self).__name__} with patch_sizes "
                               f"{self.patch_sizes}: its stage-4 grid would be empty")

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans)
        self._check_size(x.shape[-2], x.shape[-1])
        return x  # the patch embeddings open each feature level

    def _forward_level(self, index: int, x: torch.Tensor | LightTokens) -> torch.Tensor | LightTokens:
        use_checkpoint = self.grad_checkpointing and torch.is_grad_enabled()
        for name in self._level_blocks[index]:
            module = self.get_submodule(name)
            if name == "patch_embed3":  # the class token joins
                x = module(x)
                # a copy, not an expand: a view of a parameter passed into a module under inference_mode breaks
                # FlopCounterMode's module tracker (requires_grad without a grad_fn)
                x = LightTokens(x, self.cls_token.repeat(x.shape[0], 1, 1), None)
            elif name == "cls_upsample":
                x = x._replace(cls=module(x.cls))
            elif name == "patch_embed4":
                x = x._replace(map=module(x.map))
            else:
                x = grad_checkpoint(module, x) if use_checkpoint and is_block(name) else module(x)
        return x

    def _forward_norm(self, x: torch.Tensor | LightTokens) -> torch.Tensor:
        return super()._forward_norm(x.map if isinstance(x, LightTokens) else x)

    def _to_map(self, x: torch.Tensor | LightTokens, reduction: int, size: tuple[int, int],
                output_fmt: str) -> torch.Tensor:
        return super()._to_map(x.map if isinstance(x, LightTokens) else x, reduction, size, output_fmt)

    def forward(self, x: torch.Tensor, both_heads: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits of ``head`` (pooled patches); with ``both_heads`` also those of ``head_cls`` (class token), the
        official training-mode output."""
        x = self._forward_stem(x)
        for index in range(len(self._level_blocks)):
            x = self._forward_level(index, x)
        logits = self.forward_head(self._forward_norm(x))
        if not both_heads:
            return logits
        return logits, self.head_cls(self.norm_cls(x.cls[:, 0]))

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace both classifiers (``head`` and ``head_cls``) by fresh ones."""
        super().reset_classifier(num_classes, global_pool)
        self.head_cls = self._make_classifier(num_classes).to(device=self.cls_token.device,
                                                              dtype=self.cls_token.dtype)

    def no_weight_decay(self) -> set[str]:
        """Norms, position encodings and the class token (the official list)."""
        return super().no_weight_decay() | {"cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """The base grouping with the class token in the stem and the class-token head after the final norm."""
        groups = super().group_matcher(coarse)
        blocks = [(r, i) for r, i in groups["blocks"] if i != (LAST_GROUP,)]
        last = ["norm_cls", "head_cls"] + (["norm"] if self._norm_name else [])
        return {"stem": r"^cls_token$|" + groups["stem"], "blocks": [*blocks, (prefix_regex(last), (LAST_GROUP,))]}


def two_head_loss(criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor,
                  cls_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official training loss of the two heads (``engine_light.py``): ``0.5 * L(head) + 0.5 * L(head_cls)``
    with the same criterion and targets (mixed ones included)."""
    return 0.5 * criterion(logits, target) + 0.5 * criterion(cls_logits, target)


def _per_block(name: str, values: Sequence[Sequence[float]] | None, depths: tuple[int, ...],
               default: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Stage-3 and stage-4 per-block values; the default is the official one: 1 for the first block, else 0.5."""
    if values is None:
        return (1.0, *(default,) * (depths[2] - 1)), (default,) * depths[3]
    values = tuple(tuple(float(v) for v in stage) for stage in values)
    if len(values) != 2 or tuple(map(len, values)) != depths[2:]:
        raise InvalidValue(f"{name} needs one entry per block of stages 3 and 4 (lengths {depths[2:]}), got "
                           f"{[list(v) for v in values]}")
    return values


_CFG = dict(first_conv="patch_embed1.proj.0", classifier="head", paper_ids="arXiv:2201.09450")
_XXS = dict(depths=(2, 5, 8, 2), embed_dims=(56, 112, 224, 448), head_dim=28)
_XS = dict(depths=(3, 5, 9, 3), embed_dims=(64, 128, 256, 512), head_dim=32)
# name: (architecture, input side of the official exp_light config, README GMACs, README top-1)
_CONFIGS = {
    "uniformer_xxs_128": (_XXS, 128, 0.43, 76.8),
    "uniformer_xxs_160": (_XXS, 160, 0.67, 79.1),
    "uniformer_xxs_192": (_XXS, 192, 0.96, 79.9),
    "uniformer_xxs": (_XXS, 224, 1.3, 80.6),
    "uniformer_xs_192": (_XS, 192, 1.4, 81.5),
    "uniformer_xs": (_XS, 224, 2.0, 82.0),
}
_PARAMS = {id(_XXS): 10_215_280, id(_XS): 16_509_264}

for _name, (_arch, _side, _gmacs, _top1) in _CONFIGS.items():
    register_variant(_name, UniFormerLight, _arch, cfg=dict(_CFG, input_size=(3, _side, _side)),
                     reference=Reference(params=_PARAMS[id(_arch)], gmacs=_gmacs, top1=_top1),
                     doc=f"UniFormer-{'XXS' if _arch is _XXS else 'XS'} (official exp_light at {_side} px): depths "
                         f"{_arch['depths']}, dims {_arch['embed_dims']}, head_dim {_arch['head_dim']}, MLP ratio 3.")

register_variant(
    "uniformer_light_nano", UniFormerLight,
    dict(depths=(2, 2, 4, 2), embed_dims=(96, 96, 128, 128), head_dim=32, patch_sizes=(4, 1, 1, 1), num_classes=10,
         in_chans=1),
    cfg=dict(_CFG, input_size=(1, 28, 28), num_classes=10, mean=(0.5,), std=(0.5,), crop_pct=1.0),
    reference=Reference(params=1_413_524, gmacs=0.050471),
    doc="UniFormer-light for 28 px: the stem to 7x7, every stage at 7x7 (49 tokens; from the second block of stage "
        "3 on, 24 kept and 25 merged).")
