"""UniFormer video: official sizes, FLOPs and key layout, the 3D blocks against their equations (written from
Sense-X/UniFormer video_classification/slowfast/models/uniformer.py at 52a0415), inflation of image weights, 5-D
feature maps, gradient checkpointing and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from references import attention_ref, mlp_ref

from visionmix.models import create_model, list_models, model_entry
from visionmix.models.uniformer import UniFormer
from visionmix.models.uniformer_video import SplitSABlock3d, UniFormerVideo, inflate_weight

VIDEO = list_models(module="uniformer_video", exclude_filters="*nano")


def _ln(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _bn(x, bn):
    shape = (1, -1, 1, 1, 1)
    return ((x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps) * bn.weight.view(shape)
            + bn.bias.view(shape))


def _dw(x, conv):
    k = conv.weight.shape[-1]
    return F.conv3d(x, conv.weight, conv.bias, padding=k // 2, groups=x.shape[1])


def _pw(x, conv):
    return torch.einsum("oc,bcthw->bothw", conv.weight[:, :, 0, 0, 0], x) + conv.bias.view(1, -1, 1, 1, 1)


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def block_ref(block, x):
    """Local MHRA (eqs. 1-4) or global MHRA over all T*H*W tokens (eqs. 1-3), or the split form, in 3D."""
    x = x + _dw(x, block.pos_embed)
    b, c, t, h, w = x.shape
    if hasattr(block, "conv1"):
        x = x + _pw(_dw(_pw(_bn(x, block.norm1), block.conv1), block.attn), block.conv2)
        return x + _pw(_gelu(_pw(_bn(x, block.norm2), block.mlp.fc1)), block.mlp.fc2)
    tokens = x.flatten(2).transpose(1, 2)  # (B, THW, C), index t*HW + y*W + x
    if isinstance(block, SplitSABlock3d):
        grid = tokens.reshape(b, t, h * w, c)
        per_pos = grid.transpose(1, 2).reshape(b * h * w, t, c)
        a = per_pos + attention_ref(_ln(per_pos, block.t_norm), block.t_attn)
        a = a.reshape(b, h * w, t, c).transpose(1, 2).reshape(b * t, h * w, c)
        y = grid.reshape(b * t, h * w, c) + attention_ref(_ln(a, block.norm1), block.attn)
        y = y.reshape(b, t * h * w, c)
    else:
        y = tokens + attention_ref(_ln(tokens, block.norm1), block.attn)
    y = y + mlp_ref(_ln(y, block.norm2), block.mlp)
    return y.transpose(1, 2).reshape(b, c, t, h, w)


def video_ref(model: UniFormerVideo, x):
    n_stages = len(model.feature_info)
    for i in range(1, n_stages + 1):
        embed = getattr(model, f"patch_embed{i}")
        k = embed.proj.kernel_size
        x = F.conv3d(x, embed.proj.weight, embed.proj.bias, stride=embed.proj.stride, padding=(k[0] // 2, 0, 0))
        x = _ln(x.permute(0, 2, 3, 4, 1), embed.norm).permute(0, 4, 1, 2, 3)
        for block in getattr(model, f"blocks{i}"):
            x = block_ref(block, x)
    feats = _bn(x, model.norm)
    return feats, feats.mean((2, 3, 4)) @ model.head.weight.T + model.head.bias


def _randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.2 if p.ndim > 1 else 0.5))
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model


# ------------------------------------------------------------------------------------------------ sizes, layout
@pytest.mark.slow
@pytest.mark.parametrize("name", VIDEO)
def test_params_and_flops_per_view_equal_official(name, model_stats):
    """Params as the official module counts them (small 21,400,400 and base 49,813,200 at 400 classes); MACs of
    one view within 2% of the README's FLOPs / views (16x1x4 -> 4 views, 16x3x1 -> 3)."""
    ref, stats = model_entry(name), model_stats(name)
    classes = ref.cfg["num_classes"]
    assert stats.params == ref.reference.params
    assert stats.params - 513 * (classes - 400) == (21_400_400 if "small" in name else 49_813_200)
    if ref.reference.gmacs is not None:
        assert stats.macs / 1e9 == pytest.approx(ref.reference.gmacs, rel=0.02)


def _official_keys(depths, dims=(64, 128, 320, 512), classes=400):
    def conv(p, o, i, k):
        return [(f"{p}.weight", (o, i, *k)), (f"{p}.bias", (o,))]

    def bn(p, c):
        return [(f"{p}.weight", (c,)), (f"{p}.bias", (c,)), (f"{p}.running_mean", (c,)), (f"{p}.running_var", (c,)),
                (f"{p}.num_batches_tracked", ())]

    def ln(p, c):
        return [(f"{p}.weight", (c,)), (f"{p}.bias", (c,))]

    def lin(p, o, i):
        return [(f"{p}.weight", (o, i)), (f"{p}.bias", (o,))]

    rows = []
    for i, (c_in, c) in enumerate(zip((3, *dims[:-1]), dims, strict=True), start=1):
        rows += ln(f"patch_embed{i}.norm", c)
        rows += conv(f"patch_embed{i}.proj", c, c_in, (3, 4, 4) if i == 1 else (1, 2, 2))
    for i, (depth, c) in enumerate(zip(depths, dims, strict=True), start=1):
        for j in range(depth):
            p = f"blocks{i}.{j}"
            rows += conv(f"{p}.pos_embed", c, 1, (3, 3, 3))
            if i <= 2:
                rows += bn(f"{p}.norm1", c) + conv(f"{p}.conv1", c, c, (1, 1, 1)) + conv(f"{p}.conv2", c, c, (1, 1, 1))
                rows += conv(f"{p}.attn", c, 1, (5, 5, 5)) + bn(f"{p}.norm2", c)
                rows += conv(f"{p}.mlp.fc1", 4 * c, c, (1, 1, 1)) + conv(f"{p}.mlp.fc2", c, 4 * c, (1, 1, 1))
            else:
                rows += ln(f"{p}.norm1", c) + lin(f"{p}.attn.qkv", 3 * c, c) + lin(f"{p}.attn.proj", c, c)
                rows += ln(f"{p}.norm2", c) + lin(f"{p}.mlp.fc1", 4 * c, c) + lin(f"{p}.mlp.fc2", c, 4 * c)
    return rows + bn("norm", dims[-1]) + lin("head", classes, dims[-1])


@pytest.mark.parametrize("name, depths", [("uniformer_small_k400_8x8", (3, 4, 8, 3)),
                                          ("uniformer_base_k400_16x4", (5, 8, 20, 7))])
def test_official_layout(name, depths):
    with torch.device("meta"):
        model = create_model(name)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == _official_keys(depths)


def test_split_layout_and_init():
    model = create_model("uniformer_video_nano", split=True)
    block = model.blocks2[0]
    assert [n for n, _ in block.named_children()][:5] == ["pos_embed", "t_norm", "t_attn", "norm1", "attn"]
    assert torch.all(block.t_attn.qkv.weight == 0) and torch.all(block.t_attn.proj.weight == 1)


# ------------------------------------------------------------------------------------------------ equations
@pytest.mark.parametrize("split", [False, True])
def test_nano_matches_the_equations(split):
    torch.manual_seed(0)
    model = _randomize(create_model("uniformer_video_nano", split=split).double()).eval()
    x = torch.randn(2, 1, 6, 28, 20, dtype=torch.float64)
    with torch.no_grad():
        feats, logits = video_ref(model, x)
        torch.testing.assert_close(model.forward_features(x), feats, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model(x), logits, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_small_matches_the_equations():
    """UniFormer-S video at 8x64x64 (every stage and block of the official configuration, a small clip)."""
    model = _randomize(create_model("uniformer_small_k400_8x8").double()).eval()
    x = torch.randn(1, 3, 8, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), video_ref(model, x)[1], rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------ inflation
@pytest.mark.parametrize("kt, stride", [(3, 1), (5, 1), (3, 2), (1, 1)])
def test_inflate_weight_law_per_conv(kt, stride):
    """On a clip of identical frames the average-inflated conv gives (taps inside the clip / kt) x the 2D
    response plus the bias: the 2D response itself away from the borders. Centre inflation gives it everywhere."""
    torch.manual_seed(0)
    w2, bias = torch.randn(6, 4, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    frame = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    frames = 8
    clip = frame.unsqueeze(2).expand(-1, -1, frames, -1, -1)
    image = F.conv2d(frame, w2, padding=1)
    for center in (False, True):
        out = F.conv3d(clip, inflate_weight(w2, kt, center=center), bias, stride=(stride, 1, 1),
                       padding=(kt // 2, 1, 1))
        for t in range(out.shape[2]):
            start = t * stride - kt // 2
            inside = sum(0 <= start + j < frames for j in range(kt))
            scale = 1.0 if center else inside / kt
            torch.testing.assert_close(out[:, :, t], scale * image + bias.view(1, -1, 1, 1), rtol=1e-12, atol=1e-12)


def _image_twin() -> UniFormer:
    return UniFormer(depths=(2, 4), embed_dims=(64, 128), patch_sizes=(4, 1), num_conv_stages=1, head_dim=32,
                     in_chans=1, num_classes=10).double()


def test_centre_inflated_model_on_identical_frames_gives_the_image_features():
    """The property that makes inflation correct: T copies of a frame give, at every time step, the image model's
    features of that frame (attention over T copies of each key averages identical values). It holds exactly for
    centre inflation; the official average inflation scales the border frames of every temporal conv (previous
    test), so there only the interior of a long clip matches."""
    torch.manual_seed(0)
    image = _randomize(_image_twin()).eval()
    video = create_model("uniformer_video_nano").double().eval()
    video.load_state_dict(video.inflate(image.state_dict(), center=True))
    frame = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    clip = frame.unsqueeze(2).expand(-1, -1, 6, -1, -1)
    with torch.no_grad():
        want = image.forward_features(frame)
        got = video.forward_features(clip)
        assert got.shape == (2, 128, 3, 7, 7)
        for t in range(3):
            torch.testing.assert_close(got[:, :, t], want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(video(clip), image(frame), rtol=1e-10, atol=1e-10)


def test_create_model_inflates_an_image_checkpoint_and_says_so(tmp_path):
    torch.manual_seed(0)
    image = create_model("uniformer_small")
    path = tmp_path / "in1k.pth"
    torch.save({"model": image.state_dict()}, path)
    with pytest.warns(UserWarning, match=r"inflated an image checkpoint to video: \d+ 2D kernels .* its 1000-class "
                                         r"head replaced by a fresh 400-class one"):
        video = create_model("uniformer_small_k400_8x8", checkpoint_path=str(path))
    state = image.state_dict()
    torch.testing.assert_close(video.blocks1[0].attn.weight, inflate_weight(state["blocks1.0.attn.weight"], 5))
    torch.testing.assert_close(video.patch_embed1.proj.weight, inflate_weight(state["patch_embed1.proj.weight"], 3))
    torch.testing.assert_close(video.blocks3[0].attn.qkv.weight, state["blocks3.0.attn.qkv.weight"])
    assert video.head.weight.shape == (400, 512)
    again = tmp_path / "video.pth"
    torch.save(video.state_dict(), again)
    create_model("uniformer_small_k400_8x8", checkpoint_path=str(again))  # a video checkpoint loads as it is


# ------------------------------------------------------------------------------------------------ model API
def test_features_are_5d_maps_and_checkpointing_changes_nothing():
    torch.manual_seed(0)
    model = create_model("uniformer_video_nano", drop_path_rate=0.1)
    x = torch.randn(2, 1, 4, 28, 28)
    features = create_model("uniformer_video_nano", features_only=True).eval()
    assert [tuple(t.shape) for t in features(x)] == [(2, 64, 2, 7, 7), (2, 128, 2, 7, 7)]
    nhwc = model.eval().forward_intermediates(x, indices=[-1], output_fmt="NHWC", intermediates_only=True)[0]
    assert nhwc.shape == (2, 2, 7, 7, 128)
    model.train()
    outs, grads = [], []
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        model.zero_grad()
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # torch.compile of a 3D model
def test_cfg_and_compile():
    model = create_model("uniformer_small_k400_16x4", num_frames=8, img_size=160, num_classes=7)
    assert model.pretrained_cfg["input_size"] == (3, 8, 160, 160) and model.pretrained_cfg["num_classes"] == 7
    assert model.pretrained_cfg["first_conv"] == "patch_embed1.proj"
    nano = create_model("uniformer_video_nano").eval()
    x = torch.randn(1, 1, 4, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(nano, backend="eager")(x), nano(x), rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named():
    nano = create_model("uniformer_video_nano")
    with pytest.raises(ValueError, match=r"expected a 5D NCTHW input"):
        nano(torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match=r"input size 30x28 must be divisible by the model's total stride 4"):
        nano(torch.randn(1, 1, 4, 30, 28))
    with pytest.raises(ValueError, match=r"time must be a positive integer"):
        inflate_weight(torch.zeros(1, 1, 3, 3), 0)
    with pytest.raises(ValueError, match=r"weight must be a 2D conv kernel"):
        inflate_weight(torch.zeros(1, 3, 3), 3)
