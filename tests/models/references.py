"""Slow, explicit reference equations shared by the model tests (imported as ``from references import ...``).

Everything is written out with matmuls, ``erf`` and ``einsum`` so it cannot share a bug with ``F.gelu``,
``nn.Linear`` or ``scaled_dot_product_attention`` in the code under test. Tokens are (B, N, C).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def mlp_ref(x: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
    """``fc2(GELU(fc1(x)))`` with the exact (erf) GELU, on the last dim of ``x``."""
    h = x @ mlp.fc1.weight.T + mlp.fc1.bias
    return (0.5 * h * (1 + torch.erf(h / math.sqrt(2)))) @ mlp.fc2.weight.T + mlp.fc2.bias


def attention_ref(x: torch.Tensor, attn: nn.Module) -> torch.Tensor:
    """``proj(softmax(q kᵀ / sqrt(d)) v)`` per head on (B, N, C), from a fused ``qkv`` projection."""
    b, n, c = x.shape
    h = attn.num_heads
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(b, n, 3, h, c // h).unbind(2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(c // h)
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, n, c)
    return out @ attn.proj.weight.T + attn.proj.bias
