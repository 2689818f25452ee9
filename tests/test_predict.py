"""``visionmix predict`` and :mod:`visionmix.predict`: digits test images saved as PNG/JPEG files are classified as
the run classifies the dataset's own tensors (PNG bit-exactly), the transforms equal a direct computation, a
directory streams in batches, and bad inputs are one-line errors with the documented exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kornia.geometry.transform import resize as kornia_resize
from PIL import Image
from safetensors.torch import save_file

from visionmix.cli import main
from visionmix.data import ImageDataset, build_dataset, normalize
from visionmix.data.evaluation import EvalTransform, resolve_eval_transform
from visionmix.engine import TrainConfig, train
from visionmix.engine.run_files import load_run, state_dict_tensors
from visionmix.models import create_model
from visionmix.predict import Prediction, find_images, predict, run_transform

NUM_IMAGES = 16
pytestmark = pytest.mark.slow  # a trained run and real decoding for every test
RUN = TrainConfig(model="resnet_nano", data="digits", epochs=2, batch_size=32, max_train_samples=512,
                  max_eval_samples=64, device="cpu", lr=1e-2, warmup_epochs=0.2, augment="none")  # ~90% top-1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("predict") / "run"
    train(RUN, run, progress=False)
    return run


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    ds = build_dataset("digits", "test")
    return ds.subset(NUM_IMAGES)


@pytest.fixture(scope="module")
def dataset_top1(run_dir: Path, digits: ImageDataset) -> list[int]:
    """What the run predicts for the dataset's own tensors, normalised as in training."""
    model, meta = load_run(run_dir)
    with torch.no_grad():
        logits = model(normalize(digits.images, meta["data"]["mean"], meta["data"]["std"]))
    return logits.argmax(1).tolist()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory, digits: ImageDataset) -> Path:
    """``png/NN.png``: the 28x28 grey images as they are; ``jpg/NN.jpg``: 4x larger, RGB, JPEG-compressed."""
    root = tmp_path_factory.mktemp("images")
    (root / "png").mkdir()
    (root / "jpg").mkdir()
    for i, image in enumerate(digits.images[:, 0].numpy()):
        grey = Image.fromarray(image, mode="L")
        grey.save(root / "png" / f"{i:02d}.png")
        grey.resize((112, 112), Image.Resampling.BICUBIC).convert("RGB").save(root / "jpg" / f"{i:02d}.jpg",
                                                                               quality=95)
    return root


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(["predict", *argv])
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def visionmix(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "visionmix", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def corrupt_files(directory: Path, png: Path) -> list[Path]:
    """Not an image at all, and a PNG cut short after its header."""
    directory.mkdir(exist_ok=True)
    garbage, truncated = directory / "garbage.png", directory / "truncated.png"
    garbage.write_bytes(b"this is not an image")
    truncated.write_bytes(png.read_bytes()[:60])
    return [garbage, truncated]


# ------------------------------------------------------------------------------------------------ the transform
@pytest.mark.slow
def test_png_files_give_the_training_tensors_bit_exactly(run_dir: Path, digits: ImageDataset, image_dir: Path,
                                                         dataset_top1: list[int]) -> None:
    model, meta = load_run(run_dir)
    transform = run_transform(meta)
    files = sorted((image_dir / "png").iterdir())
    expected = normalize(digits.images, meta["data"]["mean"], meta["data"]["std"])
    assert torch.equal(torch.stack([transform.read(f) for f in files]), expected)
    results = list(predict(model, files, transform=transform, classes=meta["data"]["classes"], topk=1,
                           batch_size=5))
    assert [r.top[0].index for r in results] == dataset_top1


def test_run_transform_resizes_bilinear_and_normalises_like_a_direct_computation() -> None:
    """The small recipe's resize: torch's bilinear interpolation (antialiased when shrinking), as the datasets and
    the streaming loader resize."""
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    transform = EvalTransform(3, (20, 30), mean, std)
    pixels = np.random.default_rng(0).integers(0, 256, (33, 47, 3), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].double()
    resized = F.interpolate(x, size=(20, 30), mode="bilinear", align_corners=False, antialias=True).round()
    direct = ((resized[0].clamp(0, 255) / 255 - torch.tensor(mean)[:, None, None].double())
              / torch.tensor(std)[:, None, None].double()).float()
    out = transform.input(Image.fromarray(pixels))
    assert out.shape == (3, 20, 30)
    torch.testing.assert_close(out, direct, rtol=0, atol=1e-5)


def test_pretrained_transform_is_timms_resize_and_centre_crop() -> None:
    cfg = {"input_size": (3, 24, 24), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.3, 0.4), "crop_pct": 0.875,
           "interpolation": "bicubic"}
    transform = resolve_eval_transform(cfg)
    pixels = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    # shorter side 40 -> floor(24 / 0.875) = 27, longer 50 -> int(27 * 50 / 40) = 33; crop 24 from round(1.5),
    # round(4.5) (Python's round, as torchvision's CenterCrop); kornia resamples, as the deit recipe's crops
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
    resized = kornia_resize(x, (27, 33), interpolation="bicubic", antialias=True)[0].round().clamp(0, 255)
    crop = resized[:, 2:26, 4:28].double() / 255
    direct = ((crop - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]).float()
    torch.testing.assert_close(transform.input(Image.fromarray(pixels)), direct, rtol=0, atol=1e-5)
    assert resolve_eval_transform(create_model("resnet_nano").pretrained_cfg) == EvalTransform(
        1, (28, 28), (0.5,), (0.5,), crop_pct=1.0, interpolation="bicubic")


def test_a_colour_image_is_made_grey_for_a_grey_model() -> None:
    transform = EvalTransform(1, (4, 4), (0.0,), (1.0,))
    image = Image.new("RGB", (4, 4), (255, 0, 0))
    assert torch.allclose(transform.input(image), torch.full((1, 4, 4), round(0.299 * 255) / 255))


# ------------------------------------------------------------------------------------------------- the command
def test_predict_prints_the_classes_of_png_and_jpeg_files(capsys: pytest.CaptureFixture[str], run_dir: Path,
                                                          digits: ImageDataset, image_dir: Path,
                                                          dataset_top1: list[int]) -> None:
    rc, out, err = run(capsys, str(run_dir), str(image_dir / "png"), "--topk", "2")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(image_dir / "png" / f"{i:02d}.png")
                                                      for i in range(NUM_IMAGES)]
    printed = [int(line.split(": ")[1].split()[0]) for line in lines]
    assert printed == dataset_top1
    assert sum(p == y for p, y in zip(printed, digits.labels.tolist(), strict=True)) >= 0.7 * NUM_IMAGES

    rc, out, err = run(capsys, str(run_dir), str(image_dir / "jpg"), "--json", "--topk", "1")
    assert (rc, err) == (0, "")
    jpeg_top1 = [json.loads(line)["top"][0]["index"] for line in out.splitlines()]
    assert sum(p == q for p, q in zip(jpeg_top1, dataset_top1, strict=True)) >= 0.8 * NUM_IMAGES


@pytest.mark.parametrize("backend", ["channels_last", "auto"])
def test_every_backend_predicts_what_eager_predicts(capsys: pytest.CaptureFixture[str], run_dir: Path,
                                                   image_dir: Path, dataset_top1: list[int], backend: str) -> None:
    rc, out, err = run(capsys, str(run_dir), str(image_dir / "png"), "--topk", "1", "--backend", backend,
                       "--batch-size", "8")  # the last batch is smaller than the one the backend was built on
    assert rc == 0 and [int(line.split(": ")[1].split()[0]) for line in out.splitlines()] == dataset_top1
    assert err == "" if backend != "auto" else err.startswith("visionmix: backend ") and "fastest of" in err


def test_json_lines_are_sorted_probabilities_with_class_names(capsys: pytest.CaptureFixture[str], run_dir: Path,
                                                             image_dir: Path) -> None:
    rc, out, _ = run(capsys, str(run_dir), str(image_dir), "--json", "--topk", "3", "--batch-size", "7")
    assert rc == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in records] == sorted(map(str, image_dir.rglob("*.*")))  # jpg/ before png/
    for record in records:
        probs = [t["prob"] for t in record["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert all(t["class"] == str(t["index"]) for t in record["top"])


def test_a_foreign_checkpoint_needs_model_and_class_names(capsys: pytest.CaptureFixture[str], run_dir: Path,
                                                          image_dir: Path, tmp_path: Path) -> None:
    model, _ = load_run(run_dir)
    checkpoint, names = tmp_path / "digits.safetensors", tmp_path / "names.txt"
    save_file(state_dict_tensors(model), str(checkpoint))
    names.write_text("".join(f"digit {i}\n" for i in range(10)))
    rc, out, err = run(capsys, str(checkpoint), str(image_dir / "png"), "--model", "resnet_nano", "--classes",
                       str(names), "--json", "--topk", "10")
    assert (rc, err) == (0, "")
    for line in out.splitlines():
        assert {t["class"] for t in json.loads(line)["top"]} == {f"digit {i}" for i in range(10)}
    rc, _, err = run(capsys, str(checkpoint), str(image_dir / "png"), "--model", "resnet_nano")
    assert rc == 2 and err.startswith("visionmix: error: ") and "--classes FILE" in err


# -------------------------------------------------------------------------------------------------- streaming
def test_paths_are_read_lazily_one_batch_at_a_time_by_any_callable(run_dir: Path, image_dir: Path,
                                                                   tmp_path: Path) -> None:
    model, meta = load_run(run_dir)
    files = sorted((image_dir / "png").iterdir())[:7]
    files.insert(2, corrupt_files(tmp_path, files[0])[0])
    pulled, batches = [], []

    def paths():
        for f in files:
            pulled.append(f)
            yield f

    def backend(x: torch.Tensor) -> torch.Tensor:  # what visionmix.deploy returns: a tensor in, logits out
        batches.append(len(x))
        return model(x)

    results = predict(backend, paths(), transform=run_transform(meta), classes=meta["data"]["classes"],
                      topk=3, batch_size=3)
    first = next(results)
    assert len(pulled) == 3 and batches == [2]
    rest = list(results)
    assert batches == [2, 3, 2] and [r.path for r in [first, *rest]] == files
    assert isinstance(rest[1], Prediction) and rest[1].top == () and "cannot decode" in rest[1].error
    assert all(len(r.top) == 3 and r.error is None for r in [first, *rest] if r is not rest[1])


def test_find_images_walks_directories_recursively_in_sorted_order(tmp_path: Path) -> None:
    for name in ("b/2.png", "b/a/1.JPG", "a.png", "c/notes.txt", "c/d/3.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images([tmp_path, tmp_path / "c" / "notes.txt"])]
    assert found == ["a.png", "b/2.png", "b/a/1.JPG", "c/d/3.webp", "c/notes.txt"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_images([tmp_path, tmp_path / "nowhere"])


# ------------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_are_one_line_errors_with_exit_status_2(capsys: pytest.CaptureFixture[str], run_dir: Path,
                                                           image_dir: Path, tmp_path: Path) -> None:
    png = str(image_dir / "png")
    (tmp_path / "empty").mkdir()
    corrupt_files(tmp_path / "corrupt", image_dir / "png" / "00.png")
    cases = {
        "no image files (.png, .jpg": [str(run_dir), str(tmp_path / "empty")],
        "none of 2 image files could be read": [str(run_dir), str(tmp_path / "corrupt")],
        "no such file or directory: " + str(tmp_path / "missing.png"): [str(run_dir), str(tmp_path / "missing.png")],
        "topk must be between 1 and the model's 10 classes, got 11": [str(run_dir), png, "--topk", "11"],
        "--topk: expected a positive whole number, got '0'": [str(run_dir), png, "--topk", "0"],
        "is not a visionmix run directory": [str(tmp_path / "empty"), png],
        "--classes applies to a checkpoint file": [str(run_dir), png, "--classes", str(tmp_path / "x.txt")],
        "--model resnet_nano takes a checkpoint file": [str(run_dir), png, "--model", "resnet_nano"],
    }
    for message, argv in cases.items():
        rc, out, err = run(capsys, *argv)
        *skipped, error = err.splitlines()  # a corrupt file is also reported on its own line as it is skipped
        assert rc == 2 and out == "" and "Traceback" not in err, (argv, err)
        assert error.startswith("visionmix: error: ") and message in error, (argv, err)
        assert all(line.startswith("visionmix: skipped: ") for line in skipped), (argv, err)


def test_corrupt_files_are_skipped_with_exit_status_1_and_a_checkpoint_file_needs_model(
        run_dir: Path, image_dir: Path, tmp_path: Path) -> None:
    corrupt = corrupt_files(tmp_path / "images", image_dir / "png" / "00.png")
    (tmp_path / "images" / "ok.png").write_bytes((image_dir / "png" / "00.png").read_bytes())
    result = visionmix("predict", str(run_dir), str(tmp_path / "images"), "--topk", "1", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stdout.startswith(str(tmp_path / "images" / "ok.png") + ": ") and result.stdout.count("\n") == 1
    skipped = [line for line in result.stderr.splitlines() if line.startswith("visionmix: skipped: ")]
    assert [next(str(p) for p in corrupt if str(p) in line) for line in skipped] == list(map(str, corrupt))
    assert result.stderr.splitlines()[-1] == "visionmix: classified 1 images, skipped 2"

    weights = tmp_path / "weights.pth"
    torch.save(state_dict_tensors(load_run(run_dir)[0]), weights)
    result = visionmix("predict", str(weights), str(tmp_path / "images" / "ok.png"), cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"visionmix: error: {weights} is not a visionmix run directory; for a "
                                    f"checkpoint file give --model NAME")


def test_a_deit_run_predicts_through_its_evaluation_crop() -> None:
    """A --recipe deit run evaluated by resize + centre crop at crop_pct: predict applies the same transform."""
    data = {"in_chans": 3, "image_size": [224, 224], "mean": [0.5] * 3, "std": [0.25] * 3}
    meta = {"model": "uniformer_small", "data": data, "config": {"recipe": "deit", "crop_pct": None}}
    transform = run_transform(meta)
    assert (transform.crop_pct, transform.interpolation) == (0.875, "bicubic")  # uniformer_small's pretrained_cfg
    assert transform.resized_shape(300, 448) == (256, 382)  # shorter side to floor(224 / 0.875), then the crop
    meta["config"]["crop_pct"] = 0.9
    assert run_transform(meta).crop_pct == 0.9
    meta["config"]["recipe"] = "small"
    assert run_transform(meta).crop_pct is None  # the small recipe resizes straight to the size
