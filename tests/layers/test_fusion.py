"""The pure fusion transforms (DBB I-VI, RepMLP conv -> FC) against the layer sequences they replace, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visionmix.layers.fusion import (
    add_branches,
    avg_pool_kernel,
    bn_affine,
    conv2d_from_kernel,
    conv_to_fc,
    fuse_bn_linear,
    fuse_conv_bn,
    merge_1x1_kxk,
    pad_kernel,
    square_conv_geometry,
)
from visionmix.reparam import randomize_batchnorm

F64 = torch.float64


def eval_bn(features: int, seed: int = 0, cls: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
    return randomize_batchnorm(cls(features).double(), seed).eval()


def test_bn_affine_matches_eval_bn_and_handles_non_affine():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 4, dtype=F64)
    for bn in (eval_bn(5), randomize_batchnorm(nn.BatchNorm2d(5, affine=False).double()).eval()):
        scale, shift = bn_affine(bn)
        torch.testing.assert_close(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), bn(x), rtol=0, atol=1e-13)


def test_fusing_a_bn_without_running_stats_is_a_clear_error():
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="without running statistics"):
        fuse_conv_bn(torch.randn(4, 2, 3, 3), bn)


@pytest.mark.parametrize("groups, conv_bias", [(1, False), (2, True)])
def test_fuse_conv_bn(groups, conv_bias):
    torch.manual_seed(0)
    weight, bias = torch.randn(6, 4 // groups, 3, 3, dtype=F64), torch.randn(6, dtype=F64) if conv_bias else None
    bn, x = eval_bn(6), torch.randn(2, 4, 7, 7, dtype=F64)
    kernel, fused_bias = fuse_conv_bn(weight, bn, bias)
    expected = bn(F.conv2d(x, weight, bias, padding=1, groups=groups))
    torch.testing.assert_close(F.conv2d(x, kernel, fused_bias, padding=1, groups=groups), expected, rtol=0, atol=1e-12)


def test_fuse_conv_bn1d_on_fc_weight():
    torch.manual_seed(0)
    weight, bn, x = torch.randn(6, 4, 1, 1, dtype=F64), eval_bn(6, cls=nn.BatchNorm1d), torch.randn(5, 4, dtype=F64)
    kernel, bias = fuse_conv_bn(weight, bn)
    torch.testing.assert_close(F.linear(x, kernel.flatten(1), bias), bn(x @ weight.flatten(1).T), rtol=0, atol=1e-12)


def test_fuse_bn_linear_folds_a_preceding_bn():
    torch.manual_seed(0)
    bn, fc = eval_bn(3), nn.Linear(3 * 4, 5).double()
    x = torch.randn(2, 3, 2, 2, dtype=F64)
    weight, bias = fuse_bn_linear(bn, fc.weight, fc.bias, features_per_channel=4)
    torch.testing.assert_close(F.linear(x.flatten(1), weight, bias), fc(bn(x).flatten(1)), rtol=0, atol=1e-12)


def test_add_branches_is_branch_addition():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    branches = [(torch.randn(4, 3, 3, 3, dtype=F64), torch.randn(4, dtype=F64)) for _ in range(3)]
    kernel, bias = add_branches(*branches)
    expected = sum(F.conv2d(x, k, b, padding=1) for k, b in branches)
    torch.testing.assert_close(F.conv2d(x, kernel, bias, padding=1), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cin, mid, cout, groups, k, stride, padding", [
    (4, 4, 6, 1, 3, 1, 1),
    (4, 6, 8, 2, 3, 2, 1),  # grouped, mid != in
    (6, 12, 6, 6, 5, 1, 2),  # depthwise with 2x internal channels
    (4, 8, 4, 1, 3, 1, 0),
])
def test_merge_1x1_kxk_matches_the_sequence_on_zero_padded_input(cin, mid, cout, groups, k, stride, padding):
    """Transform III is exact when the 1x1 stage sees the zero-padded input (what BN-and-pad reproduces)."""
    torch.manual_seed(0)
    k1, b1 = torch.randn(mid, cin // groups, 1, 1, dtype=F64), torch.randn(mid, dtype=F64)
    k2, b2 = torch.randn(cout, mid // groups, k, k, dtype=F64), torch.randn(cout, dtype=F64)
    x = torch.randn(2, cin, 9, 8, dtype=F64)
    expected = F.conv2d(F.conv2d(F.pad(x, [padding] * 4), k1, b1, groups=groups), k2, b2, stride, groups=groups)
    kernel, bias = merge_1x1_kxk(k1, b1, k2, b2, groups)
    assert kernel.shape == (cout, cin // groups, k, k)
    torch.testing.assert_close(F.conv2d(x, kernel, bias, stride, padding, groups=groups), expected, rtol=0, atol=1e-12)


def test_merge_1x1_kxk_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="reads 3x1 channels but the 1x1 kernel makes 4"):
        merge_1x1_kxk(torch.randn(4, 2, 1, 1), torch.randn(4), torch.randn(5, 3, 3, 3), torch.randn(5))


@pytest.mark.parametrize("channels, groups, k, stride, padding", [(4, 1, 3, 1, 1), (6, 2, 3, 2, 0), (5, 5, 5, 1, 2)])
def test_avg_pool_kernel_is_avg_pool(channels, groups, k, stride, padding):
    torch.manual_seed(0)
    x = torch.randn(2, channels, 8, 7, dtype=F64)
    kernel = avg_pool_kernel(channels, k, groups, dtype=F64)
    assert kernel.shape == (channels, channels // groups, k, k)
    expected = F.avg_pool2d(x, k, stride, padding)  # count_include_pad=True: zero padding counts
    torch.testing.assert_close(F.conv2d(x, kernel, None, stride, padding, groups=groups), expected, rtol=0, atol=1e-13)


def test_pad_kernel_centres_a_small_kernel():
    torch.manual_seed(0)
    x, small = torch.randn(1, 3, 6, 6, dtype=F64), torch.randn(4, 3, 3, 3, dtype=F64)
    big = pad_kernel(small, 7)
    assert big.shape == (4, 3, 7, 7) and pad_kernel(small, 3) is small
    torch.testing.assert_close(F.conv2d(x, big, padding=3), F.conv2d(x, small, padding=1), rtol=0, atol=1e-13)


@pytest.mark.parametrize("cin, cout, groups, h, w, k", [(4, 6, 1, 3, 4, 3), (4, 6, 2, 4, 4, 5), (6, 6, 3, 2, 3, 1)])
def test_conv_to_fc_in_float64(cin, cout, groups, h, w, k):
    torch.manual_seed(0)
    kernel, bias = torch.randn(cout, cin // groups, k, k, dtype=F64), torch.randn(cout, dtype=F64)
    x = torch.randn(5, cin, h, w, dtype=F64)
    weight, fc_bias = conv_to_fc(kernel, bias, h, w, groups)
    assert weight.dtype == F64 and weight.shape == (cout * h * w, cin * h * w // groups)
    # slow reference: the grouped FC as one matmul per group
    xs = x.flatten(1).chunk(groups, dim=1)
    ws = weight.chunk(groups, dim=0)
    fc = torch.cat([xg @ wg.T for xg, wg in zip(xs, ws, strict=True)], dim=1) + fc_bias
    conv = F.conv2d(x, kernel, bias, padding=k // 2, groups=groups).flatten(1)
    torch.testing.assert_close(fc, conv, rtol=0, atol=1e-12)


def test_conv2d_from_kernel_copies_kernel_and_geometry():
    kernel, bias = torch.randn(6, 2, 3, 3, dtype=F64), torch.randn(6, dtype=F64)
    conv = conv2d_from_kernel(kernel, bias, stride=2, padding=1, groups=2)
    assert (conv.in_channels, conv.out_channels, conv.stride, conv.padding, conv.groups) == (4, 6, (2, 2), (1, 1), 2)
    assert conv.weight.dtype == F64 and torch.equal(conv.weight, kernel) and torch.equal(conv.bias, bias)
    assert conv.weight.data_ptr() != kernel.data_ptr()
    assert conv2d_from_kernel(kernel, None).bias is None


def test_square_conv_geometry():
    assert square_conv_geometry(nn.Conv2d(2, 2, 5, 2, padding="valid")) == (5, 2, 0, 1)
    assert square_conv_geometry(nn.Conv2d(2, 2, 3, padding="same", dilation=2)) == (3, 1, 2, 2)
    for conv in (nn.Conv2d(2, 2, (3, 1)), nn.Conv2d(2, 2, 3, (1, 2)), nn.Conv2d(2, 2, 4, padding="same"),
                 nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")):
        with pytest.raises(ValueError, match="expected a square kernel"):
            square_conv_geometry(conv)
