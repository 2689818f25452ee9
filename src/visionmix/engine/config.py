"""The training recipe: :class:`TrainConfig`, its named recipes and the command-line options built from its fields.

Every field carries its help text and argument parser (:func:`option`), so ``visionmix train``'s options are made
from the dataclass (:func:`add_config_options`): one list of defaults, not two to keep in step. A recipe
(:data:`RECIPES`) is a set of field defaults: ``small`` (the dataclass's own, for 28-32 px data) and ``deit``
(DeiT's ImageNet recipe, 2012.12877 table 9, as SPACH 2108.13002 and UniFormer 2201.09450 train with it).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from visionmix.checks import check_choice, check_positive
from visionmix.data import AUGMENTATIONS, DATASETS
from visionmix.errors import InvalidType, InvalidValue

DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("bf16", "fp16", "off")
FREEZE_MODES = ("none", "backbone")
RECOMPUTE_BN = ("auto", "on", "off")
RECOMPUTE_BN_BELOW_STEPS = 1000  # "auto": shorter runs end with BN statistics recomputed from the final weights
RECOMPUTE_BN_IMAGES = 10_000  # training images (un-augmented, fixed order) the recomputation passes through
BUDGET_FILL = 0.97  # a time-budgeted run is sized to this share of its budget: headroom for speed drift
MAX_LR = 1.0  # AdamW moves every weight by about lr per step: above 1 no run learns anything
DATA_SET_BY_ENGINE = ("num_classes", "in_chans", "img_size")
BAD_IMAGE_SHARE = 0.001  # --max-bad-images default: 0.1% of a split
STREAMED = ("imagefolder", "webdataset")  # datasets read from disk while training (the others are held in memory)


# ----------------------------------------------------------------------------------- argument parsers
def positive_number(text: str, unit: str = "") -> float:
    """A finite number > 0, or an ``ArgumentTypeError`` saying what was expected."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf):
        raise argparse.ArgumentTypeError(f"expected a positive number{f' of {unit}' if unit else ''}, got {text!r}")
    return value


def epochs_arg(text: str) -> int | float:
    """``--epochs``: a positive number; a whole one stays an int (``3``, not ``3.0``, in configs and messages)."""
    value = positive_number(text, "epochs")
    return int(value) if value.is_integer() else value


def minutes_arg(text: str) -> float:
    """``--time-budget``: a positive number of minutes."""
    return positive_number(text, "minutes")


def count_arg(text: str) -> int:
    """A positive whole number (seeds, batch sizes, repeats)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def count_or_zero_arg(text: str) -> int:
    """A whole number >= 0 (0 meaning all or off, as the option says)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _off_if_zero(text: str) -> float | None:
    """``--clip-grad``: a number >= 0, 0 meaning off (``None``)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0 = off), got {text!r}")
    return value or None


def option(default: Any, help: str, *, flag: str | None = None, type: Callable[[str], Any] | None = None,
           choices: tuple[str, ...] | None = None, metavar: str | None = None, const: Any = None,
           factory: Callable[[], Any] | None = None) -> Any:
    """A :class:`TrainConfig` field with its command-line option: ``--name-with-dashes`` unless ``flag``; a bool
    field is a switch; ``const`` makes the value optional (``--ema`` alone means 0.999)."""
    meta = {"help": help, "flag": flag, "type": type, "choices": choices, "metavar": metavar, "const": const}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """The recipe. ``batch_size`` is the global batch: under torchrun each of N processes takes 1/N of it, and with
    ``accum_steps`` K each optimizer step accumulates K micro-batches of ``batch_size / K``, so the same command
    follows the same optimisation with or without torchrun or accumulation."""

    model: str = option(MISSING, "registered model name (see 'visionmix models'); required unless --resume")
    recipe: str = option("small", "field defaults: small (28-32 px data, from scratch) or deit (DeiT/SPACH/"
                                  "UniFormer ImageNet recipe: random-resized crop, RandAugment, erasing, mixup/"
                                  "cutmix, lr 5e-4 x batch/512, 5 warmup epochs); explicit options override it",
                         choices=("small", "deit"))
    data: str = option("fashion-mnist", "dataset", choices=DATASETS)
    data_dir: str | None = option(None, "dataset directory (default /usr/share/datasets/fashion-mnist for "
                                        "fashion-mnist; cifar10/cifar100/imagefolder need it, webdataset takes a "
                                        "shard pattern DIR/train-{000000..000009}.tar; digits is built in)")
    epochs: int | float = option(3, "training epochs; a fraction ends the run part-way into the last epoch, the "
                                    "cosine schedule spanning exactly that many steps (e.g. 4.5)", type=epochs_arg)
    batch_size: int = option(128, "global batch size (split evenly across torchrun processes)", type=count_arg)
    accum_steps: int = option(1, "accumulate gradients over K micro-batches of batch-size/K per optimizer step",
                              type=count_arg, metavar="K")
    lr: float = option(2e-3, f"peak learning rate of AdamW, in (0, {MAX_LR:g}] (scaled by batch-size / "
                             f"--lr-base-batch when that is set)")
    lr_base_batch: int | None = option(None, "the batch size --lr is given for: the peak LR is lr x batch-size / "
                                             "this (DeiT's linear scaling; default: --lr as given)", type=count_arg)
    weight_decay: float = option(0.05, "AdamW weight decay (not on biases, norms and no_weight_decay() parameters)")
    layer_decay: float | None = option(None, "layer-wise LR decay: group g of G (the model's group_matcher) gets "
                                             "lr x DECAY^(G-1-g) (default: off)", metavar="DECAY")
    warmup_epochs: float = option(0.5, "linear warmup length, in epochs")
    min_lr_ratio: float = option(0.01, "final LR of the cosine decay, relative to --lr")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy (also of mixup's soft targets)")
    clip_grad: float | None = option(5.0, "clip the global gradient norm to this; 0 = off", type=_off_if_zero)
    drop_path_rate: float | None = option(None, "stochastic depth rate (default: the model's own)",
                                          flag="--drop-path")
    ema_decay: float | None = option(None, "keep and evaluate an exponential moving average of the weights "
                                           "(DECAY 0.999 if no value; default: off)", flag="--ema", const=0.999,
                                     metavar="DECAY")
    seed: int = option(0, "seed of initialisation, batch order and augmentation")
    init: str | None = option(None, "fine-tune from these weights: an official .pth/.safetensors or a visionmix "
                                    "run directory; every key loads strictly except a classifier of another "
                                    "class count, which is re-initialised", metavar="CHECKPOINT")
    freeze: str = option("none", "backbone: train only the classifier (a linear probe)", choices=FREEZE_MODES)
    max_train_samples: int | None = option(None, "use a fixed random subset of this many training images "
                                                 "(in-memory data; default: all)", type=count_arg)
    max_eval_samples: int | None = option(None, "evaluate on a fixed subset of this many test images "
                                                "(in-memory data; default: all)", type=count_arg)
    val_fraction: float | None = option(None, "imagefolder with one tree: hold out this stratified fraction as the "
                                              "validation split (the same files every time)")
    image_size: int | None = option(None, "train at this square size (default: in-memory data keep their own, "
                                          "digits 28; streamed data take the model's pretrained_cfg size)",
                                    type=count_arg)
    augment: str = option("crop-flip", "small recipe's augmentation: random crop (zero padding 2 px at 28 px, 4 at "
                                       "32) + horizontal flip where it keeps the label, the flip only, or none",
                          choices=AUGMENTATIONS)
    crop_scale_min: float = option(0.08, "deit: smallest area share of RandomResizedCrop")
    crop_pct: float | None = option(None, "deit: evaluation centre crop share (default: the model's "
                                          "pretrained_cfg crop_pct)")
    randaug_n: int = option(2, "deit: RandAugment operations per image (0 = off)")
    randaug_m: float = option(9.0, "deit: RandAugment magnitude (of 10)")
    randaug_mstd: float = option(0.5, "deit: standard deviation of the RandAugment magnitude")
    reprob: float = option(0.25, "deit: random erasing probability")
    mixup: float = option(0.8, "deit: mixup alpha (0 = off)")
    cutmix: float = option(1.0, "deit: cutmix alpha (0 = off)")
    mix_switch_prob: float = option(0.5, "deit: probability of cutmix instead of mixup when both are on")
    repeated_aug: int = option(1, "deit: repeated augmentation (DeiT's RASampler): an epoch takes 1/R of the "
                                  "images, each R times with its own augmentation (DeiT: 3; 1 = off; not on "
                                  "webdataset shards)", metavar="R")
    workers: int = option(2, "streamed data (imagefolder, webdataset): decoding worker processes (0 = in the "
                             "training process)")
    max_bad_images: int | None = option(None, "streamed data: stop after this many unreadable images in a split "
                                              f"(default: {100 * BAD_IMAGE_SHARE:g}% of it)")
    model_kwargs: dict[str, Any] = option(None, "extra model keyword argument, VALUE read as JSON if it parses "
                                                "(repeatable), e.g. --model-arg conv_layer=dbb", flag="--model-arg",
                                          metavar="KEY=VALUE", factory=dict)
    device: str = option("auto", "auto = cuda when available", choices=DEVICES)
    amp: str = option("bf16", "mixed precision on CUDA: bf16 autocast, fp16 with a gradient scaler, or off (CPU "
                              "always trains in fp32)", choices=AMP_MODES)
    channels_last: bool = option(False, "keep model and inputs in channels-last memory format")
    compile: bool = option(False, "torch.compile the model for training")
    sync_bn: bool = option(False, "under torchrun: synchronise BatchNorm statistics across processes")
    eval_batch_size: int = option(500, "evaluation batch size", type=count_arg)
    time_budget_min: float | None = option(
        None, "train for at most this long (evaluation and checkpoint writes excluded; --epochs is then an upper "
              f"bound): the warmup is timed and the run fixed at the steps that fill {100 * BUDGET_FILL:g}%% of the "
              "budget at that speed, ending early if the machine slows down (default: off)",
        flag="--time-budget", type=minutes_arg, metavar="MINUTES")
    recompute_bn: str = option("auto", f"at the end, recompute BatchNorm statistics from the final weights on "
                                       f"{RECOMPUTE_BN_IMAGES:,} training images (after a short run the running "
                                       f"averages lag the weights); auto = for runs of under "
                                       f"{RECOMPUTE_BN_BELOW_STEPS} steps", choices=RECOMPUTE_BN)
    save_every: int = option(0, "also checkpoint every N optimizer steps (0: at epoch ends and on SIGINT/SIGTERM "
                                "only)")

    @property
    def peak_lr(self) -> float:
        """``lr``, scaled linearly by ``batch_size / lr_base_batch`` when that is set (DeiT's rule)."""
        return self.lr if self.lr_base_batch is None else self.lr * self.batch_size / self.lr_base_batch

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad field."""
        if not isinstance(self.model, str) or not self.model:
            raise InvalidValue(f"model must be a registered model name, got {self.model!r}")
        for name, choices in (("recipe", RECIPES), ("data", DATASETS), ("augment", AUGMENTATIONS),
                              ("recompute_bn", RECOMPUTE_BN), ("amp", AMP_MODES), ("freeze", FREEZE_MODES)):
            check_choice(name, getattr(self, name), choices)
        check_choice("device", self.device.split(":")[0], DEVICES)
        for name in ("batch_size", "eval_batch_size", "accum_steps", "repeated_aug"):
            check_positive(name, getattr(self, name))
        if self.batch_size % self.accum_steps:
            raise InvalidValue(f"batch_size={self.batch_size} must be divisible by accum_steps={self.accum_steps}")
        _check_range("epochs", self.epochs, 0.0, math.inf, low_open=True, high_open=True)
        for name in ("max_train_samples", "max_eval_samples", "image_size", "lr_base_batch"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        for name in ("seed", "save_every", "workers", "randaug_n", "max_bad_images"):
            value = getattr(self, name)
            if value is None and name == "max_bad_images":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or (name != "seed" and value < 0):
                raise InvalidValue(f"{name} must be {'an int' if name == 'seed' else 'an int >= 0'}, got {value!r}")
        _check_range("lr", self.lr, 0.0, MAX_LR, low_open=True)
        for name, low, high, low_open, high_open in (
                ("weight_decay", 0.0, math.inf, False, True), ("warmup_epochs", 0.0, math.inf, False, True),
                ("label_smoothing", 0.0, 1.0, False, True), ("min_lr_ratio", 0.0, 1.0, False, False),
                ("crop_scale_min", 0.0, 1.0, True, False), ("randaug_m", 0.0, 10.0, False, False),
                ("randaug_mstd", 0.0, math.inf, False, True), ("reprob", 0.0, 1.0, False, False),
                ("mixup", 0.0, math.inf, False, True), ("cutmix", 0.0, math.inf, False, True),
                ("mix_switch_prob", 0.0, 1.0, False, False)):
            _check_range(name, getattr(self, name), low, high, low_open=low_open, high_open=high_open)
        for name, low, high, low_open, high_open in (
                ("clip_grad", 0.0, math.inf, True, True), ("drop_path_rate", 0.0, 1.0, False, True),
                ("ema_decay", 0.0, 1.0, True, True), ("layer_decay", 0.0, 1.0, True, False),
                ("val_fraction", 0.0, 1.0, True, True), ("crop_pct", 0.0, 1.0, True, False),
                ("time_budget_min", 0.0, math.inf, True, True)):
            if getattr(self, name) is not None:
                _check_range(name, getattr(self, name), low, high, low_open=low_open, high_open=high_open)
        if self.peak_lr > MAX_LR:
            raise InvalidValue(f"lr x batch_size / lr_base_batch = {self.peak_lr:g} exceeds {MAX_LR:g}")
        if self.time_budget_min is not None and self.warmup_epochs == 0:
            raise InvalidValue("time_budget_min needs warmup_epochs > 0: the run's speed is measured during warmup "
                               "to fix its length")
        if self.repeated_aug > 1 and (self.recipe != "deit" or self.data == "webdataset"):
            raise InvalidValue(f"repeated_aug={self.repeated_aug} needs recipe='deit' on indexable data (not "
                               f"webdataset shards); got recipe={self.recipe!r}, data={self.data!r}")
        subsets = [name for name in ("max_train_samples", "max_eval_samples") if getattr(self, name) is not None]
        if subsets and self.data in STREAMED:
            raise InvalidValue(f"{' and '.join(subsets)} {'apply' if len(subsets) > 1 else 'applies'} to in-memory "
                               f"data; {self.data} is streamed from disk "
                               f"(pack a subset with 'visionmix data pack --max-samples N' instead)")
        if self.val_fraction is not None and self.data != "imagefolder":
            raise InvalidValue(f"val_fraction applies to data='imagefolder' only, not {self.data!r}")
        clash = sorted(set(self.model_kwargs) & {*DATA_SET_BY_ENGINE, "drop_path_rate"})
        if clash:
            raise InvalidValue(f"model_kwargs may not set {', '.join(clash)}: classes, channels and size follow the "
                               f"data (use image_size), drop-path has its own option")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """A config from saved values; fields a run saved before they existed take their defaults."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        if isinstance(values.get("augment"), bool):  # runs saved before the flip-only mode: True/False
            values["augment"] = "crop-flip" if values["augment"] else "none"
        if isinstance(values.get("amp"), bool):  # runs saved before --amp took a mode
            values["amp"] = "bf16" if values["amp"] else "off"
        return cls(**values)

    @classmethod
    def for_recipe(cls, recipe: str = "small", **values: Any) -> TrainConfig:
        """``recipe``'s defaults (:data:`RECIPES`) overridden by ``values``."""
        check_choice("recipe", recipe, RECIPES)
        return cls(**{**RECIPES[recipe], **values, "recipe": recipe})


# DeiT (2012.12877, table 9; timm's train.py flags for deit_*): AdamW lr 5e-4 per 512 images, wd 0.05, 5 warmup
# epochs, cosine to 1e-5 (min_lr_ratio 0.02), no clipping, label smoothing 0.1, the model's drop-path, RandAugment
# m9-mstd0.5 (n=2), random erasing 0.25, mixup 0.8 / cutmix 1.0 (switch 0.5), 300 epochs.
RECIPES: dict[str, dict[str, Any]] = {
    "small": {},
    "deit": {"epochs": 300, "batch_size": 1024, "lr": 5e-4, "lr_base_batch": 512, "weight_decay": 0.05,
             "warmup_epochs": 5, "min_lr_ratio": 0.02, "clip_grad": None, "label_smoothing": 0.1},
}


def _check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidType(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or math.isnan(value):
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise InvalidValue(f"{name} must be in {bounds}, got {value}")


# ------------------------------------------------------------------------------------------- the CLI side
def _model_arg(text: str) -> tuple[str, Any]:
    import json

    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _field_type(f: Field) -> Callable[[str], Any]:
    given = f.metadata["type"]
    if given is not None:
        return given
    kind = str(f.type)
    return int if kind.startswith("int") else float if kind.startswith("float") else str


def option_flag(f: Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def add_config_options(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """One option per :class:`TrainConfig` field (but ``skip``). An option not given is absent from the parsed
    namespace (``argparse.SUPPRESS``), so :func:`config_values` can tell what was given (``--clip-grad 0`` sets
    None); the help shows the small recipe's default and,
    where it differs, deit's."""
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        meta = f.metadata
        default = f.default if f.default is not MISSING else None
        shown = [] if default in (None, False) or isinstance(default, dict) else [f"(default: {default})"]
        if f.name in RECIPES["deit"] and RECIPES["deit"][f.name] != default:
            shown.append(f"(deit: {RECIPES['deit'][f.name]})")
        text = " ".join([meta["help"], *shown])
        text = text.replace("%", "%%").replace("%%%%", "%%")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text}
        if isinstance(default, bool):
            parser.add_argument(option_flag(f), action="store_const", const=True, **kwargs)
            continue
        if f.name == "model_kwargs":
            parser.add_argument(option_flag(f), type=_model_arg, action="append", metavar=meta["metavar"], **kwargs)
            continue
        if meta["const"] is not None:
            kwargs.update(nargs="?", const=meta["const"])
        parser.add_argument(option_flag(f), type=_field_type(f), choices=meta["choices"], metavar=meta["metavar"],
                            **kwargs)


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`TrainConfig` fields given on the command line (see :func:`add_config_options`)."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if "model_kwargs" in values:
        values["model_kwargs"] = dict(values["model_kwargs"])
    return values
