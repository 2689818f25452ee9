"""The trainer on digits with a ~1k-parameter test model: schedule, optimizer groups, EMA, run directories,
overwrite protection, NaN handling, evaluation metrics against a direct computation, atomic checkpoint writes."""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import tinynets
from visionmix.data import build_dataset
from visionmix.engine import TrainConfig, evaluate, load_run, read_meta, resume_run, run_files, train
from visionmix.engine.config import BUDGET_FILL
from visionmix.engine.optim import ModelEma, param_groups, warmup_cosine
from visionmix.errors import CheckpointError, TrainingError
from visionmix.models import create_model
from visionmix.models.uniformer_light import UniFormerLight

pytestmark = pytest.mark.usefixtures("tiny_models")  # tiny_test_net / tiny_test_dbb, for this module

CFG = TrainConfig(model="tiny_test_net", data="digits", epochs=2, batch_size=32, max_train_samples=192,
                  max_eval_samples=100, lr=1e-2, device="cpu")


def test_warmup_cosine_schedule() -> None:
    f = [warmup_cosine(s, warmup_steps=4, total_steps=24, min_ratio=0.1) for s in range(24)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    for s in range(4, 24):  # half cosine from 1 down to min_ratio over steps 4..24
        assert f[s] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 20)))
    assert all(a > b for a, b in zip(f[4:], f[5:], strict=False))
    assert warmup_cosine(24, warmup_steps=4, total_steps=24, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(0, warmup_steps=0, total_steps=10, min_ratio=0.0) == 1.0


def test_param_groups_exempt_1d_and_no_weight_decay() -> None:
    model = tinynets.TinyNet()
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["block.weight", "stem.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["block.bias", "head.bias", "head.weight",
                                                                 "norm.bias", "norm.weight"]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_ema_follows_its_formula() -> None:
    model = tinynets.TinyNet()
    ema = ModelEma(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=100)  # decay min(0.9, 101/110) = 0.9
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.9 * start[k] + 0.1 * model.state_dict()[k])
    ema.update(model, step=0)  # warm-up: decay min(0.9, 1/10) = 0.1
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_run_directory_summary_and_evaluation(tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = train(CFG, run, progress=False)
    for key in ("model", "data", "epochs", "params", "top1", "top5", "eval_loss", "train_time_s",
                "train_images_per_s", "history", "config"):
        assert key in summary
    assert summary["params"] == sum(p.numel() for p in tinynets.TinyNet().parameters())
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    for h in summary["history"]:
        assert {"epoch", "train_loss", "train_acc", "eval_loss", "eval_top1", "lr", "time_s"} <= set(h)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines == summary["history"]
    assert json.loads((run / "summary.json").read_text()) == summary
    meta = read_meta(run)
    assert meta["finished"] and meta["epoch"] == 2 and meta["global_step"] == 12  # 192 // 32 = 6 steps/epoch
    assert sorted(p.name for p in run.iterdir()) == [  # the previous checkpoint (epoch 1) is kept
        "checkpoint-previous.json", "checkpoint.json", "metrics.jsonl", "state-00000006.pt", "state-00000012.pt",
        "summary.json", "train.log", "weights-00000006.safetensors", "weights-00000012.safetensors"]
    assert json.loads((run / "checkpoint-previous.json").read_text())["global_step"] == 6
    # the reloaded model scores exactly what the run reported; metrics agree with a direct computation
    model, meta = load_run(run)
    test = build_dataset("digits", "test", max_samples=100).with_stats(meta["data"]["mean"], meta["data"]["std"])
    metrics = evaluate(model, test, "cpu", batch_size=7)
    assert metrics["top1"] == summary["top1"] and metrics["loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
    x = (test.images.float() / 255 - meta["data"]["mean"][0]) / meta["data"]["std"][0]
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1)
    assert metrics["num_samples"] == 100
    assert metrics["top1"] == pytest.approx(100 * (pred == test.labels).float().mean().item())
    top5 = (logits.topk(5, 1).indices == test.labels[:, None]).any(1).float().mean().item()
    assert metrics["top5"] == pytest.approx(100 * top5)
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, test.labels).item(), rel=1e-5)
    confusion = torch.zeros(10, 10, dtype=torch.long)
    for t, p in zip(test.labels.tolist(), pred.tolist(), strict=True):
        confusion[t, p] += 1
    assert metrics["confusion"] == confusion.tolist()
    for c in range(10):
        n = int((test.labels == c).sum())
        expected = None if n == 0 else 100 * int(confusion[c, c]) / n
        assert metrics["per_class"][c] == (pytest.approx(expected) if expected is not None else None)


def test_existing_runs_are_protected(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = replace(CFG, epochs=1)
    first = train(cfg, run, progress=False)
    with pytest.raises(ValueError, match="already holds a training run; pass --resume .* or --force"):
        train(cfg, run, progress=False)
    assert train(cfg, run, resume=True, progress=False) == first  # finished: returned as is
    with pytest.raises(ValueError, match=r"another configuration \(lr: 0.01 -> 0.02\)"):
        train(replace(cfg, lr=0.02), run, resume=True, progress=False)
    (run / "notes.txt").write_text("mine")
    again = train(replace(cfg, seed=1), run, progress=False, force=True)
    assert again["config"]["seed"] == 1 and (run / "notes.txt").read_text() == "mine"
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("x")
    with pytest.raises(ValueError, match=r"is not empty \(data.csv\)"):
        train(cfg, other, progress=False)
    with pytest.raises(ValueError, match="unknown model 'tiny_test_nett'; closest: tiny_test_net"):
        train(replace(cfg, model="tiny_test_nett"), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0.0, 1.0\), got 1.0"):
        train(replace(cfg, label_smoothing=1.0), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="augment must be one of 'crop-flip', 'flip', 'none'; got 'crop'"):
        train(replace(cfg, augment="crop"), tmp_path / "x", progress=False)


USER_FILES = {"summary.json": "{}", "metrics.jsonl": "mine\n", "eval.json": "[]", "weights-best-model.safetensors": "w",
              "state-of-the-art.pdf": "%PDF", ".notes.tmp": "n"}


def _write(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def _contents(directory: Path) -> dict[str, str]:
    return {p.name: p.read_bytes().decode("utf-8", "replace") for p in directory.iterdir()}


def test_a_directory_without_a_checkpoint_is_the_users(tmp_path: Path) -> None:
    """Files named like a run's are the user's unless checkpoint.json says the directory is a run: nothing is
    deleted, with or without --force (regression: all six files below were removed)."""
    cfg = replace(CFG, epochs=1)
    out = tmp_path / "out"
    _write(out, USER_FILES)
    with pytest.raises(ValueError, match=r"is not empty \(.notes.tmp, eval.json, metrics.jsonl, \.\.\.\)"):
        train(cfg, out, progress=False)
    with pytest.raises(ValueError, match=r"holds no visionmix run but has files named like a run's own \(eval.json, "
                                         r"metrics.jsonl, summary.json\), which --force would overwrite"):
        train(cfg, out, progress=False, force=True)
    (out / "checkpoint.json").write_text('{"mine": true}')  # not a visionmix checkpoint: still the user's
    with pytest.raises(ValueError, match=r"holds no visionmix run .*\(checkpoint.json, eval.json, metrics.jsonl, "):
        train(cfg, out, resume=True, progress=False, force=True)
    assert _contents(out) == {**USER_FILES, "checkpoint.json": '{"mine": true}'}
    others = {"state-of-the-art.pdf": "%PDF", "weights-best-model.safetensors": "w", ".notes.tmp": "n"}
    side = tmp_path / "side"
    _write(side, others)
    train(cfg, side, progress=False, force=True)  # --force writes beside files that are not named like a run's
    assert {k: v for k, v in _contents(side).items() if k in others} == others


def test_force_replaces_only_the_runs_own_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(replace(CFG, epochs=1), run, progress=False)
    stray = ".weights-00000003.safetensors.0123456789abcdef.tmp"  # left by a kill mid-write: the run's own
    _write(run, {**{k: v for k, v in USER_FILES.items() if k not in run_files.RUN_FILES}, stray: "partial"})
    train(replace(CFG, epochs=1, seed=3), run, progress=False, force=True)
    files = _contents(run)
    assert {k: files[k] for k in ("state-of-the-art.pdf", "weights-best-model.safetensors", ".notes.tmp")} == {
        "state-of-the-art.pdf": "%PDF", "weights-best-model.safetensors": "w", ".notes.tmp": "n"}
    assert stray not in files and read_meta(run)["config"]["seed"] == 3


def test_a_stray_temporary_file_is_removed_on_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(replace(CFG, epochs=1), run, progress=False)
    stray, foreign = ".state-00000009.pt.fedcba9876543210.tmp", ".my-editor.tmp"
    _write(run, {stray: "partial", foreign: "mine", "weights-00000099.safetensors": "orphan"})
    resume_run(run, progress=False)  # finished: nothing to train, but a resume cleans up after a killed write
    assert not (run / stray).exists() and not (run / "weights-00000099.safetensors").exists()
    assert (run / foreign).read_text() == "mine"


def test_a_failing_write_fails_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step-0 checkpoint is written before the first step: an unwritable directory fails at once."""
    calls = []
    monkeypatch.setattr(tinynets.TinyNet, "forward", lambda self, x: calls.append(1))

    def refuse(*args: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "run"))

    monkeypatch.setattr(run_files, "atomic_write", refuse)
    with pytest.raises(PermissionError, match="Permission denied"):
        train(CFG, tmp_path / "run", progress=False)
    assert calls == []


def test_a_damaged_checkpoint_names_its_file_and_the_previous_one_takes_over(tmp_path: Path) -> None:
    cfg = replace(CFG, epochs=2)
    straight = train(cfg, tmp_path / "straight", progress=False)
    run = tmp_path / "run"
    train(replace(cfg, epochs=2), run, progress=False)
    meta = read_meta(run)
    weights = run / meta["files"]["weights"]
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    hint = (r"the previous checkpoint \(epoch 1, global step 6\) is intact: continue from it with 'visionmix train "
            rf"--resume {run} --from-previous'")
    with pytest.raises(CheckpointError, match=rf"{weights} is damaged: not a readable safetensors file .*{hint}"):
        resume_run(run, progress=False)  # a finished run is checked too
    with pytest.raises(CheckpointError, match=rf"{weights} is damaged.*{hint}"):
        load_run(run)
    again = resume_run(run, progress=False, from_previous=True)  # epoch 2 again, exactly as the first time
    timeless = [{k: v for k, v in h.items() if k not in ("time_s", "images_per_s")} for h in straight["history"]]
    assert [{k: h[k] for k in timeless[0]} for h in again["history"]] == timeless
    state = run / read_meta(run)["files"]["state"]
    state.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=rf"{state} is damaged: not a readable training state"):
        resume_run(run, progress=False)


def test_weights_that_do_not_fit_are_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(replace(CFG, epochs=1), run, progress=False)
    weights = run / read_meta(run)["files"]["weights"]
    state = load_file(weights)
    state["head.weight"] = state["head.weight"][:3]
    del state["stem.weight"]
    from safetensors.torch import save_file

    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"does not fit TinyNet: 1 shape mismatches: head.weight: checkpoint "
                                                   r"\(3, 8\) vs model \(10, 8\); 1 missing keys: stem.weight"):
        load_run(run)


def test_a_diverged_evaluation_stops_instead_of_writing_nan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine_train = importlib.import_module("visionmix.engine.trainer")  # where the loop calls evaluate

    real = engine_train.evaluate
    monkeypatch.setattr(engine_train, "evaluate", lambda *a, **k: {**real(*a, **k), "loss": math.inf})
    with pytest.raises(TrainingError, match=r"non-finite test loss \(inf\) after epoch 1; the last good checkpoint "
                                            r"\(epoch 0, global step 0\)"):
        train(CFG, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "summary.json").exists()
    with pytest.raises(ValueError, match=r"lr must be in \(0.0, 1.0\], got 1e\+30"):
        train(replace(CFG, lr=1e30), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        run_files.atomic_write_json(tmp_path / "nan.json", {"loss": math.nan})
    assert not (tmp_path / "nan.json").exists()


def test_configs_saved_with_a_boolean_augment_still_load() -> None:
    assert TrainConfig.from_dict({"model": "m", "augment": True}).augment == "crop-flip"
    assert TrainConfig.from_dict({"model": "m", "augment": False}).augment == "none"


def test_fractional_epochs_end_part_way_and_resume_exactly(tmp_path: Path) -> None:
    cfg = replace(CFG, epochs=1.5, save_every=4)  # 6 steps per epoch: 9 steps, the second epoch stops after 3
    straight = train(cfg, tmp_path / "straight", progress=False)
    assert [(h["epoch"], h["global_step"]) for h in straight["history"]] == [(1, 6), (2, 9)]
    assert straight["epochs"] == 1.5 and read_meta(tmp_path / "straight")["finished"]
    assert straight["history"][-1]["lr"] == pytest.approx(cfg.lr * cfg.min_lr_ratio)  # the cosine spans 9 steps
    # a run that dies at step 9 (the last one) keeps its step-8 checkpoint, taken mid-way into the partial epoch
    broken = tmp_path / "broken"
    with pytest.raises(TrainingError, match=r"at epoch 2 step 3; the last good checkpoint \(epoch 1, global step 8\)"):
        train(replace(cfg, model_kwargs={"nan_at_call": 9}), broken, progress=False)
    resumed = resume_run(broken, progress=False)  # a new model: its call counter restarts, step 9 is finite
    assert read_meta(broken)["global_step"] == 9
    for key in ("top1", "eval_loss"):
        assert resumed[key] == straight[key]
    timing = ("time_s", "images_per_s")
    assert [{k: v for k, v in h.items() if k not in timing} for h in resumed["history"]] == \
        [{k: v for k, v in h.items() if k not in timing} for h in straight["history"]]
    weights = [load_file(run / read_meta(run)["files"]["weights"]) for run in (tmp_path / "straight", broken)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    with pytest.raises(ValueError, match=r"epochs must be in \(0.0, inf\), got 0"):
        train(replace(CFG, epochs=0), tmp_path / "x", progress=False)


BUDGET_S = 1.2
WARMUP_STEPS = 3  # CFG: 6 steps per epoch, warmup_epochs 0.5


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The trainer's clock advances only when the test model sleeps, so budgeted runs are exact under any load."""
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(time, "sleep", lambda seconds: now.__setitem__(0, now[0] + seconds))
    return now


def test_time_budget_fixes_the_length_after_warmup_and_a_resumed_run_keeps_it(tmp_path: Path, fake_clock) -> None:
    warm, later = 1 / 16, 1 / 64  # seconds per step (binary fractions: the times add up exactly)
    fixed = WARMUP_STEPS + math.floor((BUDGET_FILL * BUDGET_S - WARMUP_STEPS * warm) / warm)  # at the warmup's speed
    run = tmp_path / "run"
    model = {"step_delay": warm, "later_delay": later, "later_from_call": WARMUP_STEPS + 1}
    cfg = replace(CFG, epochs=50, save_every=2, time_budget_min=BUDGET_S / 60)
    with pytest.raises(TrainingError, match="at epoch 2 step 6"):  # call 12 dies; the step-10 checkpoint stays
        train(replace(cfg, model_kwargs={**model, "nan_at_call": 12}), run, progress=False)
    saved = read_meta(run)
    assert saved["global_step"] == 10 and saved["length_fixed"] and saved["total_steps"] == fixed
    summary = resume_run(run, progress=False)  # a new model: its call counter restarts, no NaN within 8 steps
    meta = read_meta(run)
    assert meta["finished"] and meta["global_step"] == meta["total_steps"] == fixed  # not re-fixed on resume
    assert summary["epochs_trained"] == fixed / 6
    # steps 1-10 of the first run, then 11-18 in the resumed one, whose first 3 calls are slow again
    assert summary["train_time_s"] == WARMUP_STEPS * warm + 7 * later + 3 * warm + 5 * later
    assert summary["history"][-1]["lr"] == pytest.approx(cfg.lr * cfg.min_lr_ratio)  # the cosine ends with the run


def test_time_budget_ends_the_run_early_when_the_machine_slows_down(tmp_path: Path, fake_clock) -> None:
    warm, later = 1 / 64, 1 / 4  # the warmup's speed predicts 74 steps; at the later speed the budget ends step 8
    model = {"step_delay": warm, "later_delay": later, "later_from_call": WARMUP_STEPS + 1}
    cfg = replace(CFG, epochs=50, model_kwargs=model, time_budget_min=BUDGET_S / 60)
    summary = train(cfg, tmp_path / "run", progress=False)
    meta = read_meta(tmp_path / "run")
    spent_at = WARMUP_STEPS + math.ceil((BUDGET_S - WARMUP_STEPS * warm) / later)
    assert meta["finished"] and meta["global_step"] == meta["total_steps"] == spent_at == 8
    assert summary["train_time_s"] == WARMUP_STEPS * warm + (spent_at - WARMUP_STEPS) * later  # the step that spent it
    assert summary["history"][-1]["lr"] > cfg.lr * cfg.min_lr_ratio  # cut short before the end of its cosine
    with pytest.raises(ValueError, match="time_budget_min needs warmup_epochs > 0"):
        train(replace(cfg, warmup_epochs=0.0), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match=r"warmup of at least one step \(warmup_epochs=0.05 x 6 steps per epoch"):
        train(replace(cfg, warmup_epochs=0.05), tmp_path / "y", progress=False)


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = replace(CFG, epochs=3, model_kwargs={"nan_at_call": 9})  # 6 steps per epoch: call 9 is in epoch 2
    with pytest.raises(TrainingError, match=r"non-finite training loss \(nan\).* at epoch 2 step 3; the last good "
                                            r"checkpoint \(epoch 1, global step 6\) is kept"):
        train(cfg, run, progress=False)
    meta = read_meta(run)
    assert meta["epoch"] == 1 and meta["global_step"] == 6 and not meta["finished"]
    weights = load_file(run / meta["files"]["weights"])
    assert all(torch.isfinite(v).all() for v in weights.values())
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e.get("epoch") for e in events] == [1, 2] and events[1]["event"] == "non-finite"


def test_ema_run_evaluates_and_saves_the_average(tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = train(replace(CFG, epochs=1, ema_decay=0.9), run, progress=False)
    meta = read_meta(run)
    assert set(meta["files"]) == {"weights", "state", "ema"} and summary["ema"]
    ema_model, _ = load_run(run)
    raw_model, _ = load_run(run, ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(ema_model.state_dict().values(),
                                                       raw_model.state_dict().values(), strict=True))
    test = build_dataset("digits", "test", max_samples=100).with_stats(meta["data"]["mean"], meta["data"]["std"])
    assert evaluate(ema_model, test, "cpu")["top1"] == summary["top1"]


# ---------------------------------------------------------------------------------------- atomic writes
def test_atomic_write_leaves_old_file_or_new_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.json"
    run_files.atomic_write(path, "old")
    assert path.read_text() == "old" and oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        run_files.atomic_write(path, "new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_checkpoint_switches_only_when_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    train(replace(CFG, epochs=1), run, progress=False)
    before = read_meta(run)
    model, _ = load_run(run)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def killed(*args: object) -> None:  # the process dies after writing the new tagged files, before the JSON
        raise KeyboardInterrupt

    monkeypatch.setattr(run_files, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        run_files.save_checkpoint(run, dict(before, global_step=99), model, {"optimizer": {}})
    monkeypatch.undo()
    assert read_meta(run) == before  # still the old, complete checkpoint
    reloaded, _ = load_run(run)
    first = load_file(run / before["files"]["weights"])
    assert all(torch.equal(v, first[k]) for k, v in reloaded.state_dict().items())
    # the next successful save switches over, keeps the checkpoint it replaces as the previous one and removes
    # every tagged file neither names (the orphans of the killed save, the checkpoint before the previous one)
    run_files.save_checkpoint(run, dict(before, global_step=100), model, {"optimizer": {}})
    names = sorted(p.name for p in run.iterdir())
    step = before["global_step"]
    assert names == ["checkpoint-previous.json", "checkpoint.json", "metrics.jsonl", f"state-{step:08d}.pt",
                     "state-00000100.pt", "summary.json", "train.log", f"weights-{step:08d}.safetensors",
                     "weights-00000100.safetensors"]
    assert read_meta(run)["files"]["weights"] == "weights-00000100.safetensors"
    assert json.loads((run / "checkpoint-previous.json").read_text()) == before


def test_plotting_the_confusion_matrix_leaves_matplotlib_alone(tmp_path: Path) -> None:
    """No import-time or call-time global state: no backend switch, no pyplot figure registry (was matplotlib.use)."""
    import subprocess
    import sys

    code = ("import sys, matplotlib; from visionmix.engine.evaluate import plot_confusion; "
            "before = matplotlib.rcParams._get_backend_or_none(); "
            f"assert plot_confusion([[3, 1], [0, 4]], ['a', 'b'], {str(tmp_path / 'c.png')!r}); "
            "print(before == matplotlib.rcParams._get_backend_or_none(), 'matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")


def test_recompute_bn_statistics_is_the_average_over_the_batches_with_drop_path_off() -> None:
    from visionmix.engine.evaluate import recompute_bn_statistics

    torch.manual_seed(0)
    model = tinynets.TinyNet(drop_path_rate=0.5).train()
    model.norm.momentum = 0.3
    batches = [torch.randn(16, 1, 28, 28) for _ in range(3)]
    assert recompute_bn_statistics(model, batches) == 1
    with torch.no_grad():
        stems = [model.stem(x) for x in batches]  # what the norm sees (before it, nothing is random)
    expected_mean = torch.stack([s.mean((0, 2, 3)) for s in stems]).mean(0)
    expected_var = torch.stack([s.var((0, 2, 3), unbiased=True) for s in stems]).mean(0)
    torch.testing.assert_close(model.norm.running_mean, expected_mean)
    torch.testing.assert_close(model.norm.running_var, expected_var)
    assert model.training and model.norm.momentum == 0.3 and int(model.norm.num_batches_tracked) == 3


def test_recompute_bn_statistics_equals_momentum_none_bit_for_bit_without_reading_the_device() -> None:
    from visionmix.engine.evaluate import recompute_bn_statistics
    from visionmix.transfers import HostSyncCounter

    torch.manual_seed(0)
    model = tinynets.TinyNet().eval()
    reference = copy.deepcopy(model)
    batches = [torch.randn(16, 1, 28, 28) for _ in range(5)]
    reference.norm.reset_running_stats()
    reference.norm.momentum = None  # BatchNorm's own cumulative average (1 / num_batches_tracked)
    reference.norm.train()
    with torch.no_grad():
        for x in batches:
            reference(x)
    with HostSyncCounter("cpu") as counter:
        recompute_bn_statistics(model, batches)
    assert counter.counts["reads"] == 0, counter.ops  # a GPU never waits for the host here
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model.norm, name), getattr(reference.norm, name)), name


def test_a_short_run_ends_with_bn_statistics_of_its_final_weights(tmp_path: Path) -> None:
    from visionmix.engine.config import RECOMPUTE_BN_BATCH, RECOMPUTE_BN_IMAGES
    from visionmix.engine.evaluate import recompute_bn_statistics

    cfg = replace(CFG, eval_batch_size=32)  # the recomputation's batches are RECOMPUTE_BN_BATCH, not these
    on = train(replace(cfg, recompute_bn="auto"), tmp_path / "on", progress=False)  # 12 steps < 1000: on
    off = train(replace(cfg, recompute_bn="off"), tmp_path / "off", progress=False)
    model_on, _ = load_run(tmp_path / "on")
    model_off, _ = load_run(tmp_path / "off")
    weights = {k: v for k, v in model_on.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert all(torch.equal(v, model_off.state_dict()[k]) for k, v in weights.items())  # same training
    assert not torch.equal(model_on.norm.running_mean, model_off.norm.running_mean)
    train_ds = build_dataset("digits", "train", max_samples=CFG.max_train_samples)
    from visionmix.data import BatchLoader

    assert len(train_ds) < RECOMPUTE_BN_IMAGES and RECOMPUTE_BN_BATCH not in (cfg.eval_batch_size, len(train_ds))
    direct = copy.deepcopy(model_off)
    recompute_bn_statistics(direct, (x for x, _ in BatchLoader(train_ds, RECOMPUTE_BN_BATCH, train=False)))
    torch.testing.assert_close(model_on.norm.running_mean, direct.norm.running_mean)
    torch.testing.assert_close(model_on.norm.running_var, direct.norm.running_var)
    first = [{k: h[k] for k in ("eval_loss", "eval_top1", "train_loss")} for h in (on["history"][0], off["history"][0])]
    assert first[0] == first[1]  # only the last epoch's evaluation sees the new statistics
    assert on["history"][1]["eval_loss"] != off["history"][1]["eval_loss"]
    with pytest.raises(ValueError, match="recompute_bn must be one of 'auto', 'on', 'off'; got 'yes'"):
        train(replace(cfg, recompute_bn="yes"), tmp_path / "x", progress=False)


def test_a_two_headed_model_trains_both_heads_with_the_official_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """UniFormer-light trains its class-token head beside the pooled one (engine_light.py: 0.5 / 0.5 of the loss)."""
    seen: list[tuple[torch.Size, torch.Size]] = []
    real = UniFormerLight.combine_head_losses

    def spy(criterion, logits, cls_logits, target):
        seen.append((logits.shape, cls_logits.shape))
        return real(criterion, logits, cls_logits, target)

    monkeypatch.setattr(UniFormerLight, "combine_head_losses", staticmethod(spy))
    cfg = TrainConfig(model="uniformer_light_nano", data="digits", epochs=1, batch_size=32, max_train_samples=64,
                      max_eval_samples=32, recompute_bn="off", seed=0)
    train(cfg, tmp_path / "run", progress=False)
    assert seen == [(torch.Size([32, 10]), torch.Size([32, 10]))] * 2  # every step, both heads
    trained, _ = load_run(tmp_path / "run")
    torch.manual_seed(0)
    fresh = create_model("uniformer_light_nano", num_classes=10, in_chans=1, img_size=28)
    assert not torch.equal(trained.head_cls.weight, fresh.head_cls.weight)


def test_time_budget_leaves_the_first_step_out_of_the_warmup_speed(tmp_path: Path, fake_clock) -> None:
    compiling, step = 2.0, 1 / 64  # the first step compiles (and on CUDA autotunes): far slower than the rest
    model = {"step_delay": compiling, "later_delay": step, "later_from_call": 2}
    cfg = replace(CFG, epochs=50, model_kwargs=model, time_budget_min=4.0 / 60)
    train(cfg, tmp_path / "run", progress=False)
    meta = read_meta(tmp_path / "run")
    elapsed = compiling + (WARMUP_STEPS - 1) * step  # the compilation counts against the budget ...
    fixed = WARMUP_STEPS + math.floor((BUDGET_FILL * 4.0 - elapsed) / step)  # ... not in the speed
    assert meta["total_steps"] == meta["global_step"] == fixed == 121  # counting the first step: 11
