"""UniFormer-light (XXS/XS): official sizes and key layout, token pruning against a slow reference written from the
official algorithm (Sense-X/UniFormer image_classification/models/uniformer_light.py at 52a0415: sort by score, keep
the head, merge the tail, restore the order), the two heads and their loss, sizes and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from references import mlp_ref

from visionmix.models import create_model, model_entry
from visionmix.models.uniformer_light import EvoSABlock, LightTokens, UniFormerLight, two_head_loss

LIGHT = ["uniformer_xxs_128", "uniformer_xxs_160", "uniformer_xxs_192", "uniformer_xxs", "uniformer_xs_192",
         "uniformer_xs"]


# ----------------------------------------------------------------------------------------------- reference maths
def _ln(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _attention_with_map(x, attn):
    """(N, C) tokens of one sample -> (proj(A v), A) with A = softmax(q k^T / sqrt(d)) per head, (heads, N, N)."""
    n, c = x.shape
    h = attn.num_heads
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(n, 3, h, c // h).permute(1, 2, 0, 3)
    a = (q @ k.transpose(-1, -2) / math.sqrt(c // h)).softmax(-1)
    return (a @ v).transpose(0, 1).reshape(n, c) @ attn.proj.weight.T + attn.proj.bias, a


def evo_block_ref(block: EvoSABlock, x, cls, score):
    """One EvoSABlock, sample by sample, as the official code orders it. x (B, C, H, W), cls (B, 1, C), score
    (B, HW) or None. Returns (x, cls, score)."""
    b, c, h, w = x.shape
    x = x + F.conv2d(x, block.pos_embed.weight, block.pos_embed.bias, padding=1, groups=c)
    tokens = x.flatten(2).transpose(1, 2)
    n = h * w
    t_b = block.trade_off
    xs, clss, scores = [], [], []
    for i in range(b):
        t = tokens[i]
        if block.prune_ratio == 1:
            u = torch.cat([cls[i], t])
            a, amap = _attention_with_map(_ln(u, block.norm1), block.attn)
            u = u + a
            u = u + mlp_ref(_ln(u, block.norm2), block.mlp)
            cls_attn = amap[:, 0, 1:].mean(0)
            s = cls_attn if score is None else (1 - t_b) * score[i] + t_b * cls_attn
            xs.append(u[1:])
            clss.append(u[:1])
            scores.append(s)
            continue
        k = int(n * block.prune_ratio)
        order = torch.argsort(score[i], descending=True)
        sorted_t, sorted_s = t[order], score[i][order]
        info, drop, drop_s = sorted_t[:k], sorted_t[k:], sorted_s[k:]
        rep = (drop_s[:, None] / drop_s.sum() * drop).sum(0, keepdim=True)
        u = torch.cat([cls[i], info, rep])
        a, amap = _attention_with_map(_ln(u, block.norm1), block.attn)
        u = u + a
        m = mlp_ref(_ln(u, block.norm2), block.mlp)
        u = u + m
        drop = drop + a[-1] + m[-1]
        if n == k + 1:  # the official "no pruning" branch: every score updated, r's for the one merged token
            sorted_s = (1 - t_b) * sorted_s + t_b * amap[:, 0, 1:].mean(0)
        else:
            sorted_s = torch.cat([(1 - t_b) * sorted_s[:k] + t_b * amap[:, 0, 1:-1].mean(0), sorted_s[k:]])
        restored, restored_s = torch.empty_like(t), torch.empty_like(score[i])
        restored[order] = torch.cat([u[1:-1], drop])
        restored_s[order] = sorted_s
        if block.pool > 1:
            total = restored_s.sum()
            restored_s = F.avg_pool2d(restored_s.reshape(1, 1, h, w), block.pool).flatten()
            restored_s = restored_s * total / restored_s.sum()
        xs.append(restored)
        clss.append(u[:1])
        scores.append(restored_s)
    x = torch.stack(xs).transpose(1, 2).reshape(b, c, h, w)
    return x, torch.stack(clss), torch.stack(scores)


def light_ref(model: UniFormerLight, x):
    """The whole model in eval mode: stem and local-MHRA stages (modules tested elsewhere), then stages 3-4 with the
    class token by :func:`evo_block_ref`, final BatchNorm, mean pool and both heads."""
    x = model.patch_embed1(x)
    for blk in model.blocks1:
        x = blk(x)
    x = model.patch_embed2(x)
    for blk in model.blocks2:
        x = blk(x)
    x = model.patch_embed3(x)
    cls, score = model.cls_token.expand(x.shape[0], -1, -1), None
    for blk in model.blocks3:
        x, cls, score = evo_block_ref(blk, x, cls, score)
    cls = cls @ model.cls_upsample.weight.T + model.cls_upsample.bias
    x = model.patch_embed4(x)
    for blk in model.blocks4:
        x, cls, score = evo_block_ref(blk, x, cls, score)
    bn = model.norm
    x = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    x = x * bn.weight[:, None, None] + bn.bias[:, None, None]
    logits = x.mean((2, 3)) @ model.head.weight.T + model.head.bias
    cls_logits = _ln(cls[:, 0], model.norm_cls) @ model.head_cls.weight.T + model.head_cls.bias
    return logits, cls_logits


def _randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.2 if p.ndim > 1 else 0.5))
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model


# ----------------------------------------------------------------------------------------------- sizes and layout
@pytest.mark.parametrize("name", LIGHT)
def test_params_and_macs_equal_official(name, model_stats):
    """Params exactly as the official modules count them; MACs within 2% of the README table (rounded to 2
    digits), except XS at 224: 1.932 G against "2.0G" (3.4%), the count being exact on every other config and
    the same arithmetic (XS at 192 is within 1.3%), so the README figure is taken as loosely rounded up."""
    ref, stats = model_entry(name).reference, model_stats(name)
    assert stats.params == ref.params == {"xxs": 10_215_280, "xs": 16_509_264}[name.split("_")[1]]
    tolerance = 0.04 if name == "uniformer_xs" else 0.02
    assert stats.macs / 1e9 == pytest.approx(ref.gmacs, rel=tolerance)


def _official_keys(depths, dims, mlp_ratio=3):
    """Every key and shape of the official UniFormer_Light, in its registration order."""
    def lin(p, o, i):
        return [(f"{p}.weight", (o, i)), (f"{p}.bias", (o,))]

    def conv(p, o, i, k):
        return [(f"{p}.weight", (o, i, k, k)), (f"{p}.bias", (o,))]

    def bn(p, c):
        return [(f"{p}.weight", (c,)), (f"{p}.bias", (c,)), (f"{p}.running_mean", (c,)), (f"{p}.running_var", (c,)),
                (f"{p}.num_batches_tracked", ())]

    def ln(p, c):
        return [(f"{p}.weight", (c,)), (f"{p}.bias", (c,))]

    rows = [("cls_token", (1, 1, dims[2]))]
    rows += conv("patch_embed1.proj.0", dims[0] // 2, 3, 3) + bn("patch_embed1.proj.1", dims[0] // 2)
    rows += conv("patch_embed1.proj.3", dims[0], dims[0] // 2, 3) + bn("patch_embed1.proj.4", dims[0])
    for i in (2, 3, 4):
        rows += ln(f"patch_embed{i}.norm", dims[i - 1]) + conv(f"patch_embed{i}.proj", dims[i - 1], dims[i - 2], 2)
    rows += lin("cls_upsample", dims[3], dims[2])
    for i, (depth, c) in enumerate(zip(depths, dims, strict=True), start=1):
        hidden = c * mlp_ratio
        for j in range(depth):
            p = f"blocks{i}.{j}"
            rows += conv(f"{p}.pos_embed", c, 1, 3)
            if i <= 2:
                rows += bn(f"{p}.norm1", c) + conv(f"{p}.conv1", c, c, 1) + conv(f"{p}.conv2", c, c, 1)
                rows += conv(f"{p}.attn", c, 1, 5) + bn(f"{p}.norm2", c)
                rows += conv(f"{p}.mlp.fc1", hidden, c, 1) + conv(f"{p}.mlp.fc2", c, hidden, 1)
            else:
                rows += ln(f"{p}.norm1", c) + lin(f"{p}.attn.qkv", 3 * c, c) + lin(f"{p}.attn.proj", c, c)
                rows += ln(f"{p}.norm2", c) + lin(f"{p}.mlp.fc1", hidden, c) + lin(f"{p}.mlp.fc2", c, hidden)
    rows += bn("norm", dims[3]) + ln("norm_cls", dims[3])
    return rows + lin("head", 1000, dims[3]) + lin("head_cls", 1000, dims[3])


@pytest.mark.parametrize("name, depths, dims", [("uniformer_xxs", (2, 5, 8, 2), (56, 112, 224, 448)),
                                                ("uniformer_xs", (3, 5, 9, 3), (64, 128, 256, 512))])
def test_official_layout_loads_strictly(name, depths, dims):
    with torch.device("meta"):
        model = create_model(name)
    want = _official_keys(depths, dims)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == want
    assert sum(math.prod(s) for k, s in want if "running" not in k and "num_batches" not in k) == \
        model_entry(name).reference.params
    heads = {f"blocks{i}.0": dims[i - 1] // {"uniformer_xxs": 28, "uniformer_xs": 32}[name] for i in (3, 4)}
    assert all(model.get_submodule(f"{p}.attn").num_heads == h for p, h in heads.items())


# ----------------------------------------------------------------------------------------------- pruning
def test_kept_tokens_are_the_top_scores_and_the_merged_token_their_weighted_mean():
    torch.manual_seed(0)
    block = _randomize(EvoSABlock(8, 4, prune_ratio=0.5).double()).eval()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    score = torch.rand(2, 9, dtype=torch.float64)
    seen = []
    block.norm1.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    block(LightTokens(x, torch.randn(2, 1, 8, dtype=torch.float64), score))
    tokens = (x + block.pos_embed(x)).flatten(2).transpose(1, 2)
    u = seen[0]
    assert u.shape == (2, 1 + 4 + 1, 8)
    for i in range(2):
        top = sorted(range(9), key=lambda j: -score[i, j].item())[:4]
        rest = [j for j in range(9) if j not in top]
        torch.testing.assert_close(u[i, 1:5], tokens[i, top], rtol=0, atol=0)
        merged = sum(score[i, j] * tokens[i, j] for j in rest) / sum(score[i, j] for j in rest)
        torch.testing.assert_close(u[i, 5], merged, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ratio, grid, pool, first", [(1.0, (3, 4), 1, True), (1.0, (3, 4), 1, False),
                                                      (0.5, (3, 4), 1, False), (0.5, (4, 4), 2, False),
                                                      (0.5, (5, 5), 2, False), (0.5, (1, 2), 1, False),
                                                      (0.25, (2, 3), 1, False)])
def test_evo_block_matches_the_official_algorithm(ratio, grid, pool, first):
    """Sorting/merging/restoring sample by sample equals the vectorised block, including the single-merged-token
    branch (1x2 grid), odd pooling (5x5 -> 2x2, the sum rescaled) and the first block (no scores yet)."""
    torch.manual_seed(0)
    block = _randomize(EvoSABlock(8, 4, prune_ratio=ratio, trade_off=0.3, pool=pool).double()).eval()
    x = torch.randn(3, 8, *grid, dtype=torch.float64)
    cls = torch.randn(3, 1, 8, dtype=torch.float64)
    score = None if first else torch.rand(3, grid[0] * grid[1], dtype=torch.float64)
    out = block(LightTokens(x, cls, score))
    want = evo_block_ref(block, x, cls, score)
    for got, ref in zip(out, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_evo_block_gradcheck():
    torch.manual_seed(0)
    block = _randomize(EvoSABlock(4, 2, prune_ratio=0.5).double())
    x = torch.randn(1, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    cls = torch.randn(1, 1, 4, dtype=torch.float64, requires_grad=True)
    score = torch.tensor([[0.4, 0.1, 0.3, 0.2]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: tuple(block(LightTokens(*a))), (x, cls, score))


# ----------------------------------------------------------------------------------------------- whole model
@pytest.mark.slow
@pytest.mark.parametrize("name, size, batch", [("uniformer_xxs", 224, 2), ("uniformer_xs", 160, 1),
                                               ("uniformer_xxs", 208, 1)])
def test_model_matches_the_official_maths(name, size, batch):
    """Both heads against the reference, float64, random weights and BN statistics; 208 px gives a 13x13 stage-3
    grid whose scores pool (floor) to the 6x6 of stage 4, as the official AvgPool2d and patch conv do."""
    torch.manual_seed(0)
    model = _randomize(create_model(name).double()).eval()
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        logits, cls_logits = model(x, both_heads=True)
        want_logits, want_cls = light_ref(model, x)
        plain = model(x)
    torch.testing.assert_close(logits, want_logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cls_logits, want_cls, rtol=1e-9, atol=1e-9)
    assert torch.equal(plain, logits)


def test_nano_matches_the_official_maths_in_float32():
    torch.manual_seed(0)
    model = _randomize(create_model("uniformer_light_nano")).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        got, want = model(x, both_heads=True), light_ref(model, x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_two_head_loss_is_the_official_half_and_half():
    torch.manual_seed(0)
    a, b, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 4, 2])
    want = 0.5 * F.cross_entropy(a, y) + 0.5 * F.cross_entropy(b, y)
    torch.testing.assert_close(two_head_loss(F.cross_entropy, a, b, y), want, rtol=0, atol=0)


def test_training_trains_both_heads_deterministically():
    torch.manual_seed(0)
    model = create_model("uniformer_light_nano", drop_path_rate=0.1).train()
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([1, 3])
    torch.manual_seed(1)
    logits, cls_logits = model(x, both_heads=True)
    two_head_loss(F.cross_entropy, logits, cls_logits, y).backward()
    assert model.head_cls.weight.grad.abs().sum() > 0 and model.norm_cls.weight.grad.abs().sum() > 0
    assert model.cls_token.grad.abs().sum() > 0
    torch.manual_seed(1)
    again = create_model("uniformer_light_nano", drop_path_rate=0.1).train()
    again.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    torch.testing.assert_close(again(x, both_heads=True)[0], logits, rtol=0, atol=0)


def test_reset_classifier_resets_both_heads():
    model = create_model("uniformer_light_nano")
    model.reset_classifier(3)
    assert model.head.out_features == model.head_cls.out_features == 3
    model.reset_classifier(0)
    out = model(torch.randn(1, 1, 28, 28), both_heads=True)
    assert out[0].shape == out[1].shape == (1, 128)


@pytest.mark.parametrize("size", [32, 100, 128])
def test_sizes_other_than_the_default(size):
    model = create_model("uniformer_xxs", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 5)


@pytest.mark.slow  # torch.compile
def test_compiles():
    model = create_model("uniformer_light_nano").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="eager")(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(img_size=28), r"input size 28x28 is too small"),
    (dict(patch_sizes=(2, 2, 2, 2)), r"patch_sizes\[0\] must be 4"),
    (dict(prune_ratios=[[0.5] * 8, [0.5] * 2]), r"prune_ratios\[2\]\[0\] must be 1"),
    (dict(prune_ratios=[[1] * 8, [0.5] * 2]), r"prune_ratios\[2\]\[-1\] must be < 1"),
    (dict(trade_offs=[[0.5] * 8]), r"trade_offs needs one entry per block of stages 3 and 4 \(lengths \(8, 2\)\)"),
    (dict(prune_ratios=[[1] + [1.5] * 7, [0.5] * 2]), r"prune_ratio must be in \(0, 1\], got 1.5"),
    (dict(depths=(2, 5, 8)), r"need 4 entries"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        create_model("uniformer_xxs", **kwargs)
    if "img_size" in kwargs:
        with pytest.raises(ValueError, match="input size 28x29 is too small"), torch.device("meta"):
            create_model("uniformer_xxs")(torch.empty(1, 3, 28, 29))
