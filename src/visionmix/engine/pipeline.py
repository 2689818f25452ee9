"""The data side of a run: datasets, loaders, the recipe's augmentation and its loss, chosen by ``TrainConfig``.

Two kinds of data, one interface (``len(loader)`` steps per epoch, ``loader.epoch(e, start_step)`` batches):

- in memory (fashion-mnist, cifar10/100, digits; :class:`~visionmix.data.BatchLoader`): uint8 tensors batched by
  index, bit-exact on resume;
- streamed (imagefolder, webdataset; :class:`~visionmix.data.streaming.StreamingLoader`): decoded in worker
  processes, memory flat in the dataset's size.

Recipes: ``small`` augments whole batches with the random crop + flip of :class:`~visionmix.data.CropFlip` and
trains with label-smoothed cross-entropy; ``deit`` crops each sample with RandomResizedCrop in the workers, then
augments each batch on the training device (flip, RandAugment, random erasing, mixup/cutmix:
:class:`~visionmix.data.recipe.DeitBatchTransform`) and trains with soft-target cross-entropy; streamed data is
evaluated through :func:`eval_transform` (deit: resize + centre crop at the model's ``crop_pct``). In-memory data
under ``deit`` goes through the streaming loader too (its images are the source), so every recipe runs on every
dataset.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from visionmix.data import BatchLoader, CropFlip, build_dataset, normalize, stable_seed
from visionmix.data.evaluation import EvalTransform, resolve_eval_transform
from visionmix.engine.config import BAD_IMAGE_SHARE, RECOMPUTE_BN_BATCH, STREAMED, TrainConfig
from visionmix.engine.distributed import DistContext

STREAM_STATS_IMAGES = 2000  # training images a streamed set's mean/std are estimated from


class Loader(Protocol):
    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass(frozen=True)
class DataInfo:
    """What a run records of its data (the ``data`` entry of ``checkpoint.json``; ``predict`` and ``eval`` read
    it): name, classes, channels, training size, normalisation and split sizes."""

    name: str
    classes: tuple[str, ...]
    channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_samples: int
    eval_samples: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> DataInfo:
        """The inverse of :meth:`as_meta`."""
        return cls(meta["name"], tuple(meta["classes"]), meta["in_chans"], tuple(meta["image_size"]),
                   tuple(meta["mean"]), tuple(meta["std"]), meta["train_samples"], meta["eval_samples"])

    def as_meta(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "classes": list(self.classes),
                "in_chans": self.channels, "image_size": list(self.image_size), "mean": list(self.mean),
                "std": list(self.std), "train_samples": self.train_samples, "eval_samples": self.eval_samples}


class _Augmented:
    """A loader of uint8 batches followed by a per-batch transform ``(images, labels, seed) -> (x, target)``, the
    seed a fixed function of ``(seed, epoch, step, rank)``: the same batch gets the same augmentation on resume."""

    def __init__(self, loader: Any, transform: Any, seed: int, rank: int, num_classes: int) -> None:
        self.loader, self.transform, self.seed, self.rank = loader, transform, seed, rank
        self.num_classes, self.device = num_classes, loader.device

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, (images, labels) in enumerate(self.loader.epoch(epoch, start_step), start_step):
            yield self.transform(images, labels, stable_seed(self.seed, epoch, step, self.rank))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)


class _Normalize:
    """uint8 batch -> normalised float32 by the evaluation transform, labels unchanged (evaluation)."""

    def __init__(self, transform: EvalTransform) -> None:
        self.transform = transform

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform.normalize(images), labels


class _SmallRecipe:
    """The small recipe on streamed batches: :class:`CropFlip` drawn from the batch's seed, then normalisation."""

    def __init__(self, augment: CropFlip | None, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.augment, self.mean, self.std = augment, mean, std

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augment is not None:
            offsets, flips = self.augment.sample_to(len(images), torch.Generator().manual_seed(seed), images.device)
            images = self.augment(images, offsets, flips)
        return normalize(images, self.mean, self.std), labels


@dataclass
class Pipeline:
    """A run's data: ``train`` yields ``(x, target)`` (class indices, or soft targets under mixup), ``test`` and
    ``bn`` (un-augmented training images in batches of ``RECOMPUTE_BN_BATCH``, for
    :func:`~visionmix.engine.evaluate.recompute_bn_statistics`) yield ``(x, labels)``; ``criterion(logits, target)``
    is the training loss."""

    info: DataInfo
    train: Loader
    test: Any
    bn: Any
    criterion: nn.Module


def model_input(cfg: TrainConfig) -> dict[str, Any]:
    """The model's ``pretrained_cfg`` (input size, crop_pct, interpolation) before any data is read."""
    from visionmix.models import model_entry

    return dict(model_entry(cfg.model).cfg)


def build_pipeline(cfg: TrainConfig, ctx: DistContext) -> Pipeline:
    """The loaders and loss of ``cfg`` on ``ctx``'s rank and device."""
    if cfg.data in STREAMED:
        return _streamed(cfg, ctx)
    train_ds = build_dataset(cfg.data, "train", cfg.data_dir, cfg.max_train_samples, image_size=cfg.image_size)
    test_ds = build_dataset(cfg.data, "test", cfg.data_dir, cfg.max_eval_samples, image_size=cfg.image_size)
    test_ds = test_ds.with_stats(train_ds.mean, train_ds.std)
    info = DataInfo(train_ds.name, train_ds.classes, train_ds.channels, train_ds.image_size, train_ds.mean,
                    train_ds.std, len(train_ds), len(test_ds))
    test = BatchLoader(test_ds, cfg.eval_batch_size, train=False, rank=ctx.rank, world_size=ctx.world_size,
                       device=ctx.device)
    on_device = train_ds.to(ctx.device)  # one copy on the device, shared by the training and BN loaders
    bn = BatchLoader(on_device, RECOMPUTE_BN_BATCH, train=False, device=ctx.device)
    if cfg.recipe == "small":
        train = BatchLoader(on_device, cfg.batch_size, train=True, augment=cfg.augment, seed=cfg.seed,
                            rank=ctx.rank, world_size=ctx.world_size, device=ctx.device)
        return Pipeline(info, train, test, bn, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing))
    from visionmix.data.sources import MemorySource

    return _deit(cfg, ctx, MemorySource(train_ds), info, test, bn)  # deit's workers read the host copy


def _streamed(cfg: TrainConfig, ctx: DistContext) -> Pipeline:
    from visionmix.data.sources import open_source
    from visionmix.data.stats import estimate_stats
    from visionmix.data.streaming import StreamingLoader
    from visionmix.data.transforms import resize_to

    train_src = open_source(cfg.data, cfg.data_dir, "train", val_fraction=cfg.val_fraction, seed=cfg.seed)
    test_src = open_source(cfg.data, cfg.data_dir, "val", val_fraction=cfg.val_fraction, seed=cfg.seed)
    pretrained = model_input(cfg)
    size = cfg.image_size or int(pretrained["input_size"][-1])
    mean, std = estimate_stats(train_src, size, max_images=STREAM_STATS_IMAGES)
    info = DataInfo(cfg.data, tuple(train_src.class_names), train_src.channels, (size, size), tuple(mean), tuple(std),
                    len(train_src), len(test_src))
    common = {"rank": ctx.rank, "world_size": ctx.world_size, "workers": cfg.workers, "device": ctx.device}
    test = streamed_eval_loader(cfg, test_src, info, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device)
    bn = streamed_eval_loader(cfg, train_src, info, device=ctx.device, batch_size=RECOMPUTE_BN_BATCH)
    if cfg.recipe == "deit":
        return _deit(cfg, ctx, train_src, info, test, bn)
    padding = max(1, size // 8) if cfg.augment == "crop-flip" else 0
    hflip = cfg.augment != "none"
    augment = CropFlip(padding, hflip) if padding or hflip else None
    train_loader = StreamingLoader(train_src, cfg.batch_size, train=True, transform=resize_to(size), seed=cfg.seed,
                                   max_bad_images=_bad_limit(cfg, len(train_src)), **common)
    train = _Augmented(train_loader, _SmallRecipe(augment, info.mean, info.std), cfg.seed, ctx.rank,
                       info.num_classes)
    return Pipeline(info, train, test, bn, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing))


def eval_transform(cfg: TrainConfig, info: DataInfo) -> EvalTransform:
    """The run's evaluation transform (:func:`~visionmix.data.evaluation.resolve_eval_transform` of its model,
    recipe, data and ``--crop-pct``; deit: resize + centre crop at ``crop_pct``; small: a resize to the training
    size), the one ``predict`` resolves from the run's files too."""
    return resolve_eval_transform(model_input(cfg), cfg.recipe, in_chans=info.channels, image_size=info.image_size,
                                  mean=info.mean, std=info.std, crop_pct=cfg.crop_pct)


def streamed_eval_loader(cfg: TrainConfig, source: Any, info: DataInfo, *, rank: int = 0, world_size: int = 1,
                         device: torch.device | str = "cpu", batch_size: int | None = None) -> Any:
    """Normalised, un-augmented batches of a streamed ``source`` through the run's :func:`eval_transform`, rank
    ``rank``'s shard."""
    from visionmix.data.streaming import StreamingLoader

    transform = eval_transform(cfg, info)
    loader = StreamingLoader(source, batch_size or cfg.eval_batch_size, train=False, transform=transform,
                             rank=rank, world_size=world_size, workers=cfg.workers, device=device,
                             max_bad_images=_bad_limit(cfg, len(source)))
    return _Augmented(loader, _Normalize(transform), cfg.seed, rank, info.num_classes)


def _deit(cfg: TrainConfig, ctx: DistContext, train_src: Any, info: DataInfo, test: Any, bn: Any) -> Pipeline:
    from visionmix.data.recipe import (
        DeitAugment,
        DeitBatchTransform,
        RandomResizedCropTransform,
        SoftTargetCrossEntropy,
    )
    from visionmix.data.streaming import StreamingLoader

    size = info.image_size[0]
    crop = RandomResizedCropTransform(size, scale=(cfg.crop_scale_min, 1.0),
                                      interpolation=model_input(cfg)["interpolation"])
    loader = StreamingLoader(train_src, cfg.batch_size, train=True, transform=crop, seed=cfg.seed, rank=ctx.rank,
                             world_size=ctx.world_size, workers=cfg.workers, device=ctx.device,
                             max_bad_images=_bad_limit(cfg, len(train_src)), repeats=cfg.repeated_aug)
    augment = DeitAugment(randaug_n=cfg.randaug_n, randaug_m=cfg.randaug_m, randaug_mstd=cfg.randaug_mstd,
                          reprob=cfg.reprob, mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                          switch_prob=cfg.mix_switch_prob, label_smoothing=cfg.label_smoothing)
    transform = DeitBatchTransform(info.num_classes, info.mean, info.std, augment,
                                   allow_hflip=getattr(train_src, "hflip", True))
    train = _Augmented(loader, transform, cfg.seed, ctx.rank, info.num_classes)
    return Pipeline(info, train, test, bn, SoftTargetCrossEntropy())


def _bad_limit(cfg: TrainConfig, samples: int) -> int:
    """``--max-bad-images``, by default BAD_IMAGE_SHARE of the split (at least 1)."""
    return cfg.max_bad_images if cfg.max_bad_images is not None else max(1, math.ceil(BAD_IMAGE_SHARE * samples))

