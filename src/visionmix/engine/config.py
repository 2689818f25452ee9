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

from visionmix.checks import check_choice
from visionmix.data import AUGMENTATIONS, DATASETS
from visionmix.errors import InvalidType, InvalidValue

DEVICES = ("auto", "cpu", "cuda")
INIT_PRETRAINED = "pretrained"  # --init: the model's released weights (visionmix.models.pretrained)
AMP_MODES = ("auto", "bf16", "fp16", "off")  # auto: bf16 on CUDA, fp32 on CPU
FREEZE_MODES = ("none", "backbone")
RECOMPUTE_BN = ("auto", "on", "off")
RECOMPUTE_BN_BELOW_STEPS = 1000  # "auto": shorter runs end with BN statistics recomputed from the final weights
RECOMPUTE_BN_IMAGES = 5_000  # training images (un-augmented, fixed order) the recomputation passes through
RECOMPUTE_BN_BATCH = 100  # its batch size, fixed: the statistics depend on it, --eval-batch-size changes only speed
EVAL_BATCH_SIZE = 100  # on CPU 1.6-1.8x faster than 500 (the activations of 100 28 px images stay in cache)
SKIPPED_STEPS_LIMIT = 20  # fp16: this many steps in a row skipped by the gradient scaler stop the run
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


@dataclass(frozen=True)
class Range:
    """A number in ``[low, high]``, an end excluded where it is ``open`` (``Range(0, 1, high_open=True)``: [0, 1))."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    def check(self, name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidType(f"{name} must be a number, got {type(value).__name__} ({value!r})")
        too_low = value <= self.low if self.low_open else value < self.low
        too_high = value >= self.high if self.high_open else value > self.high
        if too_low or too_high or math.isnan(value):
            low, high = float(self.low), float(self.high)
            bounds = f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
            raise InvalidValue(f"{name} must be in {bounds}, got {value}")


@dataclass(frozen=True)
class Whole:
    """A whole number of at least ``low`` (``None``: any)."""

    low: int | None = 0

    def check(self, name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or (self.low is not None and value < self.low):
            kind = "an int" if self.low is None else f"an int >= {self.low}"
            raise InvalidValue(f"{name} must be {kind}, got {value!r}")


GROUPS = ("model and data", "recipe", "augmentation", "optimisation", "hardware", "output")
APPLIES = {  # when a field matters (the report's recipe line shows only those): a predicate of the config
    "deit": lambda cfg: cfg.recipe == "deit", "small": lambda cfg: cfg.recipe == "small",
    "streamed": lambda cfg: cfg.data in STREAMED, "in-memory": lambda cfg: cfg.data not in STREAMED,
    "imagefolder": lambda cfg: cfg.data == "imagefolder",
}


def option(default: Any, help: str, *, group: str, valid: Range | Whole | None = None, applies: str | None = None,
           in_report: bool = True, flag: str | None = None, type: Callable[[str], Any] | None = None,
           choices: tuple[str, ...] | None = None, metavar: str | None = None, const: Any = None,
           factory: Callable[[], Any] | None = None) -> Any:
    """A :class:`TrainConfig` field with its command-line option: ``--name-with-dashes`` unless ``flag``; a bool
    field is a switch; ``const`` makes the value optional (``--ema`` alone means 0.999). ``group`` is its section
    of ``--help`` (:data:`GROUPS`), ``valid`` the values it takes (``None`` passes for an optional field),
    ``applies`` when it matters (:data:`APPLIES`), ``in_report`` whether it changes what is learnt (a comparison's
    recipe line shows it)."""
    check_choice("group", group, GROUPS)
    meta = {"help": help, "flag": flag, "type": type, "choices": choices, "metavar": metavar, "const": const,
            "group": group, "valid": valid, "applies": applies, "in_report": in_report}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """The recipe. ``batch_size`` is the global batch: under torchrun each of N processes takes 1/N of it, and with
    ``accum_steps`` K each optimizer step accumulates K micro-batches of ``batch_size / K``, so the same command
    follows the same optimisation with or without torchrun or accumulation."""

    model: str = option(MISSING, "registered model name (see 'visionmix models'); required unless --resume",
                        group="model and data", in_report=False)
    recipe: str = option("small", "field defaults: small (28-32 px data, from scratch) or deit (DeiT/SPACH/"
                                  "UniFormer ImageNet recipe: random-resized crop, RandAugment, erasing, mixup/"
                                  "cutmix, lr 5e-4 x batch/512, 5 warmup epochs); explicit options override it",
                         choices=("small", "deit"), group="recipe")
    data: str = option("fashion-mnist", "dataset", choices=DATASETS, group="model and data", in_report=False)
    data_dir: str | None = option(None, "dataset directory (default /usr/share/datasets/fashion-mnist for "
                                        "fashion-mnist; cifar10/cifar100/imagefolder need it, webdataset takes a "
                                        "shard pattern DIR/train-{000000..000009}.tar; digits is built in)",
                                  group="model and data", in_report=False)
    epochs: int | float = option(3, "training epochs; a fraction ends the run part-way into the last epoch, the "
                                    "cosine schedule spanning exactly that many steps (e.g. 4.5)", type=epochs_arg,
                                 group="optimisation", valid=Range(0, low_open=True))
    batch_size: int = option(128, "global batch size (split evenly across torchrun processes)", type=count_arg,
                             group="optimisation", valid=Whole(1))
    accum_steps: int = option(1, "accumulate gradients over K micro-batches of batch-size/K per optimizer step",
                              type=count_arg, metavar="K", group="hardware", valid=Whole(1))
    lr: float = option(2e-3, f"peak learning rate of AdamW, in (0, {MAX_LR:g}] (scaled by batch-size / "
                             f"--lr-base-batch when that is set)",
                       group="optimisation", valid=Range(0, MAX_LR, low_open=True, high_open=False))
    lr_base_batch: int | None = option(None, "the batch size --lr is given for: the peak LR is lr x batch-size / "
                                             "this (DeiT's linear scaling; default: --lr as given)", type=count_arg,
                                       group="optimisation", valid=Whole(1))
    weight_decay: float = option(0.05, "AdamW weight decay (not on biases, norms and no_weight_decay() parameters)",
                                 group="optimisation", valid=Range(0))
    layer_decay: float | None = option(None, "layer-wise LR decay: group g of G (the model's group_matcher) gets "
                                             "lr x DECAY^(G-1-g) (default: off)", metavar="DECAY",
                                       group="optimisation", valid=Range(0, 1, low_open=True, high_open=False))
    warmup_epochs: float = option(0.5, "linear warmup length, in epochs", group="optimisation", valid=Range(0))
    min_lr_ratio: float = option(0.01, "final LR of the cosine decay, relative to --lr",
                                 group="optimisation", valid=Range(0, 1, high_open=False))
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy (also of mixup's soft targets)",
                                    group="optimisation", valid=Range(0, 1))
    clip_grad: float | None = option(5.0, "clip the global gradient norm to this; 0 = off", type=_off_if_zero,
                                     group="optimisation", valid=Range(0, low_open=True))
    drop_path_rate: float | None = option(None, "stochastic depth rate (default: the model's own)",
                                          flag="--drop-path", group="optimisation", valid=Range(0, 1))
    ema_decay: float | None = option(None, "keep and evaluate an exponential moving average of the weights "
                                           "(DECAY 0.999 if no value; default: off)", flag="--ema", const=0.999,
                                     metavar="DECAY", group="optimisation", valid=Range(0, 1, low_open=True))
    seed: int = option(0, "seed of initialisation, batch order and augmentation",
                       group="model and data", valid=Whole(None), in_report=False)
    init: str | None = option(None, "fine-tune from these weights: 'pretrained' (the model's released weights, "
                                    "visionmix models --pretrained), an official .pth/.safetensors or a visionmix "
                                    "run directory; every key loads strictly except a classifier of another "
                                    "class count, which is re-initialised", metavar="CHECKPOINT",
                              group="model and data")
    freeze: str = option("none", "backbone: train only the classifier (a linear probe)", choices=FREEZE_MODES,
                         group="optimisation")
    max_train_samples: int | None = option(None, "use a fixed random subset of this many training images "
                                                 "(in-memory data; default: all)", type=count_arg,
                                           group="model and data", valid=Whole(1), applies="in-memory")
    max_eval_samples: int | None = option(None, "evaluate on a fixed subset of this many test images "
                                                "(in-memory data; default: all)", type=count_arg,
                                          group="model and data", valid=Whole(1), applies="in-memory")
    val_fraction: float | None = option(None, "imagefolder with one tree: hold out this stratified fraction as the "
                                              "validation split (the same files every time)",
                                        group="model and data", valid=Range(0, 1, low_open=True),
                                        applies="imagefolder")
    image_size: int | None = option(None, "train at this square size (default: in-memory data keep their own, "
                                          "digits 28; streamed data take the model's pretrained_cfg size)",
                                    type=count_arg, group="model and data", valid=Whole(1))
    augment: str = option("crop-flip", "small recipe's augmentation: random crop (zero padding 2 px at 28 px, 4 at "
                                       "32) + horizontal flip where it keeps the label, the flip only, or none",
                          choices=AUGMENTATIONS, group="augmentation", applies="small")
    crop_scale_min: float = option(0.08, "deit: smallest area share of RandomResizedCrop",
                                   group="augmentation", valid=Range(0, 1, low_open=True, high_open=False),
                                   applies="deit")
    crop_pct: float | None = option(None, "deit: evaluation centre crop share (default: the model's "
                                          "pretrained_cfg crop_pct)",
                                    group="augmentation", valid=Range(0, 1, low_open=True, high_open=False),
                                    applies="deit")
    randaug_n: int = option(2, "deit: RandAugment operations per image (0 = off)",
                            group="augmentation", valid=Whole(0), applies="deit")
    randaug_m: float = option(9.0, "deit: RandAugment magnitude (of 10)",
                              group="augmentation", valid=Range(0, 10, high_open=False), applies="deit")
    randaug_mstd: float = option(0.5, "deit: standard deviation of the RandAugment magnitude",
                                 group="augmentation", valid=Range(0), applies="deit")
    reprob: float = option(0.25, "deit: random erasing probability",
                           group="augmentation", valid=Range(0, 1, high_open=False), applies="deit")
    mixup: float = option(0.8, "deit: mixup alpha (0 = off)", group="augmentation", valid=Range(0), applies="deit")
    cutmix: float = option(1.0, "deit: cutmix alpha (0 = off)", group="augmentation", valid=Range(0), applies="deit")
    mix_switch_prob: float = option(0.5, "deit: probability of cutmix instead of mixup when both are on",
                                    group="augmentation", valid=Range(0, 1, high_open=False), applies="deit")
    repeated_aug: int = option(1, "deit: repeated augmentation (DeiT's RASampler): an epoch takes 1/R of the "
                                  "images, each R times with its own augmentation (DeiT: 3; 1 = off; not on "
                                  "webdataset shards)", metavar="R",
                               group="augmentation", valid=Whole(1), applies="deit")
    workers: int = option(2, "streamed data (imagefolder, webdataset): decoding worker processes (0 = in the "
                             "training process)", group="hardware", valid=Whole(0), applies="streamed", in_report=False)
    max_bad_images: int | None = option(None, "streamed data: stop after this many unreadable images in a split "
                                              f"(default: {100 * BAD_IMAGE_SHARE:g}% of it)",
                                        group="model and data", valid=Whole(0),
                                        applies="streamed", in_report=False)
    model_kwargs: dict[str, Any] = option(None, "extra model keyword argument, VALUE read as JSON if it parses "
                                                "(repeatable), e.g. --model-arg conv_layer=dbb", flag="--model-arg",
                                          metavar="KEY=VALUE", factory=dict, group="model and data")
    device: str = option("auto", "auto = cuda when available", choices=DEVICES, group="hardware", in_report=False)
    amp: str = option("auto", "mixed precision on the training device: bf16 autocast, fp16 autocast with a "
                              "gradient scaler (steps with non-finite gradients are skipped and counted; "
                              f"{SKIPPED_STEPS_LIMIT} in a row stop the run), off (fp32), or auto (bf16 on CUDA, "
                              "fp32 on CPU)", choices=AMP_MODES, group="hardware")
    channels_last: bool = option(False, "keep model and inputs in channels-last memory format",
                                 group="hardware", in_report=False)
    compile: bool = option(False, "torch.compile the model for training", group="hardware", in_report=False)
    sync_bn: bool = option(False, "under torchrun: synchronise BatchNorm statistics across processes", group="hardware")
    deterministic: bool = option(False, "deterministic kernels: cuDNN deterministic without autotuning, "
                                        "torch.use_deterministic_algorithms (a warning names an op that has none); "
                                        "on CUDA a resumed run then continues bit for bit, at some speed",
                                 group="hardware", in_report=False)
    eval_batch_size: int = option(EVAL_BATCH_SIZE, "evaluation batch size", type=count_arg,
                                  group="hardware", valid=Whole(1), in_report=False)
    time_budget_min: float | None = option(
        None, "train for at most this long (evaluation and checkpoint writes excluded; --epochs is then an upper "
              f"bound): the warmup is timed and the run fixed at the steps that fill {100 * BUDGET_FILL:g}%% of the "
              "budget at that speed, ending early if the machine slows down (default: off)",
        flag="--time-budget", type=minutes_arg, metavar="MINUTES", group="optimisation", valid=Range(0, low_open=True))
    recompute_bn: str = option("auto", f"at the end, recompute BatchNorm statistics from the final weights on "
                                       f"{RECOMPUTE_BN_IMAGES:,} training images (after a short run the running "
                                       f"averages lag the weights); auto = for runs of under "
                                       f"{RECOMPUTE_BN_BELOW_STEPS} steps", choices=RECOMPUTE_BN, group="optimisation")
    save_every: int = option(0, "also checkpoint every N optimizer steps (0: at epoch ends and on SIGINT/SIGTERM "
                                "only)", group="output", valid=Whole(0), in_report=False)

    @property
    def peak_lr(self) -> float:
        """``lr``, scaled linearly by ``batch_size / lr_base_batch`` when that is set (DeiT's rule)."""
        return self.lr if self.lr_base_batch is None else self.lr * self.batch_size / self.lr_base_batch

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad field: each field against its ``choices`` and
        ``valid`` metadata, then the rules between fields."""
        if not isinstance(self.model, str) or not self.model:
            raise InvalidValue(f"model must be a registered model name, got {self.model!r}")
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None:
                if "None" not in str(f.type):  # the annotation says whether None (off, the model's own) is a value
                    raise InvalidValue(f"{f.name} must be set (it has no 'off' value), got None")
                continue
            if meta["choices"] is not None:
                check_choice(f.name, value.split(":")[0] if f.name == "device" else value, meta["choices"])
            if meta["valid"] is not None:
                meta["valid"].check(f.name, value)
        if self.batch_size % self.accum_steps:
            raise InvalidValue(f"batch_size={self.batch_size} must be divisible by accum_steps={self.accum_steps}")
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
        if self.init == INIT_PRETRAINED:
            from visionmix.models.pretrained import resolve

            resolve(self.model)  # a model without released weights fails here, before anything trains
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
        if values.get("amp") == "bf16" and "deterministic" not in values:  # saved when "bf16" meant "auto" (CUDA only)
            values["amp"] = "auto"
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


def add_config_options(parser: argparse.ArgumentParser, *,
                       skip: tuple[str, ...] = ()) -> dict[str, argparse._ArgumentGroup]:
    """One option per :class:`TrainConfig` field (but ``skip``), in ``--help`` sections by the fields' groups
    (:data:`GROUPS`, returned so a command adds its own options to them). An option not given is absent from the
    parsed namespace (``argparse.SUPPRESS``), so :func:`config_values` can tell what was given (``--clip-grad 0``
    sets None); the help shows the small recipe's default and, where it differs, deit's."""
    sections = {name: parser.add_argument_group(name) for name in GROUPS}
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        meta, section = f.metadata, sections[f.metadata["group"]]
        default = f.default if f.default is not MISSING else None
        shown = [] if default in (None, False) or isinstance(default, dict) else [f"(default: {default})"]
        if f.name in RECIPES["deit"] and RECIPES["deit"][f.name] != default:
            shown.append(f"(deit: {RECIPES['deit'][f.name]})")
        text = " ".join([meta["help"], *shown])
        text = text.replace("%", "%%").replace("%%%%", "%%")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text}
        if isinstance(default, bool):
            section.add_argument(option_flag(f), action="store_const", const=True, **kwargs)
            continue
        if f.name == "model_kwargs":
            section.add_argument(option_flag(f), type=_model_arg, action="append", metavar=meta["metavar"], **kwargs)
            continue
        if meta["const"] is not None:
            kwargs.update(nargs="?", const=meta["const"])
        section.add_argument(option_flag(f), type=_field_type(f), choices=meta["choices"], metavar=meta["metavar"],
                             **kwargs)
    return sections


def report_fields(cfg: TrainConfig, device: str) -> dict[str, Any]:
    """The fields of ``cfg`` that change what is learnt and apply to it (no RandAugment under the small recipe, no
    worker count for in-memory data), ``amp`` as used on ``device`` (:func:`amp_mode`): a comparison's recipe
    line."""
    shown = {}
    for f in fields(TrainConfig):
        applies = f.metadata["applies"]
        if f.metadata["in_report"] and (applies is None or APPLIES[applies](cfg)):
            shown[f.name] = getattr(cfg, f.name)
    shown["amp"] = amp_mode(cfg.amp, device.split(":")[0])
    return shown


def amp_mode(amp: str, device_type: str) -> str:
    """The precision ``--amp`` trains in on a device of ``device_type``: "bf16", "fp16" or "off" (fp32); "auto" is
    bf16 on CUDA and fp32 elsewhere."""
    if amp == "auto":
        return "bf16" if device_type == "cuda" else "off"
    return amp


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`TrainConfig` fields given on the command line (see :func:`add_config_options`)."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if "model_kwargs" in values:
        values["model_kwargs"] = dict(values["model_kwargs"])
    return values
