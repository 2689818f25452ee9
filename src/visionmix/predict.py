"""Classify image files with a trained model: decode, apply the model's evaluation transform, batch, top-k.

A visionmix run directory brings its own transform (the run's image size and mean/std) and class names; a foreign
checkpoint brings its model's ``pretrained_cfg`` (timm's resize to ``input_size / crop_pct``, centre crop,
mean/std) and needs a class list. :func:`predict` streams: it reads paths lazily and holds at most one batch of
images. The model may be any callable that maps a float (B, C, H, W) tensor to logits (B, num_classes), such as an
``nn.Module`` or a deployed backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from visionmix.data.decode import IMAGE_EXTENSIONS
from visionmix.data.evaluation import EvalTransform, resolve_eval_transform
from visionmix.errors import InvalidValue, UnreadableImage
from visionmix.transfers import to_device

Model = Callable[[torch.Tensor], torch.Tensor]


def run_transform(meta: dict[str, Any]) -> EvalTransform:
    """The evaluation transform of a visionmix run (its ``checkpoint.json`` ``meta``), resolved as the run resolved
    it (:func:`~visionmix.engine.pipeline.eval_transform`): its model's ``pretrained_cfg``, its recipe, its image
    size, channels and training statistics and its ``crop_pct``."""
    from visionmix.models import model_entry

    data, config = meta["data"], meta["config"]
    return resolve_eval_transform(model_entry(meta["model"]).cfg, config.get("recipe", "small"),
                                  in_chans=data["in_chans"], image_size=tuple(data["image_size"]), mean=data["mean"],
                                  std=data["std"], crop_pct=config.get("crop_pct"))


def find_images(inputs: Sequence[str | Path]) -> Iterator[Path]:
    """The image files named by ``inputs``, lazily: a file as given, a directory's files with an image suffix
    (:data:`~visionmix.data.decode.IMAGE_EXTENSIONS`) recursively in sorted order (symlinked sub-directories are
    not followed). Every input must exist (``FileNotFoundError`` at once, before anything is read)."""
    missing = [str(p) for p in inputs if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"no such file or directory: {', '.join(missing)}")
    return (path for p in map(Path, inputs) for path in (_walk(p) if p.is_dir() else (p,)))


def _walk(directory: Path) -> Iterator[Path]:
    for entry in sorted(directory.iterdir()):
        if entry.is_dir():
            if not entry.is_symlink():
                yield from _walk(entry)
        elif entry.suffix.lower() in IMAGE_EXTENSIONS:
            yield entry


class Score(NamedTuple):
    """One of an image's top-k classes."""

    name: str
    index: int
    prob: float


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of the image at ``path`` (most probable first), or the ``error`` that skipped it."""

    path: Path
    top: tuple[Score, ...] = ()
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        """``{"path": ..., "top": [{"class": ..., "index": ..., "prob": ...}, ...]}``."""
        return {"path": str(self.path), "top": [{"class": s.name, "index": s.index, "prob": s.prob}
                                                for s in self.top]}


def predict(model: Model, paths: Iterable[str | Path], *, transform: EvalTransform, classes: Sequence[str],
            topk: int = 5, batch_size: int = 32) -> Iterator[Prediction]:
    """Classify the images at ``paths`` in batches of ``batch_size``, in order; one :class:`Prediction` each.

    ``model`` maps a float (B, C, H, W) batch to logits over ``classes``; each batch goes to its device
    (:func:`model_device`). ``paths`` is consumed lazily and at most
    one batch of images is held. A file that cannot be decoded yields a Prediction with ``error`` set. The
    arguments are checked at once (``ValueError``); a model whose logits do not match ``classes`` raises at its
    first batch.
    """
    if batch_size < 1:
        raise InvalidValue(f"batch size must be at least 1, got {batch_size}")
    if not 1 <= topk <= len(classes):
        raise InvalidValue(f"topk must be between 1 and the model's {len(classes)} classes, got {topk}")
    return _predict(model, paths, transform, tuple(classes), topk, batch_size)


def _predict(model: Model, paths: Iterable[str | Path], transform: EvalTransform, classes: tuple[str, ...],
             topk: int, batch_size: int) -> Iterator[Prediction]:
    pending: list[tuple[Path, torch.Tensor | str]] = []
    for path in map(Path, paths):
        try:
            pending.append((path, transform.read(path)))
        except UnreadableImage as exc:
            pending.append((path, str(exc)))
        if len(pending) == batch_size:
            yield from _classify(model, pending, classes, topk)
            pending = []
    yield from _classify(model, pending, classes, topk)


def _classify(model: Model, pending: list[tuple[Path, torch.Tensor | str]], classes: tuple[str, ...],
              topk: int) -> Iterator[Prediction]:
    images = [x for _, x in pending if isinstance(x, torch.Tensor)]
    tops: Iterator[tuple[list[float], list[int]]] = iter(())
    if images:
        with torch.inference_mode():
            logits = model(to_device(torch.stack(images), model_device(model)))
        if logits.shape != (len(images), len(classes)):
            raise InvalidValue(f"the model returned logits of shape {tuple(logits.shape)} for {len(images)} images, "
                               f"expected ({len(images)}, {len(classes)}) for its {len(classes)} classes")
        probs, indices = logits.float().softmax(dim=1).topk(topk, dim=1)
        tops = iter(zip(probs.cpu().tolist(), indices.cpu().tolist(), strict=True))
    for path, x in pending:
        if isinstance(x, str):
            yield Prediction(path, error=x)
        else:
            p, i = next(tops)
            yield Prediction(path, tuple(Score(classes[k], k, q) for q, k in zip(p, i, strict=True)))


def model_device(model: Model) -> torch.device:
    """Where ``model`` takes its inputs: a :class:`visionmix.Deployed`'s ``device``, a module's first parameter's
    (or buffer's) device, else the CPU."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    if isinstance(model, nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


def read_classes(path: str | Path) -> tuple[str, ...]:
    """Class names from a text file, one per line (blank lines ignored); ``ValueError`` if none or repeated."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--classes {path}: no such file (expected the class names, one per line)")
    names = tuple(line.strip() for line in Path(path).read_text().splitlines() if line.strip())
    if not names:
        raise InvalidValue(f"{path} names no classes (expected one name per line)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidValue(f"{path} names {', '.join(map(repr, repeated))} more than once")
    return names


def load_predictor(source: str | Path | None, *, model_name: str | None = None,
                   classes_file: str | Path | None = None) -> tuple[nn.Module, EvalTransform, tuple[str, ...]]:
    """``(model, transform, classes)`` for :func:`predict` from a run directory, or from a foreign checkpoint file
    of the registered model ``model_name`` with the class names of ``classes_file`` (its head is built for them),
    or (``source=None``) from the released weights ``model_name`` (``<model>[.<tag>]``) with their label set's
    names (:func:`~visionmix.models.pretrained.label_names`) unless ``classes_file`` gives others."""
    from visionmix.engine.run_files import load_run, run_meta

    if source is None:
        return _released_predictor(model_name, classes_file)
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"no such run directory or checkpoint: {source}")
    if model_name is None:
        if not source.is_dir() or run_meta(source) is None:
            raise InvalidValue(f"{source} is not a visionmix run directory; for a checkpoint file give --model NAME "
                               f"(the registered model it holds weights for) and --classes FILE")
        if classes_file is not None:
            raise InvalidValue(f"--classes applies to a checkpoint file; the run {source} has its own class names")
        model, meta = load_run(source)
        return model, run_transform(meta), tuple(meta["data"]["classes"])
    if source.is_dir():
        raise InvalidValue(f"--model {model_name} takes a checkpoint file, and {source} is a directory (a run "
                           f"directory needs no --model)")
    if classes_file is None:
        raise InvalidValue(f"{source} holds no class names: give --classes FILE with one name per line")
    from visionmix.models import create_model

    classes = read_classes(classes_file)
    model = create_model(model_name, num_classes=len(classes), checkpoint_path=str(source)).eval()
    return model, resolve_eval_transform(model.pretrained_cfg), classes


def _released_predictor(model_name: str | None,
                        classes_file: str | Path | None) -> tuple[nn.Module, EvalTransform, tuple[str, ...]]:
    from visionmix.models import create_model
    from visionmix.models.pretrained import label_names

    if model_name is None:
        raise InvalidValue("released weights need --model NAME[.TAG] (see 'visionmix models --pretrained')")
    model = create_model(model_name, pretrained=True).eval()
    cfg = model.pretrained_cfg
    classes = read_classes(classes_file) if classes_file is not None else label_names(cfg["label_set"],
                                                                                       model.num_classes)
    if len(classes) != model.num_classes:
        raise InvalidValue(f"--classes {classes_file} names {len(classes)} classes, and the weights "
                           f"{model_name} have {model.num_classes}")
    return model, resolve_eval_transform(cfg), classes
