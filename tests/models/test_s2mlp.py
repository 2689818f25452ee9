"""S2-MLPv2: the block equations, SPEC sizes, the two-stage pyramid, variable input size, nano training."""

from __future__ import annotations

import math

import pytest
import torch

from visionmix.models import create_model, model_entry
from visionmix.models.s2mlp import S2MLPv2, S2MLPv2Block, ShiftSplitMixing


def layer_norm_ref(x, norm, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * norm.weight + norm.bias


def gelu_ref(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def linear_ref(x, fc):
    return x @ fc.weight.T + (fc.bias if fc.bias is not None else 0)


def shift_ref(x: torch.Tensor, pattern: int) -> torch.Tensor:
    """Index form of the spatial shift: quarter q reads its neighbour's pixel; the border keeps its own value."""
    _, h, w, c = x.shape
    back = {"H": torch.clamp(torch.arange(h) - 1, min=0), "W": torch.clamp(torch.arange(w) - 1, min=0)}
    fwd = {"H": torch.clamp(torch.arange(h) + 1, max=h - 1), "W": torch.clamp(torch.arange(w) + 1, max=w - 1)}
    moves = [("W", back), ("W", fwd), ("H", back), ("H", fwd)]
    if pattern == 2:
        moves = [("H", back), ("H", fwd), ("W", back), ("W", fwd)]
    quarters = []
    for q, (axis, table) in zip(x.split(c // 4, dim=-1), moves, strict=True):
        quarters.append(q[:, table["H"]] if axis == "H" else q[:, :, table["W"]])
    return torch.cat(quarters, -1)


def mixing_ref(m: ShiftSplitMixing, x: torch.Tensor) -> torch.Tensor:
    a, b, c = linear_ref(x, m.fc1).chunk(3, -1)
    maps = [shift_ref(a, 1), shift_ref(b, 2), c]
    s = sum(maps).mean((1, 2))  # (B, C): mean over space of the sum over branches
    logits = linear_ref(gelu_ref(linear_ref(s, m.split_attn.mlp1)), m.split_attn.mlp2)
    weights = logits.reshape(len(s), 3, -1).softmax(1)
    mixed = sum(weights[:, i, None, None, :] * maps[i] for i in range(3))
    return linear_ref(mixed, m.fc2)


def block_ref(block: S2MLPv2Block, x: torch.Tensor) -> torch.Tensor:
    x = x + mixing_ref(block.mixing, layer_norm_ref(x, block.norm1))
    z = layer_norm_ref(x, block.norm2)
    return x + linear_ref(gelu_ref(linear_ref(z, block.mlp.fc1)), block.mlp.fc2)


def _randomize(module):
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return module


def test_shift_reference_moves_one_pixel():
    x = torch.arange(16.0).reshape(1, 4, 4, 1).expand(1, 4, 4, 4)
    out = shift_ref(x, 1)
    assert out[0, 1, 2, 0] == x[0, 1, 1, 0] and out[0, 1, 0, 0] == x[0, 1, 0, 0]  # +W, border kept
    assert out[0, 1, 2, 3] == x[0, 2, 2, 3] and out[0, 3, 2, 3] == x[0, 3, 2, 3]  # -H, border kept


def test_block_matches_paper_equations():
    torch.manual_seed(0)
    block = _randomize(S2MLPv2Block(8).double())
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(block(x), block_ref(block, x), rtol=1e-10, atol=1e-10)


def test_block_gradcheck():
    torch.manual_seed(0)
    block = _randomize(S2MLPv2Block(4).double())
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


def test_model_composes_stem_stages_merge():
    torch.manual_seed(0)
    model = _randomize(create_model("s2mlpv2_nano")).double().eval()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    t = model.stem.proj(x).permute(0, 2, 3, 1)  # k = s = 2 patch conv -> (B, 14, 14, 64)
    for block in model.stages[0]:
        t = block_ref(block, t)
    merge, *blocks = model.stages[1]
    t = merge.proj(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # k = s = 2 merge -> (B, 7, 7, 128)
    for block in blocks:
        t = block_ref(block, t)
    feats = layer_norm_ref(t, model.norm)
    assert feats.shape == (2, 7, 7, 128)
    torch.testing.assert_close(model.forward_features(x), feats, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model(x), linear_ref(feats.mean((1, 2)), model.head), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["s2mlpv2_small", "s2mlpv2_medium"])
def test_params_and_macs_match_spec(name, model_stats):
    ref = model_entry(name).reference
    stats = model_stats(name)
    assert stats.params == pytest.approx(ref.params, rel=1e-3)
    assert stats.macs / 1e9 == pytest.approx(ref.gmacs, rel=0.02)


def test_paper_structure():
    with torch.device("meta"):
        model = create_model("s2mlpv2_small")
        feats = model.forward_features(torch.empty(1, 3, 224, 224))
    assert model.stem.proj.kernel_size == model.stem.proj.stride == (7, 7)
    assert [len(s) for s in model.stages] == [4, 15]  # stage 2 = merge + 14 blocks
    assert model.stages[1][0].proj.kernel_size == (2, 2)
    assert feats.shape == (1, 16, 16, 384)
    assert model.stages[0][0].mlp.fc1.out_features == 3 * 192
    assert model.stages[0][0].mixing.split_attn.mlp1.out_features == 192 // 4


def test_any_input_size():
    model = create_model("s2mlpv2_nano", in_chans=3).eval()
    assert model.pretrained_cfg["fixed_input_size"] is False
    for size in (32, 36):
        assert model(torch.randn(1, 3, size, size)).shape == (1, 10)
    with pytest.raises(ValueError, match="input size 33x33 must be divisible by the model's total stride 4x4"):
        model(torch.randn(1, 3, 33, 33))
    # 30 = 2 * 15 passes the patch but not the merge: the message names the user's size, not the stage's 15x15
    with pytest.raises(ValueError, match="input size 30x30 must be divisible by the model's total stride 4x4"):
        model(torch.randn(1, 3, 30, 30))


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim=6 must be divisible by 4"):
        ShiftSplitMixing(6)
    with pytest.raises(ValueError, match="one entry per stage"):
        S2MLPv2(embed_dims=(8, 16), depths=(1,))


@pytest.mark.slow  # a short training run
def test_nano_trains(toy_training_losses):
    losses = toy_training_losses("s2mlpv2_nano")
    assert losses[-1] < 0.5 * losses[0], losses




def test_linears_start_xavier_uniform_with_zero_bias():
    torch.manual_seed(0)
    linears = [m for m in create_model("s2mlpv2_nano").modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 + 7 * 6  # the head; fc1, split attention's 2, fc2 and the channel MLP's 2 per block
    for fc in linears:
        bound = math.sqrt(6 / (fc.in_features + fc.out_features))
        assert fc.weight.abs().max() <= bound
        assert fc.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert fc.bias is None or torch.all(fc.bias == 0)
