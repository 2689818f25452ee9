"""``create_model(name, pretrained=True)`` and ``name.tag`` against a real HTTP server on 127.0.0.1: nano stand-ins
registered by the test, served in the publishers' layouts (a Hub safetensors, a ``.pth`` wrapped under "model"),
equal to loading the same file with ``checkpoint_path=``; the cache, offline mode, a wrong hash, a pickle that
would run code, a file of another model; and the real table's consistency."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import time
import types
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import huggingface_hub.file_download
import huggingface_hub.utils._http
import pytest
import torch
from safetensors.torch import save

from http_server import HUB_COMMIT, Server
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


class _RunsCode:
    """Unpickling this would create ``ran`` (torch.load without weights_only would run it)."""

    ran = Path(__file__).with_name("pickle_ran.txt")

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.ran,))


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
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
        monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)  # a cut keeps what came
        for module in (huggingface_hub.file_download, huggingface_hub.utils._http):  # its retries without waits
            monkeypatch.setattr(module, "time", types.SimpleNamespace(**{**vars(time), "sleep": lambda s: None}))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("VISIONMIX_OFFLINE", raising=False)
        yield server, models


@pytest.mark.parametrize("name", ["resnet_nano", "mixer_nano"])
def test_pretrained_equals_the_same_file_through_checkpoint_path(served, tmp_path: Path, name: str) -> None:
    server, models = served
    served_bytes = next(body for path, body in server.files.items() if name in path)
    model = create_model(name, pretrained=True).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), models[name](x), rtol=0, atol=0)
    cfg = model.pretrained_cfg
    assert (cfg["crop_pct"], cfg["mean"], cfg["label_set"], cfg["interpolation"]) == (0.9, (0.25,), "digits",
                                                                                      "bilinear")
    cached = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                    if p.is_file() and p.suffix != ".lock" and "/." not in str(p.relative_to(tmp_path)))
    hub = "hf/models--visionmix-test--resnet_nano.hub_in1k"
    expected = {"resnet_nano": [  # in huggingface_hub's cache, its blob named by the served ETag (the sha256)
                    "hf/CACHEDIR.TAG", f"{hub}/blobs/{hashlib.sha256(served_bytes).hexdigest()}",
                    f"{hub}/refs/main", f"{hub}/snapshots/{HUB_COMMIT}/model.safetensors"],
                "mixer_nano": ["home/weights/mixer_nano.release/mixer_nano_release.pth",
                               "home/weights/mixer_nano.release/mixer_nano_release.safetensors"]}[name]
    assert cached == expected
    from_file = create_model(name, checkpoint_path=str(tmp_path / expected[-1])).eval()
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
        server.files[path] = _pth({"model": models["mixer_nano"].state_dict(), "hook": _RunsCode()})
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
    assert not _RunsCode.ran.exists()


@pytest.mark.parametrize("name", ["resnet_nano", "mixer_nano"])
def test_a_good_file_that_does_not_fit_the_models_arguments_stays_in_the_cache(served, name: str) -> None:
    """Weights for 28 px built at 32 px: the error says the arguments change the shapes, and the file (fit for the
    model as registered) is not downloaded again."""
    server, models = served
    with pytest.raises(ValueError, match=rf"does not fit .*; the file fits {name} as registered, so the arguments "
                                         r"this model was built with change its shapes \(the file stays in the cache"):
        create_model(name, pretrained=True, **({"img_size": 32} if name == "mixer_nano" else {"stem_width": 8}))
    requests = len(server.requests)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(create_model(name, pretrained=True).eval()(x), models[name](x), rtol=0, atol=0)
    assert len(server.requests) == requests


def test_a_tag_builds_its_weights_class_count_when_num_classes_is_unset_or_none(served, monkeypatch) -> None:
    entry = dataclasses.replace(weights_table.released_weights()["resnet_nano.hub_in1k"], num_classes=7)
    monkeypatch.setattr(weights_table, "released_weights", lambda: {entry.name: entry})
    for kwargs in ({}, {"num_classes": None}):  # None is timm's "the default" (an unset CLI option)
        model = create_model("resnet_nano.hub_in1k", **kwargs)
        assert (model.num_classes, model.pretrained_cfg["num_classes"]) == (7, 7)
    assert create_model("resnet_nano.hub_in1k", num_classes=3).num_classes == 3


@pytest.mark.parametrize("key", ["model", "model_ema"])
def test_the_key_the_table_names_is_the_one_loaded(served, monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    """A release holding live and EMA weights: the table's wrapped_under picks which are the released ones."""
    server, models = served
    other = _random("mixer_nano", 5)
    live, ema = (models["mixer_nano"], other) if key == "model" else (other, models["mixer_nano"])
    server.files["/release/mixer_nano_release.pth"] = _pth({"model": live.state_dict(), "model_ema": ema.state_dict()})
    entry = dataclasses.replace(weights_table.released_weights()["mixer_nano.release"], wrapped_under=key, sha256=None)
    monkeypatch.setattr(weights_table, "released_weights", lambda: {entry.name: entry})
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(create_model("mixer_nano", pretrained=True).eval()(x), models["mixer_nano"](x),
                                   rtol=0, atol=0)


def _pretrained_state(entry: ReleasedWeights, out: str) -> None:
    """In a spawned process: ``entry``'s model built with pretrained=True, its state dict saved to ``out`` (weights,
    not outputs: this process's thread count may differ from the test's, and with it the last bits of a forward)."""
    torch.set_num_threads(1)
    weights_table.released_weights = lambda: {entry.name: entry}
    torch.save(create_model(entry.model, pretrained=True).state_dict(), out)


def test_two_processes_fetching_a_hub_pth_at_once_end_with_one_good_file(served, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub .pth holding a plain state dict (one of the two layouts UniFormer's Hub files may have): two processes
    download it through huggingface_hub's cache and convert it at once; one GET, one blob, one converted file, both
    models exact, and the converted file equal to checkpoint_path= of the served one."""
    import multiprocessing

    server, _ = served
    model = _random("uniformer_nano", 2)
    hub_path = "/visionmix-test/uniformer_image/resolve/main/uniformer_nano_in1k.pth"
    server.files[hub_path] = _pth(model.state_dict())
    (tmp_path / "served.pth").write_bytes(server.files[hub_path])
    server.delay = 0.5  # the second process asks while the first is receiving
    entry = ReleasedWeights(name="uniformer_nano.in1k", **{
        **BASE, "hf_hub_id": "visionmix-test/uniformer_image", "hf_filename": "uniformer_nano_in1k.pth",
        "hf_revision": "main", "file_format": "pth"})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # the children's huggingface_hub reads it at import
    x = torch.randn(2, 1, 28, 28)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_pretrained_state, args=(entry, str(tmp_path / f"out{i}.pt"))) for i in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    with torch.no_grad():
        expected = model(x)
        from_file = create_model("uniformer_nano", checkpoint_path=str(tmp_path / "served.pth")).eval()(x)
    torch.testing.assert_close(from_file, expected, rtol=0, atol=0)
    for i in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"out{i}.pt"), model.state_dict(), rtol=0, atol=0)
    assert [path for path, _ in server.requests] == [hub_path]
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".lock"
                   and ".cache" not in p.parts and p.parent != tmp_path)
    assert files == ["hf/CACHEDIR.TAG", f"hf/models--visionmix-test--uniformer_image/blobs/"
                     f"{hashlib.sha256(server.files[hub_path]).hexdigest()}",
                     "hf/models--visionmix-test--uniformer_image/refs/main",
                     f"hf/models--visionmix-test--uniformer_image/snapshots/{HUB_COMMIT}/uniformer_nano_in1k.pth",
                     "home/weights/uniformer_nano.in1k/uniformer_nano_in1k.safetensors"]


def test_a_hub_download_asks_nothing_of_the_real_hub(served) -> None:
    """huggingface_hub's once-a-process agent-registry request (to huggingface.co) is off in the tests (conftest)."""
    from huggingface_hub.utils import _detect_agent

    create_model("resnet_nano", pretrained=True)
    assert _detect_agent._registry is None  # never looked up, so never fetched


def test_weights_download_refuses_an_existing_copy_before_downloading(served, tmp_path: Path, capsys) -> None:
    from visionmix.cli import main

    server, _ = served
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mixer_nano.release.safetensors").write_bytes(b"the user's file")
    assert main(["weights", "download", "mixer_nano", "--to", str(tmp_path / "out")]) == 2
    assert "mixer_nano.release.safetensors already exists; pass --force" in capsys.readouterr().err
    assert server.requests == []  # nothing downloaded for a copy that cannot be written
    assert main(["weights", "download", "mixer_nano", "--to", str(tmp_path / "out"), "--force"]) == 0
    copy = tmp_path / "out" / "mixer_nano.release.safetensors"
    assert copy.read_bytes() == next((tmp_path / "home").rglob("*.safetensors")).read_bytes()
    assert sorted(p.name for p in copy.parent.iterdir()) == [copy.name]  # no temporary file left


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
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf"))
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


HUB_FILE = "/visionmix-test/resnet_nano.hub_in1k/resolve/main/model.safetensors"


def test_a_hub_transfer_cut_half_way_is_resumed_by_range(served) -> None:
    server, models = served
    server.drop_after[HUB_FILE] = len(server.files[HUB_FILE]) // 2
    model = create_model("resnet_nano", pretrained=True).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), models["resnet_nano"](x), rtol=0, atol=0)
    (first, whole), (second, rest) = [r for r in server.requests if r[0] == HUB_FILE]
    assert whole is None and rest.startswith("bytes=")  # the second asks for what the first did not bring
    assert 0 < int(rest[6:-1]) <= len(server.files[HUB_FILE]) // 2


@pytest.mark.parametrize("bad", ["404", "hash", "html", "no_network"])
def test_bad_hub_files_are_one_line_naming_them_and_leave_no_file(served, tmp_path: Path, caplog,
                                                                  monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    server, _ = served
    entry = weights_table.released_weights()["resnet_nano.hub_in1k"]
    url = f"{server.url}{HUB_FILE}"
    if bad == "404":
        del server.files[HUB_FILE]
        match = rf"^{url}: HTTP 404 Not Found$"
    elif bad == "hash":
        entry = dataclasses.replace(entry, sha256="ab" * 32)
        match = rf"^{url}: the file's sha256 is [0-9a-f]{{64}}, the publisher states abab"
    elif bad == "html":
        server.files[HUB_FILE] = b"<!DOCTYPE html><html><body>Sign in</body></html>"
        match = rf"^{url} answered with an HTML page, not the weights"
    else:
        server.httpd.shutdown()
        server.httpd.server_close()
        match = rf"^cannot reach {url} \(.*\); offline: download it on a machine with internet .*checkpoint_path=FILE"
    monkeypatch.setattr(weights_table, "released_weights", lambda: {entry.name: entry})
    with caplog.at_level("INFO"), pytest.raises(DownloadError, match=match) as info:
        create_model("resnet_nano", pretrained=True)
    assert "\n" not in str(info.value)
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("huggingface_hub")]  # one line only
    hub_files = [p for p in (tmp_path / "hf").rglob("*") if p.is_file() and {"blobs", "snapshots"} & set(p.parts)]
    assert not hub_files


def test_predict_pretrained_names_the_label_sets_classes(served, tmp_path: Path, capsys,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from PIL import Image

    from visionmix.cli import main
    from visionmix.data.evaluation import resolve_eval_transform
    from visionmix.predict import predict

    _, models = served
    image = tmp_path / "seven.png"
    Image.fromarray((torch.rand(32, 32) * 255).to(torch.uint8).numpy(), mode="L").save(image)
    cfg = create_model("resnet_nano", pretrained=True).pretrained_cfg  # the weights' own crop and mean/std
    [expected] = predict(models["resnet_nano"], [image], transform=resolve_eval_transform(cfg),
                         classes=tuple(map(str, range(10))), topk=3)
    indices = [s.index for s in expected.top]
    names = [f"digit {i}" for i in range(10)]
    (tmp_path / "digits.txt").write_text("\n".join(names) + "\n")
    for label_file, labels in ((None, [str(i) for i in range(10)]), (tmp_path / "digits.txt", names)):
        monkeypatch.setattr(weights_table, "LABEL_FILES", {"digits": str(label_file)} if label_file else {})
        assert main(["predict", "--model", "resnet_nano", "--pretrained", str(image), "--topk", "3", "--json"]) == 0
        top = json.loads(capsys.readouterr().out)["top"]
        assert [t["index"] for t in top] == indices and [t["class"] for t in top] == [labels[i] for i in indices]
        assert [t["prob"] for t in top] == pytest.approx([s.prob for s in expected.top], rel=1e-5)
    assert main(["predict", "--pretrained", str(image)]) == 2
    assert "released weights need --model NAME[.TAG]" in capsys.readouterr().err


def test_weights_of_another_channel_count_are_adapted_for_pretrained_too(served, caplog) -> None:
    _, models = served
    with caplog.at_level("WARNING", logger="visionmix"):
        model = create_model("resnet_nano", pretrained=True, in_chans=3).eval()
    assert sum("adapt" in r.getMessage() for r in caplog.records) == 1, [r.getMessage() for r in caplog.records]
    assert model.pretrained_cfg["input_size"] == (3, 28, 28)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():  # a grey image repeated into RGB gives what the grey weights give
        torch.testing.assert_close(model(x.repeat(1, 3, 1, 1)), models["resnet_nano"](x), rtol=1e-5, atol=1e-5)


def test_threads_downloading_the_same_weights_at_once_end_with_one_good_file(served) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server, models = served
    server.delay = 0.3  # the second thread asks while the first is receiving
    names = ["resnet_nano", "mixer_nano"] * 2
    with ThreadPoolExecutor(4) as pool:
        built = list(pool.map(lambda name: create_model(name, pretrained=True).eval(), names))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        for name, model in zip(names, built, strict=True):
            torch.testing.assert_close(model(x), models[name](x), rtol=0, atol=0)
    assert sorted(path for path, _ in server.requests) == sorted(server.files)  # each file fetched once


@pytest.mark.parametrize("name", sorted(weights_table.released_weights()))
def test_every_entry_of_the_table_is_fetched_unwrapped_and_converted_from_the_local_server(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each real entry's file, as a small stand-in in the entry's format and wrapping, at the entry's Hub path or
    URL path on the local server; the entry's model builds with its class count (on the meta device)."""
    from urllib.parse import urlparse

    from visionmix.models.loading import read_state_dict

    entry = weights_table.released_weights()[name]
    create_model(entry.model, num_classes=entry.num_classes, device="meta")
    state = {"stand_in.weight": torch.randn(3, 2)}
    wrapped = {entry.wrapped_under: state, "epoch": 1} if entry.wrapped_under else state
    payload = save(state) if entry.file_format == "safetensors" else _pth(wrapped)
    with Server() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("VISIONMIX_HOME", str(tmp_path / "home"))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
        if entry.url is not None:
            entry = dataclasses.replace(entry, url=f"{server.url}{urlparse(entry.url).path}")
        server.files[urlparse(entry.source()).path] = payload
        entry = dataclasses.replace(entry, sha256=hashlib.sha256(payload).hexdigest() if entry.sha256 else None)
        fetched = weights_table.fetch(entry)
    assert fetched.suffix == ".safetensors"
    torch.testing.assert_close(read_state_dict(fetched), state, rtol=0, atol=0)


def test_a_release_wrapped_under_model_state_loads(served, monkeypatch: pytest.MonkeyPatch) -> None:
    server, models = served
    entry = dataclasses.replace(weights_table.released_weights()["mixer_nano.release"], wrapped_under="model_state",
                                sha256=None)
    server.files["/release/mixer_nano_release.pth"] = _pth({"model_state": models["mixer_nano"].state_dict(),
                                                            "optimizer_state": {"step": 3}})
    monkeypatch.setattr(weights_table, "released_weights", lambda: {entry.name: entry})
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(create_model("mixer_nano", pretrained=True).eval()(x), models["mixer_nano"](x),
                                   rtol=0, atol=0)
