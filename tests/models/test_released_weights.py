"""The table of released weights (``released_weights.json``, /work/coord/weights-schema.md) and the ImageNet-1k class
names shipped beside it: the schema, every entry against the model it names, the class-names file."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pytest
import torch

from visionmix.models import create_model, list_models, model_entry
from visionmix.models.pretrained import TABLE_FILE, released_weights

ENTRY_KEYS = {"name", "default", "hf_hub_id", "hf_filename", "hf_revision", "url", "file_format", "wrapped_under",
              "num_classes", "label_set", "input_size", "crop_pct", "interpolation", "mean", "std", "top1", "license",
              "sha256", "facts_from", "checked_against_download"}
MANUAL_KEYS = {"model", "tags", "pointer", "facts_from"}
LABEL_SET_CLASSES = {"imagenet-1k": 1000, "imagenet-21k": 21843, "imagenet-21k-p": 11221}


def _table() -> dict:
    return json.loads(resources.files("visionmix.models").joinpath(TABLE_FILE).read_text())


TABLE = _table()
ENTRIES = TABLE["weights"]


def test_the_table_follows_the_schema() -> None:
    assert set(TABLE) == {"format", "weights", "manual"} and TABLE["format"] == 1
    assert ENTRIES, "no released weights"
    names = [e["name"] for e in ENTRIES]
    assert len(names) == len(set(names)), "a name twice"
    for e in ENTRIES:
        assert set(e) == ENTRY_KEYS, e["name"]
        assert isinstance(e["default"], bool) and e["checked_against_download"] is False, e["name"]
        assert e["facts_from"] and all(u.startswith("https://") for u in e["facts_from"]), e["name"]
        assert e["sha256"] is None or re.fullmatch("[0-9a-f]{64}", e["sha256"]), e["name"]
        assert e["top1"] is None or 0 < e["top1"] < 100, e["name"]
        assert re.fullmatch("[a-z0-9.-]+", e["license"]), e["name"]
    assert set(released_weights()) == set(names)  # the loader reads every entry


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e["name"])
def test_an_entry_names_one_file_in_its_format(entry: dict) -> None:
    hub, url = entry["hf_hub_id"], entry["url"]
    assert (hub is None) != (url is None), "exactly one of hf_hub_id and url"
    if hub is not None:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", hub) and entry["hf_filename"] and entry["hf_revision"]
        file = entry["hf_filename"]
    else:
        assert url.startswith("https://") and entry["hf_filename"] is None and entry["hf_revision"] is None
        file = url.rsplit("/", 1)[-1]
    assert entry["file_format"] in ("safetensors", "pth") and file.endswith("." + entry["file_format"])
    assert entry["wrapped_under"] in (None, "model", "state_dict", "model_state")
    assert entry["file_format"] == "pth" or entry["wrapped_under"] is None, "a safetensors file is a flat dict"


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e["name"])
def test_an_entry_fits_its_registered_model(entry: dict) -> None:
    model_name, tag = entry["name"].split(".", 1)
    assert model_name in set(list_models()) and re.fullmatch(r"[a-z0-9_]+", tag)
    assert LABEL_SET_CLASSES[entry["label_set"]] == entry["num_classes"]
    assert list(model_entry(model_name).cfg["input_size"]) == entry["input_size"]
    with torch.device("meta"):  # shapes only: L/16 with a 21k head costs no memory
        model = create_model(model_name, num_classes=entry["num_classes"])
    head = model.get_classifier()
    assert tuple(head.weight.shape)[0] == entry["num_classes"]
    first_conv = model.get_submodule(model.pretrained_cfg["first_conv"])
    first_conv = first_conv if isinstance(first_conv, torch.nn.Conv2d) else first_conv[0]
    assert first_conv.in_channels == entry["input_size"][0]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e["name"])
def test_an_entrys_evaluation_settings_are_sane(entry: dict) -> None:
    channels = entry["input_size"][0]
    assert len(entry["mean"]) == len(entry["std"]) == channels
    assert all(0 <= m <= 1 for m in entry["mean"]) and all(0 < s <= 1 for s in entry["std"])
    assert 0.5 <= entry["crop_pct"] <= 1 and entry["interpolation"] in ("bicubic", "bilinear")


def test_each_model_has_one_default_tag() -> None:
    models = {e["name"].split(".", 1)[0] for e in ENTRIES}
    for model in models:
        assert sum(e["default"] for e in ENTRIES if e["name"].split(".", 1)[0] == model) == 1, model


def test_weights_no_client_can_fetch_have_a_pointer() -> None:
    registered = set(list_models())
    downloadable = {e["name"] for e in ENTRIES}
    for m in TABLE["manual"]:
        assert set(m) == MANUAL_KEYS and m["model"] in registered, m
        assert m["tags"] and not {f"{m['model']}.{t}" for t in m["tags"]} & downloadable, m
        assert m["pointer"].strip() and "\n" not in m["pointer"] and "checkpoint_path=" in m["pointer"], m
        assert m["facts_from"] and all(u.startswith("https://") for u in m["facts_from"]), m


def test_the_imagenet_class_names_are_1000_unique_lines_in_index_order() -> None:
    path = resources.files("visionmix.data").joinpath("imagenet1k_classes.txt")
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 1001  # one name a line, a final newline
    names = lines[:-1]
    assert all(n and n == n.strip() for n in names) and len(set(names)) == 1000
    assert names[0] == "tench, Tinca tinca" and names[999] == "toilet tissue, toilet paper, bathroom tissue"


def test_the_data_files_are_package_data() -> None:
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"visionmix.models" = ["released_weights.json"]' in pyproject
    assert '"visionmix.data" = ["*.txt"]' in pyproject
