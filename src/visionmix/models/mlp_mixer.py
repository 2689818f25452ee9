"""MLP-Mixer (Tolstikhin et al., 2105.01601) with timm's ``mixer_*`` state-dict layout.

Block (eq. 1): ``U = X + W2 σ(W1 LN(X)ᵀ)ᵀ`` mixes tokens, ``Y = U + W4 σ(W3 LN(U))`` mixes channels; tokens are
(B, N, C), token hidden = C/2, channel hidden = 4C, LayerNorm eps 1e-6. The token MLP fixes N, so a model accepts
only its ``img_size`` (a wrong size raises ``ValueError`` naming the expected one).

``torch.compile``: works (checked with ``backend="eager"`` on ``mixer_nano`` in the tests).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from visionmix.checks import check_positive
from visionmix.layers import DropPath, Mlp, PatchEmbed, TokenMixingMLP
from visionmix.models._base import ClassifierModel, stochastic_depth_rates
from visionmix.models._registry import Reference, register_model, register_variant

__all__ = ["MixerBlock", "MlpMixer"]

_LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class MixerBlock(nn.Module):
    """One Mixer layer on (B, N, C) tokens: token-mixing MLP then channel-mixing MLP, each pre-norm + residual."""

    def __init__(self, dim: int, num_tokens: int, *, token_ratio: float = 0.5, channel_ratio: float = 4.0,
                 drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _LayerNorm(dim)
        self.mlp_tokens = TokenMixingMLP(num_tokens, int(dim * token_ratio), drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = _LayerNorm(dim)
        self.mlp_channels = Mlp(dim, int(dim * channel_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x)))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


class MlpMixer(ClassifierModel):
    """Patch embedding -> ``depth`` Mixer blocks -> LayerNorm -> mean over tokens -> linear head.

    ``forward_features`` returns (B, N, C) tokens (timm's NLC convention); every block is a feature level
    (``forward_intermediates`` reshapes its tokens to (B, C, H/p, W/p)). Stochastic depth rises linearly from 0 to
    ``drop_path_rate`` over the blocks (timm gives every block the same rate).
    """

    feature_fmt = "NLC"

    def __init__(self, *, num_classes: int = 1000, img_size: int | tuple[int, int] = 224, in_chans: int = 3,
                 patch_size: int = 16, embed_dim: int = 512, depth: int = 8, token_ratio: float = 0.5,
                 channel_ratio: float = 4.0, global_pool: str = "avg", drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        check_positive("depth", depth)
        self.stem = PatchEmbed(img_size, patch_size, in_chans, embed_dim, output_fmt="NLC", strict_img_size=True)
        self.blocks = nn.Sequential(*(
            MixerBlock(embed_dim, self.stem.num_patches, token_ratio=token_ratio, channel_ratio=channel_ratio,
                       drop=proj_drop_rate, drop_path=dpr)
            for dpr in stochastic_depth_rates(drop_path_rate, depth)
        ))
        self.norm = _LayerNorm(embed_dim)
        self._init_head(embed_dim, num_classes, in_chans, global_pool, drop_rate)
        self._init_features(["stem"], [([f"blocks.{i}"], embed_dim, self.stem.patch_size[0], f"blocks.{i}")
                                       for i in range(depth)], norm="norm")
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The reference JAX init: LeCun-normal stem, Xavier-uniform linears, tiny MLP biases, zero head."""
        fan_in = self.stem.proj.weight[0].numel()
        std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of N(0,1) truncated to [-2, 2]
        nn.init.trunc_normal_(self.stem.proj.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.stem.proj.bias)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name == self.head_name:
                    nn.init.zeros_(m.weight)
                    nn.init.zeros_(m.bias)
                else:
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.normal_(m.bias, std=1e-6)

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)


def _mixer_cfg(**overrides: object) -> dict:
    cfg = dict(fixed_input_size=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), first_conv="stem.proj",
               classifier="head", paper_ids="arXiv:2105.01601")
    return {**cfg, **overrides}


# name: (patch, dim, depth, params with head, params without head, GMACs) — SPEC.md section 2.
_MIXERS = {
    "mixer_s32_224": (32, 512, 8, 19.10e6, 18.59e6, 1.00),
    "mixer_s16_224": (16, 512, 8, 18.53e6, 18.02e6, 3.78),
    "mixer_b32_224": (32, 768, 12, 60.29e6, 59.52e6, 3.24),
    "mixer_b16_224": (16, 768, 12, 59.88e6, 59.11e6, 12.60),
    "mixer_l32_224": (32, 1024, 24, 206.94e6, 205.91e6, 11.25),
    "mixer_l16_224": (16, 1024, 24, 208.20e6, 207.17e6, 44.55),
}


for _name, (_patch, _dim, _depth, _params, _params_no_head, _gmacs) in _MIXERS.items():
    register_variant(_name, MlpMixer, dict(patch_size=_patch, embed_dim=_dim, depth=_depth), cfg=_mixer_cfg(),
                     doc=f"Mixer {_name.split('_')[1].upper()}: patch {_patch}, C={_dim}, {_depth} layers "
                         "(2105.01601).",
                     reference=Reference(params=round(_params), params_no_head=round(_params_no_head), gmacs=_gmacs))


# Nano: 28x28 grey input, patch 4 -> 7x7 = 49 tokens, sized to the zoo's shared nano budget (~1M parameters,
# ~60 MMACs). Reference figures at the nano default: 1x1x28x28, 10-class head.
@register_model(cfg=_mixer_cfg(input_size=(1, 28, 28), mean=(0.5,), std=(0.5,), num_classes=10),
                reference=Reference(params=1_289_904, gmacs=0.0679))
def mixer_nano(**kwargs: object) -> MlpMixer:
    """Mixer for 28x28 inputs: patch 4, C=160, 6 layers."""
    return MlpMixer(**{"num_classes": 10, "in_chans": 1, "img_size": 28, "patch_size": 4, "embed_dim": 160,
                       "depth": 6, **kwargs})
