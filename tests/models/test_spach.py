"""SPACH / SPACH-MS: the mixing-block equations, the official state-dict layouts and sizes, nano fairness, sizes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from references import attention_ref, mlp_ref

from visionmix.models import create_model, list_models, model_entry
from visionmix.models.spach import MixingBlock, Spach

REFERENCE_FILE = Path(__file__).resolve().parent / "reference" / "checkpoint_keys_spach_uniformer.md"
SPACH_224 = list_models("spach_*_224_*")
NANOS = list_models(["spach_nano_*", "spach_ms_nano_*"])


# ----------------------------------------------------------------------------------------------- reference equations
def layer_norm_ref(x, norm, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * norm.weight + norm.bias


def mixing_block_ref(block: MixingBlock, x: torch.Tensor) -> torch.Tensor:
    """The official MixingBlock on (B, N, C) tokens: x + γ·Fs(LN(x)) + CPE(x), then + Fc(LN(·))."""
    b, hh, ww, c = x.shape
    tokens = x.reshape(b, hh * ww, c)
    out = tokens.clone()
    if block.spatial_func is not None:
        z = layer_norm_ref(tokens, block.norm1)
        if hasattr(block.spatial_func, "qkv"):
            mixed = attention_ref(z, block.spatial_func)
        else:
            mixed = mlp_ref(z.transpose(1, 2), block.spatial_func).transpose(1, 2)
        out = out + block.gamma_1 * mixed
    conv = block.cpe_net.net[1]
    image = tokens.transpose(1, 2).reshape(b, c, hh, ww)
    out = out + F.conv2d(image, conv.weight, conv.bias, padding=1, groups=c).flatten(2).transpose(1, 2)
    out = out + mlp_ref(layer_norm_ref(out, block.norm2), block.channel_func)
    return out.reshape(b, hh, ww, c)


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return module


@pytest.mark.parametrize("kind", ["conv", "attn", "mlp"])
def test_mixing_block_matches_official_equations(kind):
    torch.manual_seed(0)
    block = _randomize(MixingBlock(8, kind, num_tokens=12, num_heads=2).double())
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    torch.testing.assert_close(block(x), mixing_block_ref(block, x), rtol=1e-10, atol=1e-10)
    assert (block.spatial_func is None) == (kind == "conv")


@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_mixing_block_gradcheck(kind):
    torch.manual_seed(0)
    block = _randomize(MixingBlock(4, kind, num_tokens=4, num_heads=2).double())
    x = torch.randn(1, 2, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


def test_multi_stage_model_composes_stem_blocks_downsample():
    torch.manual_seed(0)
    model = _randomize(create_model("spach_ms_nano_attn")).double().eval()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    t = model.stem.proj(x).permute(0, 2, 3, 1)
    t = layer_norm_ref(t, model.norm1)
    for block in model.layer1:
        t = mixing_block_ref(block, t)
    conv, gn = model.layer2[0].net[1]
    y = F.conv2d(t.permute(0, 3, 1, 2), conv.weight, stride=2)  # 2x2 s2, no bias
    mean, var = y.mean((1, 2, 3), keepdim=True), y.var((1, 2, 3), unbiased=False, keepdim=True)
    t = ((y - mean) / torch.sqrt(var + gn.eps) * gn.weight[:, None, None] + gn.bias[:, None, None]).permute(0, 2, 3, 1)
    for block in list(model.layer2)[1:]:
        t = mixing_block_ref(block, t)
    feats = layer_norm_ref(t, model.norm2)
    torch.testing.assert_close(model.forward_features(x), feats, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model(x), model.head(feats.mean((1, 2))), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------- official layouts
def _parse_reference() -> list:
    sections = re.split(r"^## ", REFERENCE_FILE.read_text(), flags=re.M)
    params = []
    for sec in sections:
        if not sec.startswith("SPACH:"):
            continue
        head = re.match(r"SPACH:(\w+)(?:\[(\w+)=(\w+)\])?.*?(\d+) keys, ([\d,]+) params \(([\d,]+) w/o head\)", sec)
        name, kw_name, kw_value, n_keys, n_params, n_no_head = head.groups()
        kwargs = {kw_name: {"True": True}.get(kw_value, kw_value)} if kw_name else {}
        listing = sec.split("```")[1].strip().splitlines()
        dots = listing.index("...")
        rows = [(k, tuple(int(d) for d in re.findall(r"\d+", s))) for k, s in
                (line.split(" ", 1) for line in listing if line != "...")]
        patterns = sec.split("```")[3].strip().splitlines()
        params.append(pytest.param(
            dict(name=name, kwargs=kwargs, n_keys=int(n_keys), params=int(n_params.replace(",", "")),
                 params_no_head=int(n_no_head.replace(",", "")), first=rows[:dots], last=rows[dots:],
                 patterns=patterns),
            id=name + "".join(f"[{k}={v}]" for k, v in kwargs.items())))
    return params


def _pattern(key: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", key)  # the reference's rule (non-overlapping: "net.1.0.w" -> "net.N.0.w")


@pytest.mark.parametrize("ref", _parse_reference())
def test_layout_and_size_equal_official(ref):
    """All 24 official SPACH layouts: key count, first/last keys with shapes, every key pattern, exact params."""
    with torch.device("meta"):
        model = create_model(ref["name"], **ref["kwargs"])
    _assert_layout(model, ref)


def _assert_layout(model: torch.nn.Module, ref: dict) -> None:
    rows = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert len(rows) == ref["n_keys"]
    assert rows[:len(ref["first"])] == ref["first"]
    assert rows[-len(ref["last"]):] == ref["last"]
    assert list(dict.fromkeys(_pattern(k) for k, _ in rows)) == ref["patterns"]
    n_params = sum(p.numel() for p in model.parameters())  # shared spatial functions count once
    assert n_params == ref["params"]
    assert n_params - sum(p.numel() for p in model.head.parameters()) == ref["params_no_head"]


def _hybrid_s_layout() -> list[tuple[str, tuple[int, ...]]]:
    """Every key and shape of spach_ms_s_patch4_224_hybrid, written from the paper's table and the official layout."""
    c0, ratio = 128, 3
    rows = [("stem.proj.weight", (c0, 3, 4, 4)), ("stem.proj.bias", (c0,)), ("norm1.weight", (c0,)),
            ("norm1.bias", (c0,))]
    arch = [[("conv", 3)], [("conv", 2), ("attn", 2)], [("conv", 2), ("attn", 10)], [("conv", 1), ("attn", 2)]]
    for stage, blocks in enumerate(arch):
        c = c0 * 2 ** stage
        p = f"layer{stage + 1}"
        index = 0
        if stage:
            rows += [(f"{p}.0.net.1.0.weight", (c, c // 2, 2, 2)), (f"{p}.0.net.1.1.weight", (c,)),
                     (f"{p}.0.net.1.1.bias", (c,))]
            index = 1
        for kind, depth in blocks:
            for _ in range(depth):
                b = f"{p}.{index}"
                if kind == "attn":
                    rows += [(f"{b}.gamma_1", (1, 1, c)), (f"{b}.spatial_func.qkv.weight", (3 * c, c)),
                             (f"{b}.spatial_func.qkv.bias", (3 * c,)), (f"{b}.spatial_func.proj.weight", (c, c)),
                             (f"{b}.spatial_func.proj.bias", (c,)), (f"{b}.norm1.weight", (c,)),
                             (f"{b}.norm1.bias", (c,))]
                rows += [(f"{b}.channel_func.fc1.weight", (ratio * c, c)), (f"{b}.channel_func.fc1.bias", (ratio * c,)),
                         (f"{b}.channel_func.fc2.weight", (c, ratio * c)), (f"{b}.channel_func.fc2.bias", (c,)),
                         (f"{b}.norm2.weight", (c,)), (f"{b}.norm2.bias", (c,)),
                         (f"{b}.cpe_net.net.1.weight", (c, 1, 3, 3)), (f"{b}.cpe_net.net.1.bias", (c,))]
                index += 1
    return rows + [("norm2.weight", (1024,)), ("norm2.bias", (1024,)), ("head.weight", (1000, 1024)),
                   ("head.bias", (1000,))]


def test_hybrid_s_full_layout():
    with torch.device("meta"):
        model = create_model("spach_ms_s_patch4_224_hybrid")
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == _hybrid_s_layout()
    assert len(_hybrid_s_layout()) == 291  # the official key count


@pytest.mark.slow
@pytest.mark.parametrize("name", SPACH_224)
def test_params_and_macs_match_spec(name, model_stats):
    ref = model_entry(name).reference
    stats = model_stats(name)
    assert stats.params == pytest.approx(ref.params, rel=1e-3)
    assert stats.macs / 1e9 == pytest.approx(ref.gmacs, rel=0.02)


def test_hybrid_s_plus_is_the_s_hybrid_with_the_official_conv4_stem(model_stats):
    """Hybrid-MS-S+ (spach_ms_hybrid_s+.pth): the official SpachMS of the S hybrid built with --stem-type conv4, key
    for key; the paper's 63M parameters and 12.3G FLOPs (our counter: 12.18 GMACs)."""
    ref = next(p.values[0] for p in _parse_reference() if p.id == "spach_ms_s_patch4_224_hybrid[stem_type=conv4]")
    with torch.device("meta"):
        model = create_model("spach_ms_s_plus_patch4_224_hybrid")
    _assert_layout(model, ref)
    stats = model_stats("spach_ms_s_plus_patch4_224_hybrid")
    assert round(stats.params / 1e6) == 63
    assert stats.params == model_entry("spach_ms_s_plus_patch4_224_hybrid").reference.params
    assert stats.macs / 1e9 == pytest.approx(12.3, rel=0.02)


def test_hybrid_s_plus_loads_a_checkpoint_in_the_official_layout(tmp_path):
    """A file as the official main.py saves it ({'model': state_dict, ...}) loads strictly into the S+ name, and the
    model it gives computes what the saved one does."""
    torch.manual_seed(0)
    saved = create_model("spach_ms_s_patch4_224_hybrid", stem_type="conv4", num_classes=5).eval()
    for p in saved.head.parameters():
        torch.nn.init.normal_(p)  # a zero head would hide a wrong load
    path = tmp_path / "spach_ms_hybrid_s+.pth"
    torch.save({"model": saved.state_dict(), "epoch": 299, "args": None}, path)
    loaded = create_model("spach_ms_s_plus_patch4_224_hybrid", num_classes=5, checkpoint_path=str(path)).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), saved(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- behaviour
def test_shared_spatial_func_is_one_module_per_stage():
    model = create_model("spach_ms_nano_mlp", shared_spatial_func=True)
    funcs = {id(b.spatial_func) for b in list(model.layer2)[1:]}
    assert len(funcs) == 1 and model.layer1[0].spatial_func is None
    with pytest.raises(ValueError, match="single spatial type per stage"), torch.device("meta"):
        create_model("spach_ms_xs_patch4_224_hybrid", shared_spatial_func=True)


def test_init_is_official():
    model = create_model("spach_ms_nano_attn")
    assert torch.equal(model(torch.randn(2, 1, 28, 28)), torch.zeros(2, 10))  # zero head
    gammas = [m.gamma_1 for m in model.modules() if isinstance(m, MixingBlock) and m.spatial_func is not None]
    assert len(gammas) == 3 and all(torch.all(g == 1e-4) for g in gammas)
    assert model.layer2[0].net[1][0].bias is None


def test_drop_path_rule():
    ss = create_model("spach_nano_conv", drop_path_rate=0.1)
    assert [b.drop_path.drop_prob for b in ss.blocks] == [0.1] * 8  # single-stage: constant, as official
    ms = create_model("spach_ms_nano_conv", drop_path_rate=0.1)
    rates = [b.drop_path.drop_prob for s in (ms.layer1, ms.layer2) for b in s if isinstance(b, MixingBlock)]
    assert rates == pytest.approx([0.1 * i / 7 for i in range(8)])  # multi-stage: linear, as official


@pytest.mark.parametrize("name", ["spach_nano_conv", "spach_nano_attn", "spach_ms_nano_conv", "spach_ms_nano_attn"])
def test_conv_and_attention_models_take_any_size(name):
    model = create_model(name, in_chans=3).eval()
    for size in (32, 36):
        assert model(torch.randn(1, 3, size, size)).shape == (1, 10)
    assert model.forward_features(torch.randn(1, 3, 36, 36)).shape[1:3] == (9, 9)  # 36/4, or 36/2/2


@pytest.mark.parametrize("name", ["spach_nano_mlp", "spach_ms_nano_mlp"])
def test_mlp_models_are_fixed_size(name):
    model = create_model(name)
    assert model.pretrained_cfg["fixed_input_size"] is True
    with pytest.raises(ValueError, match="expected input size 28x28"):
        model(torch.randn(1, 1, 32, 32))


def test_bad_arguments():
    with pytest.raises(ValueError, match="spatial function type"):
        Spach(net_arch=[[("gmlp", 2)]], img_size=32)
    with pytest.raises(ValueError, match="stem_type"):
        Spach(net_arch=[[("conv", 2)]], stem_type="conv3")
    with pytest.raises(ValueError, match="even patch_size"):
        Spach(net_arch=[[("conv", 2)]], img_size=30, patch_size=3, stem_type="conv4")
    with pytest.raises(ValueError, match="non-empty"):
        Spach(net_arch=[])
    assert Spach(net_arch=[[("pass", 1)]], img_size=32, hidden_dim=8, num_classes=3).blocks[0].spatial_func is None


def test_nanos_are_a_fair_comparison(model_stats):
    """SPACH's rule at small scale: the three mixing types match in parameters and MACs (within 10%)."""
    for prefix in ("spach_nano_", "spach_ms_nano_"):
        stats = [model_stats(prefix + kind) for kind in ("conv", "attn", "mlp")]
        for key in ("params", "macs"):
            values = [getattr(s, key) for s in stats]
            assert max(values) / min(values) < 1.1, (prefix, key, values)


@pytest.mark.slow
@pytest.mark.parametrize("name", NANOS)
def test_nano_trains(name, toy_training_losses):
    losses = toy_training_losses(name)
    assert losses[-1] < 0.5 * losses[0], losses

