"""visionmix.bench.compare: a real end-to-end comparison on the bundled digits, resumability, failure isolation,
paired differences to a baseline and the claims table."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
from matplotlib.image import imread

from visionmix.bench import plots
from visionmix.bench.compare import compare
from visionmix.bench.plots import PLOTS
from visionmix.bench.presets import PAPER_CLAIMS, PRESETS, Claim, resolve_preset
from visionmix.bench.report import markdown_table
from visionmix.bench.results import RunOutcome, claim_rows, summarize, with_differences
from visionmix.bench.stats import t_quantile
from visionmix.cli import main
from visionmix.data import FASHION_MNIST_DIR

pytestmark = pytest.mark.slow  # real comparisons: several models trained and benchmarked

MODELS = ["mixer_nano", "resnet_nano", "mixer_s32_224"]  # the last cannot take 28 px: it fails at training
RECIPE = {"epochs": 1, "batch_size": 32, "max_train_samples": 64, "max_eval_samples": 32}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    logs: list[list[str]] = [[], []]
    rows = [compare(MODELS, out, data="digits", recipe=RECIPE, bench_batch_size=4, bench_repeats=2, progress=False,
                    log=logs[i].append) for i in range(2)]
    return out, rows, logs


def test_every_artefact_is_written(compared):
    out, _, _ = compared
    for name in ("results.csv", "results.json", "results.md", *PLOTS):
        assert (out / name).is_file(), name
    assert not (out / "claims.csv").exists()  # no paper claim compares mixer_nano with resnet_nano
    for model in MODELS[:2]:
        assert (out / "runs" / model / "seed0" / "summary.json").is_file()
        assert (out / "runs" / model / "bench.json").is_file()


def test_csv_parses_with_one_row_per_model(compared):
    out, _, _ = compared
    with open(out / "results.csv", newline="") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert list(rows) == MODELS
    for model in MODELS[:2]:
        r = rows[model]
        assert r["status"] == "ok" and r["error"] == "" and r["seeds"] == "1"
        assert 0.0 <= float(r["top1"]) <= float(r["top5"]) <= 100.0
        assert int(r["params"]) > 0 and int(r["macs"]) > 0 and float(r["throughput"]) > 0
    assert rows["mixer_nano"]["verdict"] == "baseline"  # the first model, by default
    assert rows["resnet_nano"]["verdict"] == "1 seed: cannot decide" and rows["resnet_nano"]["pairs"] == "1"
    assert float(rows["resnet_nano"]["delta"]) == pytest.approx(
        float(rows["resnet_nano"]["top1"]) - float(rows["mixer_nano"]["top1"]), abs=1e-4)
    assert rows["resnet_nano"]["ci_low"] == "" and rows["mixer_s32_224"]["verdict"] == "no seed finished for both"
    summary = json.loads((out / "runs" / "mixer_nano" / "seed0" / "summary.json").read_text())
    assert float(rows["mixer_nano"]["top1"]) == summary["top1"]


def test_pngs_are_valid_images(compared):
    out, _, _ = compared
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        image = imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0  # something was drawn


def test_a_broken_model_is_a_failed_row_and_the_others_finish(compared):
    out, (rows, _), _ = compared
    broken = rows[-1]
    assert broken["model"] == "mixer_s32_224" and broken["status"] == "failed" and broken["top1"] is None
    assert "must be divisible by patch_size=32" in broken["error"]
    markdown = (out / "results.md").read_text()
    assert "| mixer_s32_224 |" in markdown
    assert "failed: seed 0: img_size (H)=28 must be divisible by patch_size=32" in markdown
    assert all(f"| {m} |" in markdown for m in MODELS[:2])
    results = json.loads((out / "results.json").read_text())
    assert [m["status"] for m in results["models"]] == ["ok", "ok", "failed"]
    assert results["meta"]["recipe"].items() >= RECIPE.items() and results["meta"]["data"] == "digits"
    assert results["meta"]["recipe"]["lr"] == 2e-3  # the engine's defaults complete the recipe
    shown = results["meta"]["recipe"]  # what applies to this run only: the small recipe on in-memory data, on CPU
    assert shown["amp"] == "off" and shown["augment"] == "crop-flip" and "max_train_samples" in shown
    assert not {"mixup", "cutmix", "randaug_n", "reprob", "workers", "device", "seed", "val_fraction"} & shown.keys()


def test_second_invocation_skips_finished_models(compared):
    _, (first, second), (log1, log2) = compared
    assert ["already done" in line for line in log1] == [False, False, False]
    assert ["already done" in line for line in log2] == [True, True, False]  # the failure is retried
    for a, b in zip(first[:2], second[:2], strict=True):
        assert (a["top1"], a["params"], a["throughput"]) == (b["top1"], b["params"], b["throughput"])


def _outcome(seed: int, top1: float | None, error: str | None = None) -> RunOutcome:
    summary = None if top1 is None else {"top1": top1, "top5": 99.0, "params": 10, "train_time_s": 2.0 + seed,
                                         "train_images_per_s": 100.0, "history": []}
    return RunOutcome("m", seed, summary=summary, error=error)


def test_summarize_mean_and_sample_std_over_seeds():
    row = summarize("m", [_outcome(0, 90.0), _outcome(1, 91.0), _outcome(2, 95.0)], None, None)
    assert row["top1"] == pytest.approx(92.0) and row["top1_std"] == pytest.approx(statistics.stdev([90, 91, 95]))
    assert row["status"] == "ok" and row["seeds"] == 3 and row["train_time_s"] == pytest.approx(3.0)
    partial = summarize("m", [_outcome(0, 90.0), _outcome(1, None, "TrainingError: nan")], None, None)
    assert partial["status"] == "partial (1/2)" and partial["top1_std"] is None
    assert partial["error"] == "seed 1: TrainingError: nan"
    rows = with_differences([row, {**partial, "model": "p"}], [], "m")
    table = markdown_table(rows, {"recipe": {}, "bench_batch_size": 8, "seeds": 3, "data": "digits", "baseline": "m",
                                  "environment": {"threads": 2, "torch": "x"}})
    assert "| m | 92.00 ± 2.65 | - | baseline |" in table and "partial (1/2): seed 1: TrainingError: nan" in table
    assert "| p | 90.00 | - | no seed finished for both |" in table
    no_bench = summarize("m", [_outcome(0, 90.0)], None, "RuntimeError: boom")
    assert no_bench["status"] == "bench failed" and no_bench["top1"] == 90.0 and no_bench["throughput"] is None


def test_demo_preset_falls_back_to_digits_with_a_note(tmp_path):
    preset, note = resolve_preset("demo", tmp_path)  # an empty directory: no Fashion-MNIST there
    assert preset.data == "digits" and preset.models == PRESETS["demo"].models
    assert "digits" in note and "Fashion-MNIST" in note and str(tmp_path) in note
    if (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        assert resolve_preset("demo") == (PRESETS["demo"], "")
    with pytest.raises(ValueError, match="preset"):
        resolve_preset("nope")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="recipe must not set 'seed'"):
        compare(["mixer_nano"], tmp_path, recipe={"seed": 1})
    with pytest.raises(ValueError, match="duplicates"):
        compare(["mixer_nano", "mixer_nano"], tmp_path)
    with pytest.raises(ValueError, match="at least one"):
        compare([], tmp_path)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        compare(["mixer_nano"], tmp_path, recipe={"epoch": 1})
    with pytest.raises(ValueError, match="epochs"):
        compare(["mixer_nano"], tmp_path, recipe={"epochs": 0})
    with pytest.raises(ValueError, match="unknown model 'no_such_model'"):  # before mixer_nano trains
        compare(["mixer_nano", "no_such_model"], tmp_path)
    with pytest.raises(ValueError, match="bench_repeats must be at least 2"):
        compare(["mixer_nano"], tmp_path, bench_repeats=1)
    with pytest.raises(ValueError, match="seeds must be a positive integer, got 0"):
        compare(["mixer_nano"], tmp_path, seeds=0)
    assert list(tmp_path.iterdir()) == []  # nothing was trained or written


def test_a_directory_that_is_not_a_comparison_is_refused_unless_forced(tmp_path, monkeypatch):
    import visionmix.engine

    monkeypatch.setattr(visionmix.engine, "train", lambda *args, **kwargs: {"nothing": "trained"})
    mine = {"results.md": "my notes\n", "results.csv": "a,b\n1,2\n"}
    for name, text in mine.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=r"is not empty \(results.csv, results.md\) and holds no visionmix comparison"):
        compare(["mixer_nano"], tmp_path, data="digits", progress=False, log=lambda line: None)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == mine  # untouched
    (tmp_path / "results.json").write_text('{"meta": {}, "models": []}')  # looks like one, but no format mark
    with pytest.raises(ValueError, match="holds no visionmix comparison"):
        compare(["mixer_nano"], tmp_path, data="digits", progress=False, log=lambda line: None)


def test_compare_cli_on_the_same_directory_skips_and_reports(compared, capsys):
    out, _, _ = compared
    argv = ["compare", "--models", ",".join(MODELS), "--data", "digits", "--epochs", "1", "--batch-size", "32",
            "--max-train-samples", "64", "--max-eval-samples", "32", "--bench-batch-size", "4", "--bench-repeats", "2",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 1  # one model failed
    captured = capsys.readouterr()
    assert captured.out.count("already done") == 2 and "| mixer_nano |" in captured.out
    assert f"table: {out / 'results.md'}" in captured.out and str(out / PLOTS[0]) in captured.out
    assert "mixer_s32_224" in captured.err
    assert f"Produced by `visionmix compare --models {','.join(MODELS)}" in (out / "results.md").read_text()
    assert main(["compare", "--out", str(out)]) == 2
    assert "--models" in capsys.readouterr().err
    assert main([*argv, "--baseline", "resnet_nano"]) == 1  # the same runs, compared with another baseline
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["baseline"] == "resnet_nano"
    assert [m["verdict"] for m in results["models"]][:2] == ["1 seed: cannot decide", "baseline"]
    assert "Δ top-1 vs resnet_nano" in capsys.readouterr().out
    assert main([*argv, "--baseline", "nope"]) == 2
    assert "baseline must be one of" in capsys.readouterr().err


def test_an_interrupt_stops_the_whole_comparison_with_a_resume_hint(tmp_path, monkeypatch):
    import visionmix.engine
    from visionmix.errors import TrainingInterrupted

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted("SIGINT: stopped at epoch 1 step 3/9, checkpoint saved", 2)

    monkeypatch.setattr(visionmix.engine, "train", interrupted)
    with pytest.raises(TrainingInterrupted, match="run the same 'visionmix compare' command again") as info:
        compare(["mixer_nano", "resnet_nano"], tmp_path, data="digits", progress=False, log=lambda line: None)
    assert info.value.signum == 2
    report = json.loads((tmp_path / "results.json").read_text())  # the directory is claimed: a re-run resumes it
    assert report["format"] == "visionmix-compare/1" and report["models"] == [] and report["runs"] == []


def test_training_curves_average_seeds_and_end_a_partial_run_at_its_length(monkeypatch, tmp_path):

    def summary(losses: list[float], top1: list[float]) -> dict:
        history = [{"epoch": e + 1, "train_loss": loss, "eval_top1": acc}
                   for e, (loss, acc) in enumerate(zip(losses, top1, strict=True))]
        return {"epochs": 50, "epochs_trained": 2.5, "history": history}  # e.g. a time-budgeted run

    outcomes = [RunOutcome("m", 0, summary([2.0, 1.0, 0.5], [50.0, 70.0, 80.0])),
                RunOutcome("m", 1, summary([3.0, 2.0, 1.5], [60.0, 80.0, 90.0])), RunOutcome("x", 0, error="boom")]
    figures = []
    monkeypatch.setattr(plots, "_save_figure", lambda fig, path: figures.append(fig))
    plots._curves(outcomes, tmp_path / "curves.png")
    loss_ax, acc_ax = figures[0].axes
    (loss_line,), (acc_line,) = loss_ax.get_lines(), acc_ax.get_lines()
    assert list(loss_line.get_xdata()) == list(acc_line.get_xdata()) == [1, 2, 2.5]
    assert list(loss_line.get_ydata()) == [2.5, 1.5, 1.0] and list(acc_line.get_ydata()) == [55.0, 75.0, 85.0]


def _top1_outcomes(model: str, top1_by_seed: dict[int, float | None]) -> list[RunOutcome]:
    return [RunOutcome(model, seed, summary={"top1": top1}) if top1 is not None else RunOutcome(model, seed, error="x")
            for seed, top1 in top1_by_seed.items()]


def test_only_seeds_both_finished_are_paired():
    outcomes = [*_top1_outcomes("base", {0: 90.0, 1: None, 2: 91.0, 3: 89.0}),
                *_top1_outcomes("a", {0: 91.0, 1: 95.0, 2: 93.0, 3: 92.0})]  # differences 1, (none), 2, 3
    rows = with_differences([{"model": "base"}, {"model": "a"}], outcomes, "base")
    half = t_quantile(0.975, 2) / math.sqrt(3)
    assert rows[0]["verdict"] == "baseline" and rows[0]["delta"] is None
    assert rows[1]["pairs"] == 3 and rows[1]["delta"] == pytest.approx(2.0)
    assert (rows[1]["ci_low"], rows[1]["ci_high"]) == (pytest.approx(2 - half, abs=1e-4),
                                                       pytest.approx(2 + half, abs=1e-4))
    assert rows[1]["verdict"] == "no difference shown"


def test_claims_are_tested_on_their_own_pair_and_absent_models_are_not_shown():
    outcomes = [*_top1_outcomes("a", {0: 90.0, 1: 91.0, 2: 92.0}), *_top1_outcomes("b", {0: 85.0, 1: 85.5, 2: 86.5}),
                *_top1_outcomes("c", {0: 90.2, 1: 90.9, 2: 92.1})]
    rows = [{"model": m, "macs": macs} for m, macs in (("a", 100), ("b", 100), ("c", 120))]
    claims = (Claim("P", "a beats b", "a", "b"), Claim("P", "a on par with c", "a", "c", "on par"),
              Claim("P", "b not worse than a", "b", "a", "not worse"), Claim("P", "a beats d", "a", "d"))
    table = claim_rows(rows, outcomes, claims)
    assert [(c["claim"], c["verdict"]) for c in table] == [
        ("a beats b", "holds"), ("a on par with c", "holds"), ("b not worse than a", "does not hold")]
    assert table[0]["delta"] == pytest.approx(5.333, abs=1e-3) and table[1]["macs_b"] == 120
    with pytest.raises(ValueError, match="kind must be one of 'better', 'on par', 'not worse'; got 'beats'"):
        Claim("P", "x", "a", "b", "beats")


def test_paper_claims_name_registered_models():
    import visionmix

    names = set(visionmix.list_models())
    assert all({c.model_a, c.model_b} <= names for c in PAPER_CLAIMS)
    assert all({c.model_a, c.model_b} <= set(PRESETS["claims"].models) for c in PAPER_CLAIMS)
    assert PRESETS["claims"].seeds >= 3 and PRESETS["claims"].data == "fashion-mnist"
    assert PRESETS["claims"].baseline in PRESETS["claims"].models


PAIRED = ["resnet_nano", "mixer_nano"]


@pytest.fixture(scope="module")
def paired_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("paired")
    claims = (Claim("test", "resnet beats mixer", "resnet_nano", "mixer_nano"),
              Claim("test", "absent", "resnet_nano", "uniformer_nano", "on par"))
    rows = compare(PAIRED, out, data="digits", seeds=2, recipe=RECIPE, bench_batch_size=4, bench_repeats=2,
                   progress=False, baseline="mixer_nano", claims=claims, log=lambda line: None)
    return out, rows


def test_two_seeds_and_a_baseline_give_verdict_columns(paired_run):
    out, rows = paired_run
    with open(out / "results.csv", newline="") as f:
        csv_rows = {r["model"]: r for r in csv.DictReader(f)}
    assert csv_rows["mixer_nano"]["verdict"] == "baseline"
    resnet = csv_rows["resnet_nano"]
    assert resnet["pairs"] == "2" and resnet["verdict"] in ("better", "worse", "no difference shown")
    assert float(resnet["ci_low"]) <= float(resnet["delta"]) <= float(resnet["ci_high"])
    top1 = {m: [json.loads((out / "runs" / m / f"seed{s}" / "summary.json").read_text())["top1"] for s in (0, 1)]
            for m in PAIRED}
    assert float(resnet["delta"]) == pytest.approx(statistics.fmean(
        a - b for a, b in zip(top1["resnet_nano"], top1["mixer_nano"], strict=True)), abs=1e-4)
    report = json.loads((out / "results.json").read_text())
    assert report["meta"]["baseline"] == "mixer_nano" and report["models"][0]["verdict"] == resnet["verdict"]
    assert rows[0]["delta"] == report["models"][0]["delta"]
    assert "| Δ top-1 vs mixer_nano (95% CI) | verdict |" in (out / "results.md").read_text()


def test_the_differences_plot_and_the_claims_table(paired_run):
    out, _ = paired_run
    image = imread(out / "differences.png")
    assert (out / "differences.png").read_bytes().startswith(PNG_SIGNATURE) and image[..., :3].std() > 0
    report = json.loads((out / "results.json").read_text())
    assert [c["claim"] for c in report["claims"]] == ["resnet beats mixer"]  # the absent model's claim is not shown
    claim = report["claims"][0]
    assert claim["pairs"] == 2 and claim["delta"] == report["models"][0]["delta"]
    assert claim["macs_a"] == report["models"][0]["macs"] and claim["macs_b"] == report["models"][1]["macs"]
    with open(out / "claims.csv", newline="") as f:
        assert [r["verdict"] for r in csv.DictReader(f)] == [claim["verdict"]]
    markdown = (out / "results.md").read_text()
    assert "## Claims" in markdown and "| test | resnet beats mixer (better) | resnet_nano vs mixer_nano |" in markdown


def test_a_baseline_outside_the_models_is_refused(tmp_path):
    with pytest.raises(ValueError, match="baseline must be one of 'mixer_nano'; got 'resnet_nano'"):
        compare(["mixer_nano"], tmp_path, baseline="resnet_nano")
    assert list(tmp_path.iterdir()) == []


def test_differences_plot_has_one_row_per_paired_model_and_a_line_at_zero(monkeypatch, tmp_path):
    rows = [{"model": "base", "delta": None, "ci_low": None, "ci_high": None},
            {"model": "a", "delta": 2.0, "ci_low": -0.5, "ci_high": 4.5},
            {"model": "b", "delta": -1.0, "ci_low": None, "ci_high": None},  # one seed: a point, no bar
            {"model": "c", "delta": None, "ci_low": None, "ci_high": None}]  # not paired: no row
    figures = []
    monkeypatch.setattr(plots, "_save_figure", lambda fig, path: figures.append(fig))
    plots._differences(rows, "base", tmp_path / "d.png")
    (ax,) = figures[0].axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"] and "base" in ax.get_title()
    assert any(list(line.get_xdata()) == [0.0, 0.0] for line in ax.get_lines())
    points = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert [(list(p.get_xdata()), list(p.get_ydata())) for p in points] == [([2.0], [0]), ([-1.0], [1])]
