"""``visionmix weights convert`` / :func:`visionmix.weights.convert_weights`: a publisher's checkpoint made a
``.safetensors`` that ``checkpoint_path=`` loads, with where it came from in its metadata."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from visionmix.cli import main
from visionmix.models import create_model
from visionmix.weights import WEIGHTS_FORMAT, convert_weights

NAME = "spach_ms_nano_attn"


def _official(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A 7-class, 3-channel model's weights as a training script saves them: under "model", DDP's prefix."""
    torch.manual_seed(0)
    model = create_model(NAME, num_classes=7, in_chans=3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    path = tmp_path / "official.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 299}, path)
    return path, model.eval()


def test_convert_writes_safetensors_that_load_to_the_same_model(tmp_path: Path) -> None:
    path, model = _official(tmp_path)
    out = convert_weights(path, NAME, to_dir=tmp_path / "converted")
    assert out == tmp_path / "converted" / "official.safetensors"
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": WEIGHTS_FORMAT, "model": NAME, "num_classes": "7", "in_chans": "3",
                                "source": "official.pth",
                                "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    loaded = create_model(NAME, num_classes=7, in_chans=3, checkpoint_path=str(out)).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_the_cli_converts_and_refuses_to_overwrite_without_force(tmp_path: Path, capsys) -> None:
    path, _ = _official(tmp_path)
    assert main(["weights", "convert", str(path), "--model", NAME]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'official.safetensors'}"
    assert main(["weights", "convert", str(path), "--model", NAME]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "official.safetensors" in err and "--force" in err
    assert main(["weights", "convert", str(path), "--model", NAME, "--force"]) == 0


@pytest.mark.parametrize(("content", "model", "expected"), [
    ("evil", NAME, "evil.pth is not a plain state dict"),
    ("other", "mixer_nano", "official.pth does not fit"),
    ("same", NAME, "would be converted onto itself"),
    ("official", "no_such_model", "no_such_model"),
])
def test_bad_files_and_names_are_one_line_naming_them(tmp_path: Path, capsys, content: str, model: str,
                                                      expected: str) -> None:
    path, official = _official(tmp_path)
    if content == "evil":
        path = tmp_path / "evil.pth"
        torch.save({"model": official.state_dict(), "hook": object()}, path)
    elif content == "same":
        path = convert_weights(path, NAME)
    try:
        rc = main(["weights", "convert", str(path), "--model", model])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and expected in err, err


def test_weights_without_an_action_says_which(capsys) -> None:
    assert main(["weights"]) == 2
    assert "visionmix weights download|convert" in capsys.readouterr().err
