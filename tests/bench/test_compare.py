"""visionmix.bench.compare: a real end-to-end comparison on the bundled digits, resumability, failure isolation."""

from __future__ import annotations

import csv
import importlib
import json
import statistics

import pytest
from matplotlib.image import imread

from visionmix.bench.compare import PLOTS, PRESETS, RunOutcome, compare, markdown_table, resolve_preset, summarize
from visionmix.cli import main
from visionmix.data import FASHION_MNIST_DIR

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
    assert "| mixer_s32_224 |" in markdown and "failed: seed 0: ValueError: " in markdown
    assert all(f"| {m} |" in markdown for m in MODELS[:2])
    results = json.loads((out / "results.json").read_text())
    assert [m["status"] for m in results["models"]] == ["ok", "ok", "failed"]
    assert results["meta"]["recipe"].items() >= RECIPE.items() and results["meta"]["data"] == "digits"
    assert results["meta"]["recipe"]["lr"] == 2e-3  # the engine's defaults complete the recipe


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
    table = markdown_table([row, partial], {"recipe": {}, "bench_batch_size": 8, "seeds": 3, "data": "digits",
                                            "environment": {"threads": 2, "torch": "x"}})
    assert "| m | 92.00 ± 2.65 |" in table and "partial (1/2): seed 1: TrainingError: nan" in table
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


def test_an_interrupt_stops_the_whole_comparison_with_a_resume_hint(tmp_path, monkeypatch):
    import visionmix.engine
    from visionmix.engine import TrainingInterrupted

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted("SIGINT: stopped at epoch 1 step 3/9, checkpoint saved", 2)

    monkeypatch.setattr(visionmix.engine, "train", interrupted)
    with pytest.raises(TrainingInterrupted, match="run the same 'visionmix compare' command again") as info:
        compare(["mixer_nano", "resnet_nano"], tmp_path, data="digits", progress=False, log=lambda line: None)
    assert info.value.signum == 2
    report = json.loads((tmp_path / "results.json").read_text())  # the directory is claimed: a re-run resumes it
    assert report["format"] == "visionmix-compare/1" and report["models"] == [] and report["runs"] == []


def test_training_curves_average_seeds_and_end_a_partial_run_at_its_length(monkeypatch, tmp_path):
    compare_module = importlib.import_module("visionmix.bench.compare")  # the package re-exports compare()

    def summary(losses: list[float], top1: list[float]) -> dict:
        history = [{"epoch": e + 1, "train_loss": loss, "eval_top1": acc}
                   for e, (loss, acc) in enumerate(zip(losses, top1, strict=True))]
        return {"epochs": 50, "epochs_trained": 2.5, "history": history}  # e.g. a time-budgeted run

    outcomes = [RunOutcome("m", 0, summary([2.0, 1.0, 0.5], [50.0, 70.0, 80.0])),
                RunOutcome("m", 1, summary([3.0, 2.0, 1.5], [60.0, 80.0, 90.0])), RunOutcome("x", 0, error="boom")]
    figures = []
    monkeypatch.setattr(compare_module, "_save_figure", lambda fig, path: figures.append(fig))
    compare_module._curves(outcomes, tmp_path / "curves.png")
    loss_ax, acc_ax = figures[0].axes
    (loss_line,), (acc_line,) = loss_ax.get_lines(), acc_ax.get_lines()
    assert list(loss_line.get_xdata()) == list(acc_line.get_xdata()) == [1, 2, 2.5]
    assert list(loss_line.get_ydata()) == [2.5, 1.5, 1.0] and list(acc_line.get_ydata()) == [55.0, 75.0, 85.0]
