"""Fair comparison of architectures, as SPACH (arXiv 2108.13002) argues for: one training recipe for every model,
then accuracy next to parameters, MACs and measured speed.

``compare`` plans one run per model and seed (same data, epochs and hyper-parameters: a
:class:`~visionmix.bench.launch.RunSpec` each), has a launcher (:mod:`visionmix.bench.launchers`: in this process,
in local worker processes, on Slurm) train those not finished yet, gathers every run's ``summary.json``, benchmarks
the deployed form (``visionmix.reparameterize``) of each trained model once, and writes into ``out_dir``::

    plan.json               the runs (their specs) and the launcher, threads and processes per run
    runs/<model>/seed<k>/   the engine's run directory (checkpoint, metrics.jsonl, summary.json), with the
                            launcher's run.json (spec, provenance), error.json, stdout.log/stderr.log
    runs/<model>/bench.json the speed measurement (bench-error.log: the traceback if it failed)
    results.csv, results.json, results.md, accuracy_vs_macs.png, accuracy_vs_throughput.png, training_curves.png,
    differences.png, claims.csv (when a claim's two models are compared)

A run whose ``summary.json`` exists (of the same recipe) is finished and is not trained again, so an interrupted
comparison resumes where it stopped (an interrupted run resumes from its last checkpoint). A run that fails is
reported with its error and the path of its log and does not stop the others. The report is rewritten after every
model's benchmark. Accuracies are mean ± sample standard deviation
over the seeds that finished.

Verdicts (``visionmix.bench.stats``): runs of one seed share data order and augmentation across models, so every
model is compared with the ``baseline`` seed by seed (the paired t interval of its top-1 minus the baseline's over
the seeds both finished), and each of the papers' claims (``PAPER_CLAIMS``) whose two models are in the comparison
is tested the same way on its own pair of models.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from visionmix.bench.launch import InlineLauncher, Launcher, RunSpec, describe, gather
from visionmix.bench.presets import PAPER_CLAIMS, Claim
from visionmix.bench.profile import environment, profile_model
from visionmix.bench.report import FORMAT, write_report
from visionmix.bench.results import RunOutcome, summarize, with_differences
from visionmix.bench.stats import (
    ON_PAR_MARGIN,
)
from visionmix.checks import check_choice, check_positive
from visionmix.errors import InvalidValue, TrainingInterrupted
from visionmix.files import atomic_write, atomic_write_json, entries, hold_directory

BENCH_ERROR_FILE = "bench-error.log"  # runs/<model>/: the traceback of a failed speed measurement
PLAN_FILE = "plan.json"  # the comparison's runs (visionmix.bench.launch.RunSpec) and the launcher that ran them
PLAN_FORMAT = "visionmix-plan/1"


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
        return f"failed: {outcome.error}" + (f" (log: {outcome.log})" if outcome.log else "")
    top1 = f"top-1 {outcome.summary['top1']:.2f}%"
    return f"already done ({top1})" if outcome.skipped else top1


def compare(models: Sequence[str], out_dir: str | Path, *, data: str = "fashion-mnist", seeds: int = 1,
            recipe: Mapping[str, Any] | None = None, bench_batch_size: int = 64, bench_repeats: int = 10,
            progress: bool = True, note: str = "", command: str = "", force: bool = False,
            baseline: str | None = None, claims: Sequence[Claim] = PAPER_CLAIMS,
            launcher: Launcher | None = None, threads_per_run: int | None = None,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train, evaluate and benchmark ``models`` under one recipe; write the results and plots into ``out_dir``.

    ``recipe`` holds ``visionmix.engine.TrainConfig`` fields other than ``model``, ``data`` and ``seed``
    (epochs, batch_size, lr, max_train_samples, ...). Seeds are ``0 .. seeds-1``. ``note`` and ``command`` (the
    command line that ran it) go into the report. ``out_dir`` must be new, empty or a comparison this function
    wrote (its ``results.json`` says so), unless ``force``. Every model's top-1 is compared seed by seed with the
    ``baseline``'s (one of ``models``; default the first), and each of ``claims`` whose two models are both in
    ``models`` gets a verdict. The runs not finished yet are executed by ``launcher`` (default: in this process,
    :class:`~visionmix.bench.launch.InlineLauncher`) with ``threads_per_run`` threads each (default: the
    launcher's). Every argument is checked before anything is trained. Returns one row per model, with its paired
    difference to the baseline (pairs, delta, ci_low, ci_high, verdict).
    """
    import torch

    from visionmix.engine import TrainConfig
    from visionmix.engine.config import INIT_PRETRAINED, report_fields
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
    if threads_per_run is not None:
        check_positive("threads_per_run", threads_per_run)
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
    if base.init == INIT_PRETRAINED:
        from visionmix.models.pretrained import resolve

        for model in models[1:]:
            resolve(model)  # every model has released weights, before the first one trains
    launcher = launcher or InlineLauncher(progress=progress)
    if getattr(launcher, "remote", False):  # the runs train on other machines (Slurm): not this one's devices
        device = torch.device("cuda" if base.device.startswith("cuda") else "cpu")
    else:
        device = resolve_device(base.device)
    threads = launcher.prepare(device.type, threads_per_run)
    out_dir = Path(out_dir)
    runs_dir = out_dir / "runs"
    specs = [RunSpec(model, seed, json.loads(json.dumps(asdict(TrainConfig.for_recipe(
                 recipe_name, model=model, data=data, seed=seed, **recipe)))),
                     str(runs_dir / model / f"seed{seed}"), threads, launcher.procs_per_run, launcher.name)
             for model in models for seed in range(seeds)]
    shown = report_fields(base, str(device))
    run_layout = {"launcher": launcher.name, "threads_per_run": threads, "procs_per_run": launcher.procs_per_run}
    meta = {"data": data, "seeds": seeds, "recipe": json.loads(json.dumps(shown)), "note": note, "command": command,
            "bench_batch_size": bench_batch_size, "baseline": baseline, "on_par_margin": ON_PAR_MARGIN,
            **run_layout, "environment": environment()}
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidValue(f"--out {out_dir} exists and is not a directory")
    started = time.perf_counter()
    with hold_directory(out_dir, "visionmix compare"):  # one comparison process per directory
        check_out_dir(out_dir, force)
        write_report(out_dir, [], [], meta, claims)  # claims the directory: a re-run of a stopped comparison resumes
        atomic_write_json(out_dir / PLAN_FILE, {"format": PLAN_FORMAT, **run_layout,
                                                "runs": [asdict(spec) for spec in specs]})
        outcomes = _run_plan(specs, out_dir, launcher, log)
        rows, bench_time = [], {}
        for model in models:
            model_outcomes = [o for o in outcomes if o.model == model]
            bench, bench_error = None, None
            finished = [o for o in model_outcomes if o.summary is not None]
            if finished:
                bench_started = time.perf_counter()
                try:
                    bench = _bench_run(model, runs_dir / model / f"seed{finished[0].seed}",
                                       runs_dir / model / "bench.json", bench_batch_size, bench_repeats)
                except Exception as err:  # a model that trains but cannot be benchmarked still gets its accuracy row
                    trace = runs_dir / model / BENCH_ERROR_FILE
                    atomic_write(trace, traceback.format_exc())
                    bench_error = f"{describe(err)} (traceback in {trace})"
                    log(f"{model}: benchmark failed: {bench_error}")
                bench_time[model] = round(time.perf_counter() - bench_started, 3)
            rows.append(summarize(model, model_outcomes, bench, bench_error))
            meta["time"] = _time_accounting(outcomes, bench_time, time.perf_counter() - started)
            report = with_differences(rows, outcomes, baseline)
            write_report(out_dir, report, outcomes, meta, claims)  # after every model: a long comparison shows progress
    return report


def _time_accounting(outcomes: Sequence[RunOutcome], bench_s: Mapping[str, float], wall_s: float) -> dict[str, Any]:
    """Where the comparison's time went: its wall time so far (this invocation), each model's benchmark, and the
    parts of the runs trained in this invocation summed (see :func:`visionmix.bench.launch.run_time`), with
    ``training_share``, the share of those runs' wall time spent in training steps (batches included)."""
    runs: dict[str, float] = {}
    for outcome in outcomes:
        if outcome.time and not outcome.skipped:
            for part, seconds in outcome.time.items():
                runs[part] = round(runs.get(part, 0.0) + seconds, 3)
    spent = runs.get("wall_s", 0.0) + runs.get("startup_s", 0.0)
    share = round(runs["train_time_s"] / spent, 4) if spent and "train_time_s" in runs else None
    return {"wall_s": round(wall_s, 3), "bench_s": dict(bench_s), "runs": runs, "training_share": share}


def _run_plan(specs: Sequence[RunSpec], out_dir: Path, launcher: Launcher,
              log: Callable[[str], None]) -> list[RunOutcome]:
    """Launch the runs of ``specs`` not finished yet and gather every run's outcome, in plan order."""
    step = {spec.run_dir: f"[{index + 1}/{len(specs)}] {spec.name}" for index, spec in enumerate(specs)}
    done = set()
    for spec in specs:
        before = gather(spec)
        if before.summary is not None:
            done.add(spec.run_dir)
            before.skipped = True
            log(f"{step[spec.run_dir]}: {_outcome_line(before)}")
    try:
        left = launcher.launch([s for s in specs if s.run_dir not in done], out_dir,
                               lambda spec: log(f"{step[spec.run_dir]}: {_outcome_line(gather(spec))}"), log)
    except TrainingInterrupted as err:
        raise TrainingInterrupted(f"{err}; to resume the whole comparison, run the same 'visionmix compare' "
                                  "command again", err.signum) from err
    outcomes = []
    for spec in specs:
        outcome = gather(spec, left.get(spec.run_dir))
        outcome.skipped = spec.run_dir in done
        outcomes.append(outcome)
    return outcomes


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


