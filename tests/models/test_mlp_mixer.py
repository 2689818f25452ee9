"""MLP-Mixer: the paper's equations, timm's state-dict layout, SPEC sizes, the timm head API, fixed input size."""

from __future__ import annotations

import math
import re

import pytest
import torch

from visionmix.models import create_model, list_models, model_entry
from visionmix.models.mlp_mixer import MixerBlock, MlpMixer

MIXERS_224 = list_models("mixer_*_224")


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu_ref(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def mixer_block_ref(block: MixerBlock, x: torch.Tensor) -> torch.Tensor:
    """2105.01601 eq. 1 written out: U = X + W2 σ(W1 LN(X)ᵀ)ᵀ (per channel), Y = U + W4 σ(W3 LN(U)) (per token)."""
    t, c = block.mlp_tokens, block.mlp_channels
    z = layer_norm_ref(x, block.norm1.weight, block.norm1.bias)  # (B, N, C)
    h = gelu_ref(torch.einsum("kn,bnc->bkc", t.fc1.weight, z) + t.fc1.bias[:, None])
    u = x + torch.einsum("nk,bkc->bnc", t.fc2.weight, h) + t.fc2.bias[:, None]
    z = layer_norm_ref(u, block.norm2.weight, block.norm2.bias)
    h = gelu_ref(torch.einsum("hc,bnc->bnh", c.fc1.weight, z) + c.fc1.bias)
    return u + torch.einsum("ch,bnh->bnc", c.fc2.weight, h) + c.fc2.bias


def test_block_matches_paper_equations():
    torch.manual_seed(0)
    block = MixerBlock(dim=12, num_tokens=9).double()
    for p in block.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    torch.testing.assert_close(block(x), mixer_block_ref(block, x), rtol=1e-10, atol=1e-10)
    assert block.mlp_tokens.fc1.out_features == 6 and block.mlp_channels.fc1.out_features == 48  # C/2, 4C


def test_block_gradcheck():
    torch.manual_seed(0)
    block = MixerBlock(dim=4, num_tokens=3).double()
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


def test_model_is_stem_blocks_norm_mean_head():
    torch.manual_seed(0)
    model = create_model("mixer_nano").eval()
    torch.nn.init.normal_(model.head.weight)
    x = torch.randn(2, 1, 28, 28)
    tokens = model.stem.proj(x).flatten(2).transpose(1, 2)  # (B, 49, C), row-major patches
    for block in model.blocks:
        tokens = mixer_block_ref(block, tokens)
    feats = layer_norm_ref(tokens, model.norm.weight, model.norm.bias)
    torch.testing.assert_close(model.forward_features(x), feats, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model(x), model.head(feats.mean(1)), rtol=1e-4, atol=1e-4)


def _timm_reference(reference_dir) -> list[tuple[str, tuple[int, ...]]]:
    """The full mixer_s16_224 layout: the file lists blocks 0-1 and the total; blocks 2.. repeat block 0's entries."""
    text = (reference_dir / "checkpoint_keys_mixer_timm.txt").read_text()
    section = text.split("# mixer_s16_224:")[1].split("\n\n")[0].splitlines()
    total = int(re.match(r"\s*(\d+) tensors", section[0]).group(1))
    rows = [(key, tuple(int(d) for d in re.findall(r"\d+", shape))) for key, shape in
            (line.split("\t") for line in section[1:])]
    block0 = [(k[len("blocks.0."):], s) for k, s in rows if k.startswith("blocks.0.")]
    head = [r for r in rows if not r[0].startswith("blocks.")]
    depth = (total - len(head)) // len(block0)
    blocks = [(f"blocks.{i}.{k}", s) for i in range(depth) for k, s in block0]
    listed_blocks = [r for r in rows if r[0].startswith("blocks.")]
    assert blocks[:len(listed_blocks)] == listed_blocks  # the listed blocks follow the block-0 pattern
    return head[:2] + blocks + head[2:]  # stem first, then blocks, then norm and head


def test_state_dict_layout_equals_timm(reference_dir):
    with torch.device("meta"):
        model = create_model("mixer_s16_224")
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == _timm_reference(reference_dir)


@pytest.mark.parametrize("name", MIXERS_224)
def test_params_and_macs_match_spec(name, model_stats):
    ref = model_entry(name).reference
    stats = model_stats(name)
    assert stats.params == pytest.approx(ref.params, rel=1e-3)
    assert stats.params_no_head == pytest.approx(ref.params_no_head, rel=1e-3)  # the paper's convention
    assert stats.macs / 1e9 == pytest.approx(ref.gmacs, rel=0.02)


def test_pretrained_cfg_is_timms():
    with torch.device("meta"):
        model = create_model("mixer_b16_224")
    cfg = model.pretrained_cfg
    assert cfg["fixed_input_size"] is True and cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["first_conv"] == "stem.proj" and cfg["classifier"] == "head" and cfg["input_size"] == (3, 224, 224)
    assert model.default_cfg is cfg


def test_fixed_input_size():
    model = create_model("mixer_nano")
    with pytest.raises(ValueError, match="expected input size 28x28"):
        model(torch.randn(1, 1, 32, 32))
    model = create_model("mixer_nano", img_size=32, in_chans=3)
    assert model.blocks[0].mlp_tokens.fc1.weight.shape == (80, 64)  # 8x8 tokens, hidden C/2 = 80
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    with pytest.raises(ValueError, match="expected 3 channels"):
        model(torch.randn(2, 1, 32, 32))


def test_head_starts_at_zero_and_may_stay_unpooled():
    """Mixer-specific: the paper's code zero-initialises the head; global_pool='' keeps the tokens (shared head API:
    test_every_model.py)."""
    model = create_model("mixer_nano", num_classes=5).eval()
    x = torch.randn(3, 1, 28, 28)
    assert model.forward_features(x).shape == (3, 49, 160) and model.num_features == 160
    assert torch.equal(model(x), torch.zeros(3, 5))
    model.reset_classifier(7, global_pool="")
    assert model(x).shape == (3, 49, 7)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(7, global_pool="token")


def test_bad_arguments():
    with pytest.raises(ValueError, match="must be divisible by patch_size"):
        MlpMixer(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="depth must be a positive integer, got 0"):
        MlpMixer(depth=0)
    with pytest.raises(ValueError, match="drop_path_rate"):
        MlpMixer(img_size=32, patch_size=16, drop_path_rate=1.0)


def test_drop_path_rises_linearly():
    model = MlpMixer(img_size=32, patch_size=16, embed_dim=8, depth=5, drop_path_rate=0.2)
    assert [b.drop_path.drop_prob for b in model.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


@pytest.mark.slow  # a short training run
def test_nano_trains(toy_training_losses):
    losses = toy_training_losses("mixer_nano")
    assert losses[-1] < 0.5 * losses[0], losses

