"""Fair comparison of architectures, as SPACH (arXiv 2108.13002) argues for: one training recipe for every model,
then accuracy next to parameters, MACs and measured speed.

``compare`` trains each model for each seed with the engine's ``train`` (same data, epochs and hyper-parameters),
benchmarks the deployed form (``visionmix.reparameterize``) of the trained model once, and writes into ``out_dir``::

    runs/<model>/seed<k>/   the engine's run directory (checkpoint, metrics.jsonl, summary.json)
    runs/<model>/bench.json the speed measurement
    results.csv, results.json, results.md, accuracy_vs_macs.png, accuracy_vs_throughput.png, training_curves.png,
    differences.png, claims.csv (when a claim's two models are compared)

A run whose ``summary.json`` exists is finished and is not trained again, so an interrupted comparison resumes where
it stopped (an interrupted run resumes from its last checkpoint). A model that fails is reported with its error and
does not stop the others. The report is rewritten after every model. Accuracies are mean ± sample standard deviation
over the seeds that finished.

Verdicts (``visionmix.bench.stats``): runs of one seed share data order and augmentation across models, so every
model is compared with the ``baseline`` seed by seed (the paired t interval of its top-1 minus the baseline's over
the seeds both finished), and each of the papers' claims (``PAPER_CLAIMS``) whose two models are in the comparison
is tested the same way on its own pair of models.
"""

from __future__ import annotations

import io
import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from visionmix.bench.profile import environment, profile_model, si_format, to_csv
from visionmix.bench.stats import (
    CLAIM_KINDS,
    ON_PAR_MARGIN,
    PairedDifference,
    claim_verdict,
    paired_difference,
)
from visionmix.checks import check_choice, check_positive
from visionmix.errors import DataError, InvalidValue, TrainingInterrupted
from visionmix.files import atomic_write, atomic_write_json, entries, hold_directory

PLOTS = ("accuracy_vs_macs.png", "accuracy_vs_throughput.png", "training_curves.png", "differences.png")
FORMAT = "visionmix-compare/1"  # results.json says this: the directory is a comparison, resumed when re-run


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
    # (about 565 s for all). 15,000 training images (0.25 epoch) x 3 seeds: 3 x (15,000 x 0.15 + 565) + 18 x 20 s of
    # benchmark = 8,900 s, about 2.5 hours; it resumes, so it may be run in parts.
    "claims": Preset(
        models=("resnet_nano", "seresnet_nano", "skresnet_nano", "ulsam_resnet_nano", "condconv_resnet_nano",
                "weightnet_resnet_nano", "dbb_resnet_nano", "doconv_resnet_nano", "psresnet_nano",
                "spach_nano_conv", "spach_nano_attn", "spach_nano_mlp", "spach_ms_nano_conv", "spach_ms_nano_attn",
                "spach_ms_nano_mlp", "uniformer_nano", "mixer_nano", "s2mlpv2_nano"),
        data="fashion-mnist", seeds=3, recipe={"epochs": 0.25, "batch_size": 64, "warmup_epochs": 0.02},
        description="the papers' claims (PAPER_CLAIMS) on full Fashion-MNIST: every nano model for a quarter epoch "
                    "(15,000 images, 234 steps), 3 seeds, paired against resnet_nano; about 2.5 h on 2 CPU threads",
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


@dataclass
class RunOutcome:
    """One (model, seed): the engine's summary if it finished, else the error."""

    model: str
    seed: int
    summary: dict[str, Any] | None = None
    error: str | None = None
    skipped: bool = False


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]


def _run_one(cfg: Any, run_dir: Path, progress: bool) -> RunOutcome:
    """Train one (model, seed) into ``run_dir``; a finished run is returned as is, an interrupted one resumed
    (the engine checks that the recipe is the same). A Ctrl-C/SIGTERM stops the whole comparison."""
    from visionmix.engine import train

    skipped = (run_dir / "summary.json").is_file()
    try:
        summary = train(cfg, run_dir, resume=True, progress=progress)
    except TrainingInterrupted as err:
        raise TrainingInterrupted(f"{err}; to resume the whole comparison, run the same 'visionmix compare' "
                                  "command again", err.signum) from err
    except Exception as err:  # any failure of one model is reported in its row; the comparison goes on
        return RunOutcome(cfg.model, cfg.seed, error=_describe(err))
    return RunOutcome(cfg.model, cfg.seed, summary=summary, skipped=skipped)


def _bench_run(name: str, run_dir: Path, bench_path: Path, batch_size: int, repeats: int) -> dict[str, Any]:
    """Benchmark the deployed form of the trained model in ``run_dir`` (cached in ``bench_path``)."""
    try:
        record = json.loads(bench_path.read_text())
        if record["batch_size"] == batch_size:
            return record
    except (OSError, ValueError, TypeError, KeyError):
        pass  # not measured yet, or a damaged record of ours: measure again
    from visionmix.engine.checkpoint import load_run
    from visionmix.reparam import reparameterize

    model, _ = load_run(run_dir)
    deployed = reparameterize(model.eval())
    result = profile_model(deployed, name=name, form="deploy",
                           input_size=model.pretrained_cfg["input_size"], batch_size=batch_size, repeats=repeats)
    record = {**asdict(result), "environment": environment()}
    atomic_write(bench_path, json.dumps(record, indent=2) + "\n")
    return record


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


# TrainConfig fields that are not part of the recipe shown in the report (they do not change what is learnt)
_NOT_RECIPE = ("model", "data", "seed", "data_dir", "device", "save_every", "eval_batch_size", "workers")
_BENCH_KEYS = ("params", "macs", "throughput", "throughput_spread", "latency_ms", "peak_mem_mb")


def summarize(model: str, outcomes: Sequence[RunOutcome], bench: dict[str, Any] | None,
              bench_error: str | None) -> dict[str, Any]:
    """One results row for ``model``: accuracy mean/std over finished seeds, cost and speed, status and error."""
    done = [o.summary for o in outcomes if o.summary is not None]
    errors = [f"seed {o.seed}: {o.error}" for o in outcomes if o.error]
    if bench_error:
        errors.append(f"bench: {bench_error}")
    if not done:
        status = "failed"
    elif len(done) < len(outcomes):
        status = f"partial ({len(done)}/{len(outcomes)})"
    else:
        status = "bench failed" if bench_error else "ok"
    top1, top1_std = _mean_std([s["top1"] for s in done])
    top5, top5_std = _mean_std([s["top5"] for s in done])
    bench = bench or {}
    return {
        "model": model, "status": status, "seeds": len(done), "top1": top1, "top1_std": top1_std, "top5": top5,
        "top5_std": top5_std, "train_params": done[0]["params"] if done else None,
        **{key: bench.get(key) for key in _BENCH_KEYS}, "bench_batch_size": bench.get("batch_size"),
        "train_time_s": _mean_std([s["train_time_s"] for s in done])[0],
        "train_images_per_s": _mean_std([s["train_images_per_s"] for s in done])[0],
        "error": "; ".join(errors) or None,
    }


def _top1_by_seed(outcomes: Sequence[RunOutcome]) -> dict[str, dict[int, float]]:
    by_model: dict[str, dict[int, float]] = {}
    for o in outcomes:
        if o.summary is not None:
            by_model.setdefault(o.model, {})[o.seed] = o.summary["top1"]
    return by_model


def paired(top1: Mapping[str, Mapping[int, float]], model_a: str, model_b: str) -> PairedDifference:
    """The paired difference of top-1, ``model_a`` - ``model_b``, over the seeds both finished."""
    a, b = top1.get(model_a, {}), top1.get(model_b, {})
    seeds = sorted(a.keys() & b.keys())
    return paired_difference([a[s] for s in seeds], [b[s] for s in seeds])


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def with_differences(rows: Sequence[dict[str, Any]], outcomes: Sequence[RunOutcome],
                     baseline: str) -> list[dict[str, Any]]:
    """``rows`` with each model's paired difference to ``baseline``: pairs, delta, ci_low, ci_high, verdict."""
    top1 = _top1_by_seed(outcomes)
    result = []
    for row in rows:
        if row["model"] == baseline:
            extra = {"pairs": None, "delta": None, "ci_low": None, "ci_high": None, "verdict": "baseline"}
        else:
            diff = paired(top1, row["model"], baseline)
            extra = {"pairs": diff.n, "delta": _rounded(diff.mean), "ci_low": _rounded(diff.low),
                     "ci_high": _rounded(diff.high), "verdict": diff.verdict}
        result.append({**row, **extra})
    return result


def claim_rows(rows: Sequence[dict[str, Any]], outcomes: Sequence[RunOutcome],
               claims: Sequence[Claim]) -> list[dict[str, Any]]:
    """One row per claim whose two models are both in ``rows``: Δ top-1 (A - B), its interval, MACs, verdict."""
    macs = {r["model"]: r["macs"] for r in rows}
    top1 = _top1_by_seed(outcomes)
    result = []
    for claim in claims:
        if claim.model_a not in macs or claim.model_b not in macs:
            continue
        diff = paired(top1, claim.model_a, claim.model_b)
        result.append({"paper": claim.paper, "claim": claim.statement, "model_a": claim.model_a,
                       "model_b": claim.model_b, "kind": claim.kind, "pairs": diff.n, "delta": _rounded(diff.mean),
                       "ci_low": _rounded(diff.low), "ci_high": _rounded(diff.high),
                       "macs_a": macs[claim.model_a], "macs_b": macs[claim.model_b],
                       "verdict": claim_verdict(diff, claim.kind)})
    return result


def _outcome_line(outcome: RunOutcome) -> str:
    if outcome.error:
        return f"failed: {outcome.error}"
    top1 = f"top-1 {outcome.summary['top1']:.2f}%"
    return f"already done ({top1})" if outcome.skipped else top1


def compare(models: Sequence[str], out_dir: str | Path, *, data: str = "fashion-mnist", seeds: int = 1,
            recipe: Mapping[str, Any] | None = None, bench_batch_size: int = 64, bench_repeats: int = 10,
            progress: bool = True, note: str = "", command: str = "", force: bool = False,
            baseline: str | None = None, claims: Sequence[Claim] = PAPER_CLAIMS,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train, evaluate and benchmark ``models`` under one recipe; write the results and plots into ``out_dir``.

    ``recipe`` holds ``visionmix.engine.TrainConfig`` fields other than ``model``, ``data`` and ``seed``
    (epochs, batch_size, lr, max_train_samples, ...). Seeds are ``0 .. seeds-1``. ``note`` and ``command`` (the
    command line that ran it) go into the report. ``out_dir`` must be new, empty or a comparison this function
    wrote (its ``results.json`` says so), unless ``force``. Every model's top-1 is compared seed by seed with the
    ``baseline``'s (one of ``models``; default the first), and each of ``claims`` whose two models are both in
    ``models`` gets a verdict. Every argument is checked before anything is trained. Returns one row per model, with
    its paired difference to the baseline (pairs, delta, ci_low, ci_high, verdict).
    """
    from visionmix.engine import TrainConfig
    from visionmix.models import model_entry

    if not models:
        raise InvalidValue("models must name at least one model")
    if len(set(models)) != len(models):
        raise InvalidValue(f"models contains duplicates: {list(models)}")
    for model in models:
        model_entry(model)  # an unknown name fails now, not after the models before it have trained
    baseline = models[0] if baseline is None else baseline
    check_choice("baseline", baseline, models)
    check_positive("seeds", seeds)
    check_positive("bench_batch_size", bench_batch_size)
    if check_positive("bench_repeats", bench_repeats) < 2:
        raise InvalidValue(f"bench_repeats must be at least 2 to give a spread, got {bench_repeats}")
    recipe = dict(recipe or {})
    for key in ("model", "data", "seed"):
        if key in recipe:
            raise InvalidValue(f"recipe must not set {key!r}; pass it to compare() instead")
    unknown = sorted(set(recipe) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise InvalidValue(f"recipe has unknown TrainConfig fields {unknown}")
    recipe_name = recipe.pop("recipe", "small")
    base = TrainConfig.for_recipe(recipe_name, model=models[0], data=data, **recipe)
    base.validate()  # a bad recipe fails once, here, not once per model
    shown = {k: v for k, v in asdict(base).items() if k not in _NOT_RECIPE}
    meta = {"data": data, "seeds": seeds, "recipe": json.loads(json.dumps(shown)), "note": note, "command": command,
            "bench_batch_size": bench_batch_size, "baseline": baseline, "on_par_margin": ON_PAR_MARGIN,
            "environment": environment()}
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidValue(f"--out {out_dir} exists and is not a directory")
    with hold_directory(out_dir, "visionmix compare"):  # one comparison process per directory
        check_out_dir(out_dir, force)
        write_report(out_dir, [], [], meta, claims)  # claims the directory: a re-run of a stopped comparison resumes
        runs_dir = out_dir / "runs"
        total = len(models) * seeds
        rows, outcomes = [], []
        for index, model in enumerate(models):
            model_outcomes = []
            for seed in range(seeds):
                cfg = TrainConfig.for_recipe(recipe_name, model=model, data=data, seed=seed, **recipe)
                step = f"[{index * seeds + seed + 1}/{total}] {model} seed {seed}"
                outcome = _run_one(cfg, runs_dir / model / f"seed{seed}", progress)
                log(f"{step}: {_outcome_line(outcome)}")
                model_outcomes.append(outcome)
            bench, bench_error = None, None
            finished = [o for o in model_outcomes if o.summary is not None]
            if finished:
                try:
                    bench = _bench_run(model, runs_dir / model / f"seed{finished[0].seed}",
                                       runs_dir / model / "bench.json", bench_batch_size, bench_repeats)
                except Exception as err:  # a model that trains but cannot be benchmarked still gets its accuracy row
                    bench_error = _describe(err)
                    log(f"{model}: benchmark failed: {bench_error}")
            rows.append(summarize(model, model_outcomes, bench, bench_error))
            outcomes.extend(model_outcomes)
            report = with_differences(rows, outcomes, baseline)
            write_report(out_dir, report, outcomes, meta, claims)  # after every model: a long comparison shows progress
    return report


def is_comparison(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a comparison written by :func:`compare` (its ``results.json`` says so)."""
    try:
        report = json.loads((Path(out_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("format") == FORMAT


def check_out_dir(out_dir: Path, force: bool) -> None:
    """``out_dir`` may be written: new, empty, a comparison of ours, or anything with ``force``."""
    if force or not out_dir.is_dir() or is_comparison(out_dir):
        return
    names = entries(out_dir)
    if names:
        listing = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise InvalidValue(f"--out {out_dir} is not empty ({listing}) and holds no visionmix comparison; choose a new "
                           f"directory or pass --force to write the report into it")


def _fmt(value: float | None, std: float | None = None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _interval(row: Mapping[str, Any]) -> str:
    """``+1.23 [-0.50, +2.96]`` (a mean without interval: just the mean; no mean: ``-``)."""
    if row["delta"] is None:
        return "-"
    if row["ci_low"] is None:
        return f"{row['delta']:+.2f}"
    return f"{row['delta']:+.2f} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"


def claims_markdown(claims: Sequence[dict[str, Any]]) -> str:
    """The claims section of results.md: one row per claim (see :func:`claim_rows`)."""
    lines = [
        "## Claims",
        "",
        "Δ = top-1 of A - top-1 of B in points, mean over the seeds both finished with its 95% paired t interval. "
        "\"better\" holds if the interval lies above 0; \"on par\" holds if it lies within "
        f"±{ON_PAR_MARGIN:g} point and does not hold if it lies wholly outside; \"not worse\" holds if it lies "
        f"above -{ON_PAR_MARGIN:g} and does not hold if it lies below. Otherwise the claim is not shown at this scale. "
        "MACs are of the deployed models.",
        "",
        "| paper | claim | A vs B | Δ top-1 (95% CI) | seeds | MACs A | MACs B | verdict |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for c in claims:
        cells = [c["paper"], f"{c['claim']} ({c['kind']})", f"{c['model_a']} vs {c['model_b']}", _interval(c),
                 str(c["pairs"]), si_format(c["macs_a"]), si_format(c["macs_b"]), c["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(rows: Sequence[dict[str, Any]], meta: Mapping[str, Any]) -> str:
    """The comparison as a markdown document: a header saying what was run, then one row per model."""
    recipe = ", ".join(f"{k}={v}" for k, v in meta["recipe"].items()) or "engine defaults"
    batch = meta["bench_batch_size"]
    lines = [
        f"# visionmix compare: {meta['data']}",
        "",
        f"Recipe: {recipe}; seeds: {meta['seeds']} (accuracy mean ± std over seeds). "
        f"Params, MACs and speed are for the deployed form (`visionmix.reparameterize`) at one image; "
        f"img/s at batch {batch}, {meta['environment']['threads']} threads, torch {meta['environment']['torch']}.",
    ]
    if meta.get("command"):
        lines += ["", f"Produced by `{meta['command']}`."]
    if meta.get("note"):
        lines += ["", f"Note: {meta['note']}"]
    baseline = meta.get("baseline")
    lines += ["", f"Δ top-1: the model's top-1 minus {baseline}'s, mean over the seeds both finished, with its 95% "
                  "paired t interval; the verdict is \"no difference shown\" when the interval contains 0.",
              "", f"| model | top-1 (%) | Δ top-1 vs {baseline} (95% CI) | verdict | top-5 (%) | params | MACs "
                  f"| img/s (b{batch}) | latency b1 (ms) | train time (s) | status |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        status = r["status"] if not r["error"] else f"{r['status']}: {r['error']}"
        cells = [r["model"], _fmt(r["top1"], r["top1_std"]), _interval(r), r["verdict"], _fmt(r["top5"], r["top5_std"]),
                 si_format(r["params"]),
                 si_format(r["macs"]), _fmt(r["throughput"], digits=0), _fmt(r["latency_ms"]),
                 _fmt(r["train_time_s"], digits=0), status.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _save_figure(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write(path, buffer.getvalue())


def _scatter(rows: Sequence[dict[str, Any]], key: str, scale: float, xlabel: str, title: str, path: Path) -> None:
    """Top-1 (with its std over seeds as an error bar) against ``rows[key] / scale``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.add_subplot()
    points = [r for r in rows if r["top1"] is not None and r[key]]
    for r in points:
        x = r[key] / scale
        ax.errorbar(x, r["top1"], yerr=r["top1_std"] or 0.0, fmt="o", capsize=3)
        ax.annotate(r["model"], (x, r["top1"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if not points:
        ax.text(0.5, 0.5, "no model finished", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel=xlabel, ylabel="test top-1 (%)", title=title)
    ax.grid(True, alpha=0.3)
    _save_figure(fig, path)


def _curves(outcomes: Sequence[RunOutcome], path: Path) -> None:
    """Per model, the mean over seeds of training loss and test top-1 against the epoch."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    by_model: dict[str, list[list[dict[str, Any]]]] = {}
    length: dict[str, float] = {}  # epochs trained: a partial last epoch ends there, not at its ordinal
    for o in outcomes:
        if o.summary is not None:
            by_model.setdefault(o.model, []).append(o.summary["history"])
            length[o.model] = o.summary.get("epochs_trained", o.summary["epochs"])  # older summaries: the recipe's
    for model, histories in by_model.items():
        epochs = sorted({h["epoch"] for history in histories for h in history})
        for ax, key in ((loss_ax, "train_loss"), (acc_ax, "eval_top1")):
            means = [statistics.fmean(h[key] for history in histories for h in history if h["epoch"] == e)
                     for e in epochs]
            ax.plot([min(e, length[model]) for e in epochs], means, marker="o", label=model)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="training loss")
    acc_ax.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if by_model:
        acc_ax.legend(fontsize=8)
    _save_figure(fig, path)


def _differences(rows: Sequence[dict[str, Any]], baseline: str, path: Path) -> None:
    """One row per model: its mean paired difference to ``baseline`` with the 95% interval, a line at 0."""
    from matplotlib.figure import Figure

    points = [r for r in rows if r["model"] != baseline and r["delta"] is not None]
    fig = Figure(figsize=(6.4, 1.2 + 0.35 * max(len(points), 3)), layout="constrained")
    ax = fig.add_subplot()
    for y, r in enumerate(points):
        error = None if r["ci_low"] is None else [[r["delta"] - r["ci_low"]], [r["ci_high"] - r["delta"]]]
        ax.errorbar(r["delta"], y, xerr=error, fmt="o", capsize=3)
    if not points:
        ax.text(0.5, 0.5, "no model paired with the baseline yet", ha="center", va="center", transform=ax.transAxes)
    ax.axvline(0.0, color="grey", linewidth=1)
    ax.set_yticks(range(len(points)), [r["model"] for r in points])
    ax.set_ylim(max(len(points), 1) - 0.5, -0.5)  # the table's order, top to bottom
    ax.set(xlabel=f"top-1 minus {baseline}'s (points)", title=f"paired difference to {baseline} (95% CI over seeds)")
    ax.grid(True, axis="x", alpha=0.3)
    _save_figure(fig, path)


def write_report(out_dir: str | Path, rows: Sequence[dict[str, Any]], outcomes: Sequence[RunOutcome],
                 meta: Mapping[str, Any], claims: Sequence[Claim] = PAPER_CLAIMS) -> None:
    """Write results.json/.csv/.md, the PNG plots and (when a claim applies) claims.csv into ``out_dir``.
    ``rows`` carry the paired differences (:func:`with_differences`) to ``meta["baseline"]``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [{"model": o.model, "seed": o.seed, "error": o.error, "summary": o.summary} for o in outcomes]
    tested = claim_rows(rows, outcomes, claims)
    atomic_write_json(out_dir / "results.json", {"format": FORMAT, "meta": meta, "models": list(rows),
                                                 "claims": tested, "runs": runs}, indent=2)
    atomic_write(out_dir / "results.csv", to_csv(rows))
    markdown = markdown_table(rows, meta)
    if tested:
        atomic_write(out_dir / "claims.csv", to_csv(tested))
        markdown += "\n" + claims_markdown(tested)
    atomic_write(out_dir / "results.md", markdown)
    batch = meta["bench_batch_size"]
    _scatter(rows, "macs", 1e6, "MMACs per image", "accuracy vs MACs", out_dir / PLOTS[0])
    _scatter(rows, "throughput", 1.0, f"images/s at batch {batch}", "accuracy vs measured throughput",
             out_dir / PLOTS[1])
    _curves(outcomes, out_dir / PLOTS[2])
    _differences(rows, meta["baseline"], out_dir / PLOTS[3])
