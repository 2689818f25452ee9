"""What every model shares, checked on every nano model the same way: timm's head API (forward_features,
forward_head(pre_logits=True), reset_classifier, get_classifier) and torch.compile without a graph break."""

from __future__ import annotations

import pytest
import torch

from visionmix.export import randomize_weights
from visionmix.models import create_model, list_models

NANOS = list_models("*nano*")


def _nano(name: str, **kwargs) -> tuple[torch.nn.Module, torch.Tensor]:
    """``name`` with random weights and BN statistics (zero-initialised heads would hide a wrong head), and a batch."""
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    return randomize_weights(model, torch.randn(8, *x.shape[1:])), x


@pytest.mark.parametrize("name", NANOS)
def test_head_api(name):
    model, x = _nano(name, num_classes=5)
    cfg = model.pretrained_cfg
    assert model.get_classifier() is model.get_submodule(cfg["classifier"]) and model(x).shape == (2, 5)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(model.get_classifier()(pooled), model(x))  # logits = classifier(pre-logits)
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), pooled)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.get_classifier().out_features == 7 == cfg["num_classes"]
    assert model.get_classifier() is model.get_submodule(cfg["classifier"])


@pytest.mark.slow
@pytest.mark.parametrize("name", NANOS)
def test_compiles_without_graph_breaks(name):
    model, x = _nano(name)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, backend="eager", fullgraph=True)(x), model(x))
