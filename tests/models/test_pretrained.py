"""``create_model(name, pretrained=True)`` and ``name.tag`` against a real HTTP server on 127.0.0.1: nano stand-ins
registered by the test, served in the publishers' layouts (a Hub safetensors, a ``.pth`` wrapped under "model"),
equal to loading the same file with ``checkpoint_path=``; the cache, offline mode, a wrong hash, a pickle that
would run code, a file of another model; and the real table's consistency."""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from http_server import Server
from visionmix.errors import DownloadError
from visionmix.models import create_model
from visionmix.models import pretrained as weights_table
from visionmix.models.pretrained import ReleasedWeights

BASE = dict(default=True, hf_hub_id=None, hf_filename=None, hf_revision=None, url=None, file_format="safetensors",
            wrapped_under=None, num_classes=10, label_set="digits", input_size=(1, 28, 28), crop_pct=0.9,
            interpolation="bilinear", mean=(0.25,), std=(0.5,), top1=None, license="test", sha256=None,
            facts_from=("this test",), checked_against_download=False)


def _random(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(name)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model.eval()


def _pth(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Server, dict[str, torch.nn.Module]]]:
    """resnet_nano.hub_in1k (Hub layout, safetensors) and mixer_nano.release (a URL .pth under "model", with its
    sha256), served; the cache in tmp_path."""
    models = {"resnet_nano": _random("resnet_nano", 0), "mixer_nano": _random("mixer_nano", 1)}
    with Server() as server:
        server.files["/visionmix-test/resnet_nano.hub_in1k/resolve/main/model.safetensors"] = save(
            models["resnet_nano"].state_dict())
        pth = _pth({"model": models["mixer_nano"].state_dict(), "epoch": 300})
        server.files["/release/mixer_nano_release.pth"] = pth
        table = {
            "resnet_nano.hub_in1k": ReleasedWeights(name="resnet_nano.hub_in1k", **{
                **BASE, "hf_hub_id": "visionmix-test/resnet_nano.hub_in1k", "hf_filename": "model.safetensors",
                "hf_revision": "main"}),
            "mixer_nano.release": ReleasedWeights(name="mixer_nano.release", **{
                **BASE, "url": f"{server.url}/release/mixer_nano_release.pth", "file_format": "pth",
                "wrapped_under": "model", "sha256": hashlib.sha256(pth).hexdigest()}),
        }
        monkeypatch.setattr(weights_table, "released_weights", lambda: table)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("VISIONMIX_HOME", str(tmp_path / "home"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("VISIONMIX_OFFLINE", raising=False)
        yield server, models


@pytest.mark.parametrize("name", ["resnet_nano", "mixer_nano"])
def test_pretrained_equals_the_same_file_through_checkpoint_path(served, tmp_path: Path, name: str) -> None:
    server, models = served
    model = create_model(name, pretrained=True).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), models[name](x), rtol=0, atol=0)
    cfg = model.pretrained_cfg
    assert (cfg["crop_pct"], cfg["mean"], cfg["label_set"], cfg["interpolation"]) == (0.9, (0.25,), "digits",
                                                                                      "bilinear")
    cached = sorted(p.name for p in (tmp_path / "home" / "weights").rglob("*") if p.is_file())
    expected = {"resnet_nano": ["model.safetensors", "model.safetensors.lock"],
                "mixer_nano": ["mixer_nano_release.pth", "mixer_nano_release.pth.lock",
                               "mixer_nano_release.safetensors"]}[name]
    assert cached == expected
    from_file = create_model(name, checkpoint_path=str(next((tmp_path / "home").rglob("*.safetensors")))).eval()
    with torch.no_grad():
        torch.testing.assert_close(from_file(x), model(x), rtol=0, atol=0)
    requests = len(server.requests)
    create_model(f"{name}.{'hub_in1k' if name == 'resnet_nano' else 'release'}", pretrained=True)  # the cache
    assert len(server.requests) == requests


def test_another_class_count_starts_a_fresh_classifier_and_names_it(served, caplog) -> None:
    with caplog.at_level("WARNING", logger="visionmix"):
        model = create_model("resnet_nano", pretrained=True, num_classes=5)
    assert model.num_classes == 5
    assert any("10-class classifier not loaded into a 5-class model (fresh: linear.bias, linear.weight)"
               in r.getMessage() for r in caplog.records)


def test_offline_uses_the_cache_only_and_says_the_route(served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match=r"resnet_nano.hub_in1k: offline and not in the cache .*checkpoint_path"):
        create_model("resnet_nano", pretrained=True)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    create_model("resnet_nano", pretrained=True)
    monkeypatch.setenv("VISIONMIX_OFFLINE", "1")
    create_model("resnet_nano", pretrained=True)  # from the cache


@pytest.mark.parametrize("bad", ["hash", "pickle", "other_model"])
def test_bad_files_are_one_error_naming_them(served, monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    server, models = served
    entry = weights_table.released_weights()["mixer_nano.release"]
    path = "/release/mixer_nano_release.pth"
    if bad == "hash":
        entry = dataclasses.replace(entry, sha256="ab" * 32)
        match = r"mixer_nano_release.pth: the file's sha256 is [0-9a-f]{64}, the publisher states abab"
    elif bad == "pickle":
        server.files[path] = _pth({"model": models["mixer_nano"].state_dict(), "hook": object()})
        entry = dataclasses.replace(entry, sha256=None)
        match = r"mixer_nano_release.pth is not a plain state dict"
    else:
        server.files[path] = _pth({"model": models["resnet_nano"].state_dict()})
        entry = dataclasses.replace(entry, sha256=None)
        match = r"mixer_nano_release.safetensors does not fit MlpMixer"
    monkeypatch.setattr(weights_table, "released_weights", lambda: {entry.name: entry})
    with pytest.raises(ValueError if bad != "hash" else DownloadError, match=match):
        create_model("mixer_nano", pretrained=True)
    left = [p.name for p in Path(weights_table.cache_home()).rglob("*") if p.is_file()]
    assert left == ["mixer_nano_release.pth.lock"]  # nothing of the bad file stays in the cache


def test_pretrained_and_checkpoint_path_are_exclusive(served) -> None:
    with pytest.raises(ValueError, match="pretrained=True or checkpoint_path=, not both"):
        create_model("resnet_nano", pretrained=True, checkpoint_path="x.pth")


def test_the_cli_downloads_into_a_directory_and_lists_the_released_weights(served, tmp_path: Path, capsys,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from visionmix.cli import main

    _, models = served
    assert main(["weights", "download", "resnet_nano", "mixer_nano.release", "--to", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    copy = tmp_path / "out" / "resnet_nano.hub_in1k.safetensors"
    assert f"resnet_nano: {copy}" in out and (tmp_path / "out" / "mixer_nano.release.safetensors").is_file()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(create_model("resnet_nano", checkpoint_path=str(copy)).eval()(x),
                                   models["resnet_nano"](x), rtol=0, atol=0)
    assert main(["weights", "download", "resnet_nano", "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "resnet_nano.hub_in1k.safetensors" in err and "--force" in err
    monkeypatch.setenv("VISIONMIX_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["weights", "download", "resnet_nano"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "offline and not in the cache" in err
    assert main(["models", "--pretrained"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[:3] == ["resnet_nano.hub_in1k", "*", "10"] and "mixer_nano.release *" in rows[2]


def test_compare_init_pretrained_fine_tunes_each_model_from_its_own_weights(served, tmp_path: Path) -> None:
    from visionmix.bench.compare import compare
    from visionmix.engine.run_files import load_run

    recipe = dict(init="pretrained", epochs=1, batch_size=32, max_train_samples=64, max_eval_samples=64, lr=1e-9,
                  warmup_epochs=0, clip_grad=None, weight_decay=0.0, recompute_bn="off")
    rows = compare(["resnet_nano", "mixer_nano"], tmp_path / "cmp", data="digits", recipe=recipe,
                   bench_repeats=2, progress=False, log=lambda line: None)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    _, models = served
    for name, model in models.items():
        trained, _ = load_run(tmp_path / "cmp" / "runs" / name / "seed0")
        trained_state = trained.state_dict()
        for key, value in model.named_parameters():  # lr 1e-9: the released weights, all but unchanged
            torch.testing.assert_close(trained_state[key], value.detach(), rtol=1e-5, atol=1e-5, msg=key)
    with pytest.raises(ValueError, match="no released weights 'spach_nano_mlp'"):
        compare(["resnet_nano", "spach_nano_mlp"], tmp_path / "other", data="digits", recipe=recipe,
                progress=False, log=lambda line: None)
    assert not (tmp_path / "other").exists()  # refused before anything was written
