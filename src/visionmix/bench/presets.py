"""The comparisons ``visionmix compare --preset`` runs, and the papers' claims a comparison can test.

A :class:`Claim` names two registered models and what one paper says of them; ``PAPER_CLAIMS`` lists every claim
the ``claims`` preset decides (SPACH 2108.13002, UniFormer 2201.09450, S2-MLPv2 2108.01072, DBB 2103.13425, DO-Conv
2006.12030, PSConv 2007.06191, SE 1709.01507, SK 1903.06586, ULSAM 2006.15102, CondConv 1904.04971, WeightNet
2007.11823).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from visionmix.bench.stats import CLAIM_KINDS
from visionmix.checks import check_choice
from visionmix.errors import DataError, InvalidValue


@dataclass(frozen=True)
class Claim:
    """A paper's claim about test top-1, tested on the paired difference Δ = ``model_a`` - ``model_b``: ``kind`` is
    "better" (Δ > 0), "on par" (|Δ| within ``ON_PAR_MARGIN``) or "not worse" (Δ above ``-ON_PAR_MARGIN``); see
    ``visionmix.bench.stats.claim_verdict``."""

    paper: str
    statement: str
    model_a: str
    model_b: str
    kind: str = "better"

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, CLAIM_KINDS)


_SPACH = "SPACH (2108.13002)"


_SAME_COST = "beats the plain ResNet at the same deployed cost"


PAPER_CLAIMS: tuple[Claim, ...] = (
    *(Claim(_SPACH, f"multi-stage beats single-stage ({kind} mixing)", f"spach_ms_nano_{kind}", f"spach_nano_{kind}")
      for kind in ("conv", "attn", "mlp")),
    Claim(_SPACH, "with local modelling, conv and attention mixing are on par", "spach_ms_nano_conv",
          "spach_ms_nano_attn", "on par"),
    Claim(_SPACH, "MLP mixing is strong at small size: not worse than conv", "spach_ms_nano_mlp", "spach_ms_nano_conv",
          "not worse"),
    Claim(_SPACH, "MLP mixing is strong at small size: not worse than attention", "spach_ms_nano_mlp",
          "spach_ms_nano_attn", "not worse"),
    Claim("DBB (2103.13425)", f"Diverse Branch Block {_SAME_COST}", "dbb_resnet_nano", "resnet_nano"),
    Claim("DO-Conv (2006.12030)", f"depthwise over-parameterised conv {_SAME_COST}", "doconv_resnet_nano",
          "resnet_nano"),
    Claim("PSConv (2007.06191)", f"poly-scale conv {_SAME_COST}", "psresnet_nano", "resnet_nano"),
    Claim("SE (1709.01507)", "squeeze-and-excitation beats the plain ResNet", "seresnet_nano", "resnet_nano"),
    Claim("SKNet (1903.06586)", "selective kernels beat the plain ResNet", "skresnet_nano", "resnet_nano"),
    Claim("ULSAM (2006.15102)", "subspace attention beats the plain ResNet", "ulsam_resnet_nano", "resnet_nano"),
    Claim("CondConv (1904.04971)", "conditional convs beat the plain ResNet", "condconv_resnet_nano", "resnet_nano"),
    Claim("WeightNet (2007.11823)", "generated weights beat the plain ResNet", "weightnet_resnet_nano", "resnet_nano"),
    Claim("UniFormer (2201.09450)", "hybrid local conv + global attention beats pure attention", "uniformer_nano",
          "spach_ms_nano_attn"),
    Claim("S2-MLPv2 (2108.01072)", "spatial shift + split attention beats Mixer", "s2mlpv2_nano", "mixer_nano"),
)


@dataclass(frozen=True)
class Preset:
    """A named comparison: models, dataset, seeds, the training recipe (``TrainConfig`` fields) and the baseline of
    the paired differences (``None``: the first model). ``fallback_recipe`` (with ``data="digits"``) is used when
    Fashion-MNIST is not installed; ``None``: error."""

    models: tuple[str, ...]
    data: str
    seeds: int
    recipe: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    fallback_recipe: dict[str, Any] | None = None
    baseline: str | None = None


PRESETS: dict[str, Preset] = {
    "demo": Preset(
        models=("resnet_nano", "uniformer_nano", "mixer_nano", "s2mlpv2_nano"),
        data="fashion-mnist", seeds=1,
        recipe={"epochs": 2, "max_train_samples": 6000, "max_eval_samples": 2000, "batch_size": 64,
                "warmup_epochs": 0.2},
        description="one model per mixing type (conv, attention, MLP, shift-MLP) on a 6k Fashion-MNIST subset",
        fallback_recipe={"epochs": 6},
    ),
    "fmnist": Preset(
        models=("resnet_nano", "mixer_nano", "s2mlpv2_nano", "spach_ms_nano_conv", "spach_ms_nano_attn",
                "spach_ms_nano_mlp", "uniformer_nano"),
        data="fashion-mnist", seeds=1, recipe={"epochs": 3},
        description="every family's nano model on full Fashion-MNIST",
    ),
    # Sizing (2 CPU threads, training img/s at batch 128 measured with `visionmix train --epochs 0.02-0.05` while the
    # machine was shared, so an upper bound on time): resnet 189, skresnet 169, doconv 149, spach_ms attn 223,
    # uniformer 110, ulsam 104, condconv 66, psresnet 57, weightnet 47, dbb 46 (training form); the 18 models sum to
    # about 0.15 s per training image per seed, and one evaluation on the 10,000 test images costs 15-95 s a model
    # (about 565 s for all, at the former evaluation batch of 500; batches of 100 are 1.6-1.8x faster). 15,000
    # training images (0.25 epoch) x 3 seeds: 3 x (15,000 x 0.15 + 565) + 18 x 20 s of benchmark = 8,900 s, about
    # 2.5 hours; it resumes, so it may be run in parts. Measured: 130 min inline at 2 threads, 98 min with --jobs 2
    # (one thread per run; evaluation in batches of 100, BN statistics from 5k images) on 2 cores (README).
    "claims": Preset(
        models=("resnet_nano", "seresnet_nano", "skresnet_nano", "ulsam_resnet_nano", "condconv_resnet_nano",
                "weightnet_resnet_nano", "dbb_resnet_nano", "doconv_resnet_nano", "psresnet_nano",
                "spach_nano_conv", "spach_nano_attn", "spach_nano_mlp", "spach_ms_nano_conv", "spach_ms_nano_attn",
                "spach_ms_nano_mlp", "uniformer_nano", "mixer_nano", "s2mlpv2_nano"),
        data="fashion-mnist", seeds=3, recipe={"epochs": 0.25, "batch_size": 64, "warmup_epochs": 0.02},
        description="the papers' claims (PAPER_CLAIMS) on full Fashion-MNIST: every nano model for a quarter epoch "
                    "(15,000 images, 234 steps), 3 seeds, paired against resnet_nano; about 100 min on 2 CPU cores",
        baseline="resnet_nano",
    ),
}


def fashion_mnist_missing(data_dir: str | Path | None = None) -> str | None:
    """``None`` if Fashion-MNIST can be read from ``data_dir`` (default: Debian's directory), else the reason."""
    from visionmix.data import build_dataset

    try:
        build_dataset("fashion-mnist", "test", data_dir, max_samples=1)
    except DataError as err:
        return str(err)
    return None


def resolve_preset(name: str, data_dir: str | Path | None = None) -> tuple[Preset, str]:
    """The preset ``name`` as it will run here, and a note: a preset with a fallback switches to the bundled
    digits (with the note saying why) when Fashion-MNIST is absent, so ``make demo`` works on a fresh machine."""
    check_choice("preset", name, PRESETS)
    preset = PRESETS[name]
    if preset.data != "fashion-mnist" or preset.fallback_recipe is None:
        return preset, ""
    missing = fashion_mnist_missing(data_dir)
    if missing is None:
        return preset, ""
    note = (f"this run used scikit-learn's bundled digits (1,797 8x8 images) because Fashion-MNIST is not "
            f"available: {missing}")
    return replace(preset, data="digits", recipe=dict(preset.fallback_recipe)), note


@dataclass(frozen=True)
class Comparison:
    """What ``compare`` runs: models, data, seeds, the recipe (the preset's, then the options given), the baseline
    (None: the first model) and a note when the preset fell back to other data."""

    models: tuple[str, ...]
    data: str
    seeds: int
    recipe: dict[str, Any]
    baseline: str | None
    note: str = ""


def resolve_comparison(preset: str | None, models: str | None, given: Mapping[str, Any], *, seeds: int | None = None,
                       baseline: str | None = None) -> Comparison:
    """Merge a preset (or none) with what the user gave: ``models`` comma-separated, ``given`` the recipe options
    set explicitly (they override the preset's), ``seeds`` and ``baseline`` (default: the preset's, if its baseline
    is compared). A preset falls back to digits when Fashion-MNIST is missing, unless the data were chosen."""
    note = ""
    if preset is not None and "data" in given:  # the data were chosen explicitly: no fallback to digits
        chosen = PRESETS[preset]
    elif preset is not None:
        chosen, note = resolve_preset(preset, given.get("data_dir"))
    else:
        if not models:
            raise InvalidValue("compare needs --models a,b,c or --preset NAME")
        chosen = Preset(models=(), data="fashion-mnist", seeds=1)
    names = tuple(m.strip() for m in models.split(",") if m.strip()) if models else chosen.models
    data = given.get("data", chosen.data)
    overrides = {k: v for k, v in given.items() if k != "data" and not (k == "data_dir" and data == "digits")}
    return Comparison(models=names, data=data, seeds=chosen.seeds if seeds is None else seeds,
                      recipe={**chosen.recipe, **overrides},
                      baseline=baseline or (chosen.baseline if chosen.baseline in names else None), note=note)
