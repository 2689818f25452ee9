"""Fair comparison of architectures, as SPACH (arXiv 2108.13002) argues for: one training recipe for every model,
then accuracy next to parameters, MACs and measured speed.

``compare`` trains each model for each seed with the engine's ``train`` (same data, epochs and hyper-parameters),
benchmarks the deployed form (``visionmix.reparameterize``) of the trained model once, and writes into ``out_dir``::

    runs/<model>/seed<k>/   the engine's run directory (checkpoint, metrics.jsonl, summary.json)
    runs/<model>/bench.json the speed measurement
    results.csv, results.json, results.md, accuracy_vs_macs.png, accuracy_vs_throughput.png, training_curves.png

A run whose ``summary.json`` exists is finished and is not trained again, so an interrupted comparison resumes where
it stopped (an interrupted run resumes from its last checkpoint). A model that fails is reported with its error and
does not stop the others. The report is rewritten after every model. Accuracies are mean ± sample standard deviation
over the seeds that finished.
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
from visionmix.engine.checkpoint import atomic_write
from visionmix.layers.validation import check_choice, check_positive

PLOTS = ("accuracy_vs_macs.png", "accuracy_vs_throughput.png", "training_curves.png")
FORMAT = "visionmix-compare/1"  # results.json says this: the directory is a comparison, resumed when re-run


@dataclass(frozen=True)
class Preset:
    """A named comparison: models, dataset, seeds and the training recipe (``TrainConfig`` fields).
    ``fallback_recipe`` (with ``data="digits"``) is used when Fashion-MNIST is not installed; ``None``: error."""

    models: tuple[str, ...]
    data: str
    seeds: int
    recipe: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    fallback_recipe: dict[str, Any] | None = None


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
}


def fashion_mnist_missing(data_dir: str | Path | None = None) -> str | None:
    """``None`` if Fashion-MNIST can be read from ``data_dir`` (default: Debian's directory), else the reason."""
    from visionmix.data import DataError, build_dataset

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
    from visionmix.engine import TrainingInterrupted, train

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
_NOT_RECIPE = ("model", "data", "seed", "data_dir", "device", "save_every", "eval_batch_size")
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


def _outcome_line(outcome: RunOutcome) -> str:
    if outcome.error:
        return f"failed: {outcome.error}"
    top1 = f"top-1 {outcome.summary['top1']:.2f}%"
    return f"already done ({top1})" if outcome.skipped else top1


def compare(models: Sequence[str], out_dir: str | Path, *, data: str = "fashion-mnist", seeds: int = 1,
            recipe: Mapping[str, Any] | None = None, bench_batch_size: int = 64, bench_repeats: int = 10,
            progress: bool = True, note: str = "", command: str = "", force: bool = False,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train, evaluate and benchmark ``models`` under one recipe; write the results and plots into ``out_dir``.

    ``recipe`` holds ``visionmix.engine.TrainConfig`` fields other than ``model``, ``data`` and ``seed``
    (epochs, batch_size, lr, max_train_samples, ...). Seeds are ``0 .. seeds-1``. ``note`` and ``command`` (the
    command line that ran it) go into the report. ``out_dir`` must be new, empty or a comparison this function
    wrote (its ``results.json`` says so), unless ``force``. Every argument is checked before anything is trained.
    Returns one row per model.
    """
    from visionmix.engine import TrainConfig
    from visionmix.models import model_entry

    if not models:
        raise ValueError("models must name at least one model")
    if len(set(models)) != len(models):
        raise ValueError(f"models contains duplicates: {list(models)}")
    for model in models:
        model_entry(model)  # an unknown name fails now, not after the models before it have trained
    check_positive("seeds", seeds)
    check_positive("bench_batch_size", bench_batch_size)
    if check_positive("bench_repeats", bench_repeats) < 2:
        raise ValueError(f"bench_repeats must be at least 2 to give a spread, got {bench_repeats}")
    recipe = dict(recipe or {})
    for key in ("model", "data", "seed"):
        if key in recipe:
            raise ValueError(f"recipe must not set {key!r}; pass it to compare() instead")
    unknown = sorted(set(recipe) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ValueError(f"recipe has unknown TrainConfig fields {unknown}")
    base = TrainConfig(model=models[0], data=data, **recipe)
    base.validate()  # a bad recipe fails once, here, not once per model
    shown = {k: v for k, v in asdict(base).items() if k not in _NOT_RECIPE}
    meta = {"data": data, "seeds": seeds, "recipe": json.loads(json.dumps(shown)), "note": note, "command": command,
            "bench_batch_size": bench_batch_size, "environment": environment()}
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
    write_report(out_dir, [], [], meta)  # claims the directory: a re-run of an interrupted comparison resumes here
    runs_dir = out_dir / "runs"
    total = len(models) * seeds
    rows, outcomes = [], []
    for index, model in enumerate(models):
        model_outcomes = []
        for seed in range(seeds):
            cfg = TrainConfig(model=model, data=data, seed=seed, **recipe)
            step = f"[{index * seeds + seed + 1}/{total}] {model} seed {seed}"
            outcome = _run_one(cfg, runs_dir / model / f"seed{seed}", progress)
            log(f"{step}: {_outcome_line(outcome)}")
            model_outcomes.append(outcome)
        bench, bench_error = None, None
        finished = [o for o in model_outcomes if o.summary is not None]
        if finished:
            try:
                bench = _bench_run(model, runs_dir / model / f"seed{finished[0].seed}", runs_dir / model / "bench.json",
                                   bench_batch_size, bench_repeats)
            except Exception as err:  # a model that trains but cannot be benchmarked still gets its accuracy row
                bench_error = _describe(err)
                log(f"{model}: benchmark failed: {bench_error}")
        rows.append(summarize(model, model_outcomes, bench, bench_error))
        outcomes.extend(model_outcomes)
        write_report(out_dir, rows, outcomes, meta)  # after every model, so a long comparison shows its progress
    return rows


def is_comparison(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a comparison written by :func:`compare` (its ``results.json`` says so)."""
    try:
        report = json.loads((Path(out_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("format") == FORMAT


def check_out_dir(out_dir: Path, force: bool) -> None:
    """``out_dir`` may be written: new, empty, a comparison of ours, or anything with ``force``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a directory")
    if force or not out_dir.is_dir() or is_comparison(out_dir):
        return
    entries = sorted(p.name for p in out_dir.iterdir())
    if entries:
        listing = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ValueError(f"--out {out_dir} is not empty ({listing}) and holds no visionmix comparison; choose a new "
                         f"directory or pass --force to write the report into it")


def _fmt(value: float | None, std: float | None = None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


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
    lines += ["", f"| model | top-1 (%) | top-5 (%) | params | MACs | img/s (b{batch}) | latency b1 (ms) "
                  "| train time (s) | status |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        status = r["status"] if not r["error"] else f"{r['status']}: {r['error']}"
        cells = [r["model"], _fmt(r["top1"], r["top1_std"]), _fmt(r["top5"], r["top5_std"]), si_format(r["params"]),
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


def write_report(out_dir: str | Path, rows: Sequence[dict[str, Any]], outcomes: Sequence[RunOutcome],
                 meta: Mapping[str, Any]) -> None:
    """Write results.json/.csv/.md and the three PNG plots into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [{"model": o.model, "seed": o.seed, "error": o.error, "summary": o.summary} for o in outcomes]
    atomic_write(out_dir / "results.json", json.dumps({"format": FORMAT, "meta": meta, "models": list(rows),
                                                       "runs": runs}, indent=2, allow_nan=False) + "\n")
    atomic_write(out_dir / "results.csv", to_csv(rows))
    atomic_write(out_dir / "results.md", markdown_table(rows, meta))
    batch = meta["bench_batch_size"]
    _scatter(rows, "macs", 1e6, "MMACs per image", "accuracy vs MACs", out_dir / PLOTS[0])
    _scatter(rows, "throughput", 1.0, f"images/s at batch {batch}", "accuracy vs measured throughput",
             out_dir / PLOTS[1])
    _curves(outcomes, out_dir / PLOTS[2])
