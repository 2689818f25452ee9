"""timm's six model tests over the whole registry, written from timm's ``tests/test_models.py`` at
huggingface/pytorch-image-models@aa4b5850c1543fa488abf260f18390eda46cf85d (2026-08-08; timm does not import beside
this torch, so the bodies are ported, not loaded).

Ported unchanged: the input sizes (``_get_input_size`` with timm's targets: forward at up to 384 px, so 224 px
models run at 224; backward at 128, feature extraction at 96; fixed-size models at their size, and models whose cfg
states a ``min_input_size`` - S2-MLPv2, UniFormer, SPACH - at that size, as timm does), batch sizes, tolerances and
assertions of ``test_model_forward``, ``test_model_backward``, ``test_model_default_cfgs`` (the ``_non_std`` variant
for the models timm's ``NON_STD_FILTERS`` name: the Mixers, whose features are (B, N, C)),
``test_model_forward_features``, ``test_model_forward_intermediates_features`` and
``test_model_forward_intermediates``; on every image model (the UniFormer video models have their own tests), the
backward test asking UniFormer-light for both heads. ``timm.models.FeatureInfo(model.feature_info, n)`` is read
through our own ``feature_info`` getters. Stricter than timm: every test runs on every model (timm skips
``test_model_forward_features`` for its non-standard models); ``EXCLUDE_FILTERS`` match none of ours. Out of scope:
timm's TorchScript and FX tests (no model passes them: ``torch.jit.script`` rejects keyword-only layer arguments, FX
tracing the input checks' Python control flow; ``torch.export`` is this project's path), ``test_model_inference``
and the pretrained-weight tests (they download from the Hub; tests/models/test_pretrained.py serves weights
locally instead).
"""

from __future__ import annotations

import fnmatch
import math

import pytest
import torch

from visionmix.models import create_model, list_models, model_entry
from visionmix.models._base import FeatureListNet

# Every image model of the zoo. The UniFormer video models are left out on purpose: timm has no video models and its
# tests feed (B, C, H, W) images; tests/models/test_uniformer_video.py holds their checks.
MODELS = [name for name in list_models() if len(model_entry(name).cfg["input_size"]) == 3]
pytestmark = pytest.mark.slow  # ~20 min of CPU over the zoo: make test runs it, make test-fast does not



NON_STD_FILTERS = [
    'vit_*', 'naflexvit*', 'tnt_*', 'pit_*', 'coat_*', 'cait_*', '*mixer_*', 'gmlp_*', 'resmlp_*', 'twins_*',
    'convit_*', 'levit*', 'visformer*', 'deit*', 'xcit_*', 'crossvit_*', 'beit*', 'aimv2*', 'swiftformer_*',
    'poolformer_*', 'volo_*', 'sequencer2d_*', 'mvitv2*', 'gcvit*', 'efficientformer*', 'sam_hiera*',
    'eva_*', 'flexivit*', 'eva02*', 'samvit_*', 'efficientvit_m*', 'tiny_vit_*', 'hiera_*', 'vitamin*', 'test_vit*',
    'gemma4_vit*',
]
TARGET_FWD_SIZE = MAX_FWD_SIZE = 384
TARGET_BWD_SIZE = 128
MAX_BWD_SIZE = 320
MAX_FWD_OUT_SIZE = 448
TARGET_FFEAT_SIZE = 96
MAX_FFEAT_SIZE = 256
torch_device = "cpu"


def get_pretrained_cfg_value(model_name: str, key: str):
    return model_entry(model_name).cfg.get(key)


def get_spatial_dim(fmt: str) -> tuple[int, ...]:
    return {"NLC": (1,), "NCL": (2,), "NHWC": (1, 2)}.get(fmt, (2, 3))


def get_channel_dim(fmt: str) -> int:
    return {"NHWC": 3, "NLC": 2}.get(fmt, 1)


def _get_input_size(model=None, model_name='', target=None):
    if model is None:
        assert model_name, "One of model or model_name must be provided"
        input_size = get_pretrained_cfg_value(model_name, 'input_size')
        fixed_input_size = get_pretrained_cfg_value(model_name, 'fixed_input_size')
        min_input_size = get_pretrained_cfg_value(model_name, 'min_input_size')
    else:
        default_cfg = model.default_cfg
        input_size = default_cfg['input_size']
        fixed_input_size = default_cfg.get('fixed_input_size', None)
        min_input_size = default_cfg.get('min_input_size', None)
    assert input_size is not None

    if fixed_input_size:
        return input_size

    if min_input_size:
        if target and max(input_size) > target:
            input_size = min_input_size
    else:
        if target and max(input_size) > target:
            input_size = tuple([min(x, target) for x in input_size])
    return input_size


@pytest.mark.parametrize('model_name', MODELS)
@pytest.mark.parametrize('batch_size', [1])
def test_model_forward(model_name, batch_size):
    """Run a single forward pass with each model"""
    model = create_model(model_name, pretrained=False)
    model.eval()

    input_size = _get_input_size(model=model, target=TARGET_FWD_SIZE)
    if max(input_size) > MAX_FWD_SIZE:
        pytest.skip("Fixed input size model > limit.")
    inputs = torch.randn((batch_size, *input_size))
    inputs = inputs.to(torch_device)
    model.to(torch_device)
    outputs = model(inputs)

    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any(), 'Output included NaNs'

    # Test that grad-checkpointing, if supported, doesn't cause model failures or change in output
    try:
        model.set_grad_checkpointing()
    except Exception:
        # throws if not supported, that's fine
        pass
    else:
        outputs2 = model(inputs)
        if isinstance(outputs, tuple):
            outputs2 = torch.cat(outputs2)
        assert torch.allclose(outputs, outputs2, rtol=1e-4, atol=1e-5), 'Output does not match'


@pytest.mark.parametrize('model_name', MODELS)
@pytest.mark.parametrize('batch_size', [2])
def test_model_backward(model_name, batch_size):
    """Run a single forward pass with each model"""
    input_size = _get_input_size(model_name=model_name, target=TARGET_BWD_SIZE)
    if max(input_size) > MAX_BWD_SIZE:
        pytest.skip("Fixed input size model > limit.")

    model = create_model(model_name, pretrained=False, num_classes=42)
    encoder_only = model.num_classes == 0  # FIXME better approach?
    num_params = sum([x.numel() for x in model.parameters()])
    model.train()

    inputs = torch.randn((batch_size, *input_size))
    inputs = inputs.to(torch_device)
    model.to(torch_device)
    # UniFormer-light's class-token head learns only from its training output, both heads (model(x, both_heads=True),
    # the official engine_light.py's): timm's own distilled models return such a tuple in train mode too.
    outputs = model(inputs, both_heads=True) if hasattr(model, "head_cls") else model(inputs)
    if isinstance(outputs, tuple):
        outputs = torch.cat(outputs)
    outputs.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f'No gradient for {n}'
    num_grad = sum([x.grad.numel() for x in model.parameters() if x.grad is not None])

    if encoder_only:
        output_fmt = getattr(model, 'output_fmt', 'NCHW')
        feat_axis = get_channel_dim(output_fmt)
        assert outputs.shape[feat_axis] == model.num_features, \
            f'unpooled feature dim {outputs.shape[feat_axis]} != model.num_features {model.num_features}'
    else:
        assert outputs.shape[-1] == 42
    assert num_params == num_grad, 'Some parameters are missing gradients'
    assert not torch.isnan(outputs).any(), 'Output included NaNs'


@pytest.mark.parametrize('model_name', MODELS)
@pytest.mark.parametrize('batch_size', [1])
def test_model_default_cfgs(model_name, batch_size):
    """timm's ``test_model_default_cfgs``, or ``test_model_default_cfgs_non_std`` for its non-standard models."""
    if any(fnmatch.fnmatch(model_name, f) for f in NON_STD_FILTERS):
        _default_cfgs_non_std(model_name, batch_size)
    else:
        _default_cfgs(model_name, batch_size)


def _default_cfgs(model_name, batch_size):
    model = create_model(model_name, pretrained=False)
    model.eval()
    model.to(torch_device)
    assert model.num_classes >= 0
    assert model.num_features > 0
    assert model.head_hidden_size > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg

    pool_size = cfg['pool_size']
    input_size = model.default_cfg['input_size']
    output_fmt = getattr(model, 'output_fmt', 'NCHW')
    spatial_axis = get_spatial_dim(output_fmt)
    assert len(spatial_axis) == 2  # TODO add 1D sequence support
    feat_axis = get_channel_dim(output_fmt)

    if all([x <= MAX_FWD_OUT_SIZE for x in input_size]):
        # output sizes only checked if default res <= 448 * 448 to keep resource down
        input_size = tuple([min(x, MAX_FWD_OUT_SIZE) for x in input_size])
        input_tensor = torch.randn((batch_size, *input_size), device=torch_device)

        # test forward_features (always unpooled) & forward_head w/ pre_logits
        outputs = model.forward_features(input_tensor)
        outputs_pre = model.forward_head(outputs, pre_logits=True)
        assert outputs.shape[spatial_axis[0]] == pool_size[0], f'unpooled feature shape {outputs.shape} != config'
        assert outputs.shape[spatial_axis[1]] == pool_size[1], f'unpooled feature shape {outputs.shape} != config'
        assert outputs.shape[feat_axis] == model.num_features, \
            f'unpooled feature dim {outputs.shape[feat_axis]} != model.num_features {model.num_features}'
        assert outputs_pre.shape[1] == model.head_hidden_size, \
            f'pre_logits feature dim {outputs_pre.shape[1]} != model.head_hidden_size {model.head_hidden_size}'

        # test forward after deleting the classifier, output should be poooled, size(-1) == model.num_features
        model.reset_classifier(0)
        assert model.num_classes == 0, \
            f'Expected num_classes to be 0 after reset_classifier(0), but got {model.num_classes}'
        model.to(torch_device)
        outputs = model.forward(input_tensor)
        assert len(outputs.shape) == 2
        assert outputs.shape[1] == model.head_hidden_size, \
            f'feature dim w/ removed classifier {outputs.shape[1]} != model.head_hidden_size {model.head_hidden_size}'
        assert outputs.shape == outputs_pre.shape, \
            f'output shape of pre_logits {outputs_pre.shape} does not match reset_head(0) {outputs.shape}'

        # test model forward after removing pooling and classifier (no visionmix model pools early)
        model.reset_classifier(0, '')  # reset classifier and disable global pooling
        model.to(torch_device)
        outputs = model.forward(input_tensor)
        assert len(outputs.shape) == 4
        assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]

        # test classifier + global pool deletion via __init__
        model = create_model(model_name, pretrained=False, num_classes=0, global_pool='').eval()
        model.to(torch_device)
        outputs = model.forward(input_tensor)
        assert len(outputs.shape) == 4
        assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]

    _check_cfg_names(cfg, state_dict)


def _default_cfgs_non_std(model_name, batch_size):
    model = create_model(model_name, pretrained=False)
    model.eval()
    model.to(torch_device)
    assert model.num_classes >= 0
    assert model.num_features > 0
    assert model.head_hidden_size > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg

    input_size = _get_input_size(model=model)
    if max(input_size) > 320:  # FIXME const
        pytest.skip("Fixed input size model > limit.")

    input_tensor = torch.randn((batch_size, *input_size), device=torch_device)
    feat_dim = getattr(model, 'feature_dim', None)

    outputs = model.forward_features(input_tensor)
    outputs_pre = model.forward_head(outputs, pre_logits=True)
    if isinstance(outputs, tuple | list):
        # cannot currently verify multi-tensor output.
        pass
    else:
        if feat_dim is None:
            feat_dim = -1 if outputs.ndim == 3 else 1
        assert outputs.shape[feat_dim] == model.num_features
        assert outputs_pre.shape[1] == model.head_hidden_size

    # test forward after deleting the classifier, output should be poooled, size(-1) == model.num_features
    model.reset_classifier(0)
    assert model.num_classes == 0, \
        f'Expected num_classes to be 0 after reset_classifier(0), but got {model.num_classes}'
    model.to(torch_device)
    outputs = model.forward(input_tensor)
    if isinstance(outputs, tuple | list):
        outputs = outputs[0]
    if feat_dim is None:
        feat_dim = -1 if outputs.ndim == 3 else 1
    assert outputs.shape[feat_dim] == model.head_hidden_size, 'pooled num_features != config'
    assert outputs.shape == outputs_pre.shape

    model = create_model(model_name, pretrained=False, num_classes=0).eval()
    model.to(torch_device)
    outputs = model.forward(input_tensor)
    if isinstance(outputs, tuple | list):
        outputs = outputs[0]
    if feat_dim is None:
        feat_dim = -1 if outputs.ndim == 3 else 1
    assert outputs.shape[feat_dim] == model.num_features

    _check_cfg_names(cfg, state_dict)


def _check_cfg_names(cfg, state_dict):
    # check classifier name matches default_cfg
    if cfg.get('num_classes', None):
        classifier = cfg['classifier']
        if not isinstance(classifier, tuple | list):
            classifier = (classifier,)
        for c in classifier:
            assert c + ".weight" in state_dict, f'{c} not in model params'

    # check first conv(s) names match default_cfg
    first_conv = cfg['first_conv']
    if isinstance(first_conv, str):
        first_conv = (first_conv,)
    assert isinstance(first_conv, tuple | list)
    for fc in first_conv:
        assert fc + ".weight" in state_dict, f'{fc} not in model params'


def _check_feature_maps(expected_channels, expected_reduction, outputs, input_size, batch_size, output_fmt):
    feat_axis = get_channel_dim(output_fmt)
    spatial_axis = get_spatial_dim(output_fmt)
    assert len(expected_channels) == len(outputs)
    spatial_size = input_size[-2:]
    for e, r, o in zip(expected_channels, expected_reduction, outputs, strict=False):
        assert e == o.shape[feat_axis]
        assert o.shape[spatial_axis[0]] <= math.ceil(spatial_size[0] / r) + 1
        assert o.shape[spatial_axis[1]] <= math.ceil(spatial_size[1] / r) + 1
        assert o.shape[0] == batch_size
        assert not torch.isnan(o).any()


@pytest.mark.parametrize('model_name', MODELS)
@pytest.mark.parametrize('batch_size', [1])
def test_model_forward_features(model_name, batch_size):
    """Run a single forward pass with each model in feature extraction mode"""
    model = create_model(model_name, pretrained=False, features_only=True)
    model.eval()
    expected_channels = model.feature_info.channels()
    expected_reduction = model.feature_info.reduction()
    assert len(expected_channels) >= 3  # all models here should have at least 3 default feat levels

    input_size = _get_input_size(model=model, target=TARGET_FFEAT_SIZE)
    if max(input_size) > MAX_FFEAT_SIZE:
        pytest.skip("Fixed input size model > limit.")
    output_fmt = getattr(model, 'output_fmt', 'NCHW')
    outputs = model(torch.randn((batch_size, *input_size)))
    _check_feature_maps(expected_channels, expected_reduction, outputs, input_size, batch_size, output_fmt)


@pytest.mark.parametrize('model_name', MODELS)
@pytest.mark.parametrize('batch_size', [1])
def test_model_forward_intermediates_features(model_name, batch_size):
    """Run a single forward pass with each model in feature extraction mode"""
    model = create_model(model_name, pretrained=False, features_only=True, feature_cls='getter')
    model.eval()
    expected_channels = model.feature_info.channels()
    expected_reduction = model.feature_info.reduction()

    input_size = _get_input_size(model=model, target=TARGET_FFEAT_SIZE)
    if max(input_size) > MAX_FFEAT_SIZE:
        pytest.skip("Fixed input size model > limit.")
    output_fmt = getattr(model, 'output_fmt', 'NCHW')
    outputs = model(torch.randn((batch_size, *input_size)))
    _check_feature_maps(expected_channels, expected_reduction, outputs, input_size, batch_size, output_fmt)


@pytest.mark.parametrize('model_name', MODELS)
@pytest.mark.parametrize('batch_size', [1])
def test_model_forward_intermediates(model_name, batch_size):
    """Run a single forward pass with each model in feature extraction mode"""
    model = create_model(model_name, pretrained=False)
    model.eval()
    expected_channels = model.feature_info.channels()
    expected_reduction = model.feature_info.reduction()
    assert len(expected_channels) >= 3  # all models here should have at least 3 feature levels

    input_size = _get_input_size(model=model, target=TARGET_FFEAT_SIZE)
    if max(input_size) > MAX_FFEAT_SIZE:
        pytest.skip("Fixed input size model > limit.")
    output_fmt = 'NCHW'  # NOTE output_fmt determined by forward_intermediates() arg, not model attribute

    inpt = torch.randn((batch_size, *input_size))
    output, intermediates = model.forward_intermediates(
        inpt,
        output_fmt=output_fmt,
    )
    _check_feature_maps(expected_channels, expected_reduction, intermediates, input_size, batch_size, output_fmt)

    output2 = model.forward_features(inpt)
    assert torch.allclose(output, output2)

    # Test that grad-checkpointing, if supported
    try:
        model.set_grad_checkpointing()
    except Exception:
        # throws if not supported, that's fine
        pass
    else:
        output3, _ = model.forward_intermediates(
            inpt,
            output_fmt=output_fmt,
        )
        assert torch.allclose(output, output3, rtol=1e-4, atol=1e-5), 'Output does not match'


# ------------------------------------------------------------------ what those tests take for granted, checked here
@pytest.mark.parametrize('name', MODELS)
def test_cfg_states_every_input_size_constraint(name):
    """timm's tests pick their input sizes from ``pretrained_cfg``, so it must state every constraint: a fixed-size
    model takes only ``input_size``; any other takes ``min_input_size`` and larger multiples of
    ``input_size_divisor``, and a side off the divisor or below the minimum is one ValueError. Shapes only (meta)."""
    with torch.device("meta"):
        model = create_model(name).eval()
        cfg = model.pretrained_cfg
        chans, height, width = cfg["input_size"]

        def run(h, w):
            return model(torch.empty(1, chans, h, w))

        run(height, width)
        step = cfg["input_size_divisor"]
        if cfg["fixed_input_size"]:
            assert cfg["min_input_size"] is None
            with pytest.raises(ValueError, match=f"expected input size {height}x{width}"):
                run(height + step, width)
            return
        assert height % step == 0 and width % step == 0
        run(height + step, width + 2 * step)
        if step > 1:
            with pytest.raises(ValueError, match="must be divisible by"):
                run(height + 1, width)
        if cfg["min_input_size"] is not None:
            min_chans, min_height, min_width = cfg["min_input_size"]
            assert min_chans == chans and min_height % step == 0 and min_width % step == 0
            run(min_height, min_width)
            if min_height > step:
                with pytest.raises(ValueError, match="smallest input"):
                    run(min_height - step, min_width)


def test_feature_cls_getter_is_the_only_kind():
    features = create_model("resnet_nano", features_only=True, feature_cls="getter")
    assert isinstance(features, FeatureListNet) and features.out_indices == [0, 1, 2, 3]
    for kind in ("hook", "fx", "dict"):
        with pytest.raises(ValueError, match=f"feature_cls='{kind}' is not supported: .* timm's 'getter' kind"):
            create_model("resnet_nano", features_only=True, feature_cls=kind)
    with pytest.raises(ValueError, match="feature_cls needs features_only=True"):
        create_model("resnet_nano", feature_cls="getter")
