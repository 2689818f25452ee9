"""UniFormer: SABlock equations, the official state-dict layouts and sizes, layer scale without global state, sizes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from references import attention_ref, mlp_ref

from visionmix.models import create_model, model_entry
from visionmix.models.uniformer import SABlock, UniFormer

REFERENCE_FILE = Path(__file__).resolve().parent / "reference" / "checkpoint_keys_spach_uniformer.md"
IMAGENET = ["uniformer_small", "uniformer_small_plus", "uniformer_small_plus_dim64", "uniformer_base",
            "uniformer_base_ls"]
DIMS = (64, 128, 320, 512)


# ----------------------------------------------------------------------------------------------- reference equations
def layer_norm_ref(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def sablock_ref(block: SABlock, x: torch.Tensor) -> torch.Tensor:
    """2201.09450 eqs. 1-3 with global MHRA: X = DPE(X_in) + X_in; Y = X + g1·MHSA(LN(X)); Z = Y + g2·FFN(LN(Y))."""
    b, c, h, w = x.shape
    pe = block.pos_embed
    x = x + F.conv2d(x, pe.weight, pe.bias, padding=1, groups=c)
    t = x.flatten(2).transpose(1, 2)
    g1 = 1.0 if block.gamma_1 is None else block.gamma_1
    g2 = 1.0 if block.gamma_2 is None else block.gamma_2
    t = t + g1 * attention_ref(layer_norm_ref(t, block.norm1), block.attn)
    t = t + g2 * mlp_ref(layer_norm_ref(t, block.norm2), block.mlp)
    return t.transpose(1, 2).reshape(b, c, h, w)


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.5)
    return module


@pytest.mark.parametrize("layer_scale", [None, 1e-6])
def test_sablock_matches_paper_equations(layer_scale):
    torch.manual_seed(0)
    block = _randomize(SABlock(8, head_dim=4, layer_scale_init=layer_scale).double())
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(block(x), sablock_ref(block, x), rtol=1e-10, atol=1e-10)
    assert block.attn.num_heads == 2 and block.norm1.eps == 1e-6


def test_sablock_gradcheck():
    torch.manual_seed(0)
    block = _randomize(SABlock(4, head_dim=2, layer_scale_init=0.5).double())
    x = torch.randn(1, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


def test_model_is_stems_blocks_norm_mean_head():
    """The whole forward written out: embed, blocks, ... per stage, BatchNorm, spatial mean, head."""
    torch.manual_seed(0)
    model = UniFormer(depths=(1, 2), embed_dims=(8, 16), patch_sizes=(2, 2), num_conv_stages=1, head_dim=8,
                      in_chans=1, num_classes=3).double().eval()
    _randomize(model)
    x = torch.randn(2, 1, 12, 8, dtype=torch.float64)
    h = x
    for i in (1, 2):
        embed = getattr(model, f"patch_embed{i}")
        h = F.conv2d(h, embed.proj.weight, embed.proj.bias, stride=2)
        h = layer_norm_ref(h.permute(0, 2, 3, 1), embed.norm).permute(0, 3, 1, 2)
        for block in getattr(model, f"blocks{i}"):
            h = block(h)
    assert type(model.blocks2[0]) is SABlock and type(model.blocks1[0]).__name__ == "LocalMHRA"
    feats = F.batch_norm(h, model.norm.running_mean, model.norm.running_var, model.norm.weight, model.norm.bias,
                         eps=model.norm.eps)
    torch.testing.assert_close(model.forward_features(x), feats, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model(x), feats.mean((2, 3)) @ model.head.weight.T + model.head.bias,
                               rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------- official layouts
def _parse_reference() -> list:
    params = []
    for sec in re.split(r"^## ", REFERENCE_FILE.read_text(), flags=re.M):
        head = re.match(r"UniFormer:(\w+) \(models/uniformer\.py\).*?(\d+) keys, ([\d,]+) params \(([\d,]+) w/o", sec)
        if head is None:
            continue
        name, n_keys, n_params, n_no_head = head.groups()
        kwargs = re.search(r"ctor kwargs: `(.*)`", sec).group(1)
        listing = sec.split("```")[1].strip().splitlines()
        dots = listing.index("...")
        rows = [(k, tuple(int(d) for d in re.findall(r"\d+", s))) for k, s in
                (line.split(" ", 1) for line in listing if line != "...")]
        params.append(pytest.param(
            dict(name=name, kwargs=kwargs, n_keys=int(n_keys), params=int(n_params.replace(",", "")),
                 params_no_head=int(n_no_head.replace(",", "")), first=rows[:dots], last=rows[dots:],
                 patterns=sec.split("```")[3].strip().splitlines()), id=name))
    return params


def _pattern(key: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", key)  # the reference's rule


@pytest.mark.parametrize("ref", _parse_reference())
def test_layout_and_size_equal_official(ref):
    """All five official ImageNet models: key count, first/last keys with shapes, every key pattern, exact params."""
    with torch.device("meta"):
        model = create_model(ref["name"])
    rows = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert len(rows) == ref["n_keys"]
    assert rows[:len(ref["first"])] == ref["first"]
    assert rows[-len(ref["last"]):] == ref["last"]
    assert list(dict.fromkeys(_pattern(k) for k, _ in rows)) == ref["patterns"]
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == ref["params"] == model_entry(ref["name"]).reference.params
    assert n_params - sum(p.numel() for p in model.head.parameters()) == ref["params_no_head"]
    head_dim = int(re.search(r"'head_dim': (\d+)", ref["kwargs"]).group(1))
    assert model.blocks3[0].attn.head_dim == head_dim and model.blocks4[0].attn.num_heads == 512 // head_dim


def _official_layout(depths, conv_stem=False, layer_scale=False) -> list[tuple[str, tuple[int, ...]]]:
    """Every key and shape of an official UniFormer, in order, written from the paper's table and the official code."""

    def conv(p, o, i, k):
        return [(f"{p}.weight", (o, i, k, k)), (f"{p}.bias", (o,))]

    def norm(p, c, batch=True):
        stats = [(f"{p}.running_mean", (c,)), (f"{p}.running_var", (c,)), (f"{p}.num_batches_tracked", ())]
        return [(f"{p}.weight", (c,)), (f"{p}.bias", (c,))] + (stats if batch else [])

    rows = []
    for i, (c_in, c) in enumerate(zip((3, *DIMS[:-1]), DIMS, strict=True), start=1):
        p = f"patch_embed{i}.proj"
        if conv_stem and i == 1:
            rows += conv(f"{p}.0", c // 2, 3, 3) + norm(f"{p}.1", c // 2) + conv(f"{p}.3", c, c // 2, 3)
            rows += norm(f"{p}.4", c)
        elif conv_stem:
            rows += conv(f"{p}.0", c, c_in, 3) + norm(f"{p}.1", c)
        else:
            rows += norm(f"patch_embed{i}.norm", c, batch=False) + conv(p, c, c_in, 4 if i == 1 else 2)
    for i, (depth, c) in enumerate(zip(depths, DIMS, strict=True), start=1):
        for j in range(depth):
            b = f"blocks{i}.{j}"
            if i <= 2:
                rows += conv(f"{b}.pos_embed", c, 1, 3) + norm(f"{b}.norm1", c) + conv(f"{b}.conv1", c, c, 1)
                rows += conv(f"{b}.conv2", c, c, 1) + conv(f"{b}.attn", c, 1, 5) + norm(f"{b}.norm2", c)
                rows += conv(f"{b}.mlp.fc1", 4 * c, c, 1) + conv(f"{b}.mlp.fc2", c, 4 * c, 1)
            else:
                if layer_scale:
                    rows += [(f"{b}.gamma_1", (c,)), (f"{b}.gamma_2", (c,))]
                rows += conv(f"{b}.pos_embed", c, 1, 3) + norm(f"{b}.norm1", c, batch=False)
                rows += [(f"{b}.attn.qkv.weight", (3 * c, c)), (f"{b}.attn.qkv.bias", (3 * c,)),
                         (f"{b}.attn.proj.weight", (c, c)), (f"{b}.attn.proj.bias", (c,))]
                rows += norm(f"{b}.norm2", c, batch=False)
                rows += [(f"{b}.mlp.fc1.weight", (4 * c, c)), (f"{b}.mlp.fc1.bias", (4 * c,)),
                         (f"{b}.mlp.fc2.weight", (c, 4 * c)), (f"{b}.mlp.fc2.bias", (c,))]
    return rows + norm("norm", 512) + [("head.weight", (1000, 512)), ("head.bias", (1000,))]


@pytest.mark.parametrize(("name", "layout"), [
    ("uniformer_small", _official_layout((3, 4, 8, 3))),
    ("uniformer_small_plus", _official_layout((3, 5, 9, 3), conv_stem=True)),
    ("uniformer_base_ls", _official_layout((5, 8, 20, 7), layer_scale=True)),
])
def test_full_layout(name, layout):
    """Every key and shape, in the official order (strict=True loading needs the names and shapes)."""
    with torch.device("meta"):
        model = create_model(name)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == layout


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "base" in n else n for n in IMAGENET])
def test_params_and_macs_match_spec(name, model_stats):
    ref, stats = model_entry(name).reference, model_stats(name)
    assert stats.params == pytest.approx(ref.params, rel=1e-3)
    assert stats.macs / 1e9 == pytest.approx(ref.gmacs, rel=0.02)


def test_layer_scale_is_per_model_not_global():
    """The official code flips a module-level flag in uniformer_base_ls; here building it leaves no trace."""
    with torch.device("meta"):
        with_ls = create_model("uniformer_base_ls")
        without = create_model("uniformer_base")
    assert with_ls.blocks3[0].gamma_1 is not None and with_ls.blocks4[6].gamma_2 is not None
    assert all(b.gamma_1 is None and b.gamma_2 is None for b in (*without.blocks3, *without.blocks4))
    assert not any("gamma" in k for k in without.state_dict())
    assert sum(p.numel() for p in without.parameters()) == model_entry("uniformer_base").reference.params
    model = create_model("uniformer_nano", layer_scale_init=1e-6)
    assert torch.equal(model.blocks2[0].gamma_1, torch.full((128,), 1e-6))
    assert all("gamma" not in k for k in create_model("uniformer_nano").state_dict())


def test_init_is_official():
    torch.manual_seed(0)
    model = create_model("uniformer_nano")
    qkv = model.blocks2[0].attn.qkv
    assert abs(qkv.weight.std().item() - 0.02) < 1e-3  # truncated normal, std 0.02
    assert torch.equal(qkv.bias, torch.zeros_like(qkv.bias)) and torch.equal(model.head.bias, torch.zeros(10))
    assert torch.equal(model.patch_embed1.norm.weight, torch.ones(64)) and model.patch_embed1.norm.eps == 1e-5


def test_drop_path_rises_linearly_over_all_blocks():
    model = UniFormer(depths=(1, 2), embed_dims=(8, 16), patch_sizes=(2, 2), num_conv_stages=1, head_dim=8,
                      drop_path_rate=0.3)
    rates = [b.drop_path.drop_prob for b in (*model.blocks1, *model.blocks2)]
    assert rates == pytest.approx([0.0, 0.15, 0.3])


# ----------------------------------------------------------------------------------------------- sizes and API
def test_any_size_divisible_by_the_stride():
    with torch.device("meta"):
        model = create_model("uniformer_small", num_classes=4)
        assert model.forward_features(torch.empty(1, 3, 64, 96)).shape == (1, 512, 2, 3)
        with pytest.raises(ValueError, match="divisible by the model's total stride 32"):
            model(torch.empty(1, 3, 64, 80))
    with pytest.raises(ValueError, match="divisible by the model's total stride 32"):
        create_model("uniformer_small", img_size=200)
    nano = create_model("uniformer_nano", in_chans=3, img_size=32)
    assert nano.pretrained_cfg["input_size"] == (3, 32, 32) and nano(torch.randn(2, 3, 32, 36)).shape == (2, 10)
    with pytest.raises(ValueError, match="expected 3 channels"):
        nano(torch.randn(2, 1, 32, 32))


def test_conv_stem_takes_any_size_too():
    model = UniFormer(depths=(1, 1), embed_dims=(8, 16), patch_sizes=(4, 2), num_conv_stages=1, head_dim=8,
                      conv_stem=True, num_classes=2)
    assert model.forward_features(torch.randn(2, 3, 24, 40)).shape == (2, 16, 3, 5)
    with torch.device("meta"):
        plus = create_model("uniformer_small_plus")
    assert plus.pretrained_cfg["first_conv"] + ".weight" in plus.state_dict()




def test_bad_arguments():
    with pytest.raises(ValueError, match="conv_stem=True needs patch_sizes"):
        UniFormer(depths=(1, 1), embed_dims=(8, 16), patch_sizes=(2, 2), conv_stem=True)
    with pytest.raises(ValueError, match="one entry per stage"):
        UniFormer(depths=(1, 1), embed_dims=(8,), patch_sizes=(2, 2))
    with pytest.raises(ValueError, match="num_conv_stages"):
        UniFormer(depths=(1,), embed_dims=(8,), patch_sizes=(2,), num_conv_stages=2)
    with pytest.raises(ValueError, match="head_dim"):
        UniFormer(depths=(1, 1), embed_dims=(8, 12), patch_sizes=(2, 2), num_conv_stages=1, head_dim=8)
    with pytest.raises(ValueError, match="drop_path_rate"):
        create_model("uniformer_nano", drop_path_rate=1.0)


@pytest.mark.slow  # a short training run
def test_nano_trains(toy_training_losses):
    losses = toy_training_losses("uniformer_nano")
    assert losses[-1] < 0.5 * losses[0], losses


def test_nano_reference_figures_are_measured(model_stats):
    ref, stats = model_entry("uniformer_nano").reference, model_stats("uniformer_nano")
    assert stats.params == ref.params and 0.5e6 <= stats.params <= 1.5e6
    assert stats.macs / 1e9 == pytest.approx(ref.gmacs, abs=5e-5)

