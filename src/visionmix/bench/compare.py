"""Fair comparison of architectures, as SPACH (arXiv 2108.13002) argues for: one training recipe for every model,
then accuracy next to parameters, MACs and measured speed.

``compare`` trains each model for each seed with the engine's ``train`` (same data, epochs and hyper-parameters),
benchmarks the deployed form (``visionmix.reparameterize``) of the trained model once, and writes into ``out_dir``::

    runs/<model>/seed<k>/   the engine's run directory (checkpoint, metrics.jsonl, summary.json)
    runs/<model>/bench.json the speed measurement (bench-error.log: the traceback if it failed)
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

import json
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from visionmix.bench.presets import PAPER_CLAIMS, Claim
from visionmix.bench.profile import environment, profile_model
from visionmix.bench.report import FORMAT, write_report
from visionmix.bench.results import RunOutcome, summarize, with_differences
from visionmix.bench.stats import (
    ON_PAR_MARGIN,
)
from visionmix.checks import check_choice, check_positive
from visionmix.errors import InvalidValue, TrainingInterrupted, is_user_error
from visionmix.files import atomic_write, entries, hold_directory

BENCH_ERROR_FILE = "bench-error.log"  # runs/<model>/: the traceback of a failed speed measurement


def _describe(err: BaseException) -> str:
    """A failure in a results row: a user error's message (as the command line prints it), else ``Type: message``
    (a bug, whose traceback is kept in a log)."""
    return (str(err) if is_user_error(err) else f"{type(err).__name__}: {err}").splitlines()[0]


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
    except Exception as err:  # reported in the model's row (the traceback is in the run's train.log); the others go on
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
    from visionmix.engine.run_files import load_run
    from visionmix.reparam import reparameterize

    model, _ = load_run(run_dir)
    deployed = reparameterize(model.eval())
    result = profile_model(deployed, name=name, form="deploy",
                           input_size=model.pretrained_cfg["input_size"], batch_size=batch_size, repeats=repeats)
    record = {**asdict(result), "environment": environment()}
    atomic_write(bench_path, json.dumps(record, indent=2) + "\n")
    return record


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
    from visionmix.engine.config import report_fields
    from visionmix.engine.distributed import resolve_device
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
    shown = report_fields(base, str(resolve_device(base.device)))
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
                    trace = runs_dir / model / BENCH_ERROR_FILE
                    atomic_write(trace, traceback.format_exc())
                    bench_error = f"{_describe(err)} (traceback in {trace})"
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


