"""The GPU paths, checked in one run the day a GPU is at hand (issue 27): 20 training steps each of the small and
deit recipes under bf16, fp16, channels_last and --compile with :class:`visionmix.transfers.HostSyncCounter` on
(its reads, data-dependent shapes and host->device copies per step), ``eval --deploy`` on the device (trained and
deployed forms make the same predictions), predict with a model deployed on the device, then
``benchmarks/gpu.py``. One table, one row per check; the exit status is 1 if any check failed.

    .venv/bin/python benchmarks/gpu_check.py              # on a CUDA machine
    .venv/bin/python benchmarks/gpu_check.py --cpu-smoke  # the same checks on the CPU, tiny (the test suite's)

In ``--cpu-smoke`` the runs take 3 steps on the embedded digits, and --compile is skipped (minutes of C++
compilation on the CPU; ``tests/engine`` compiles a tiny model instead).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from visionmix.engine import TrainConfig, train
from visionmix.errors import first_line
from visionmix.transfers import HostSyncCounter

MODES = {"bf16": {"amp": "bf16"}, "fp16": {"amp": "fp16"}, "channels_last": {"channels_last": True},
         "compile": {"compile": True}}


def train_check(recipe: str, mode: str, device: torch.device, steps: int, out_dir: Path) -> str:
    """A short run of ``recipe`` under ``mode`` with the host-sync counter on; its figures per step."""
    batch = 16
    cfg = TrainConfig.for_recipe(recipe, model="resnet_nano", data="digits", batch_size=batch, epochs=1,
                                 warmup_epochs=0, max_train_samples=batch * steps, max_eval_samples=64,
                                 device=device.type, recompute_bn="off", **MODES[mode])
    with HostSyncCounter(device) as counter:
        summary = train(cfg, out_dir / f"{recipe}-{mode}", progress=False)
    if summary["history"][-1]["train_loss"] != summary["history"][-1]["train_loss"]:
        raise RuntimeError("the training loss is NaN")
    per_step = ", ".join(f"{k} {v / steps:.1f}" for k, v in counter.counts.items())
    return f"{summary['train_images_per_s']:.0f} img/s; per step over the whole run: {per_step}"


def eval_deploy_check(run_dir: Path, device: torch.device) -> str:
    from visionmix.engine.evaluate import evaluate_run

    report = evaluate_run(run_dir, deploy=True, device=device, max_samples=128)
    check = report["checks"]["deployed"]
    if not check["same_predictions"]:
        raise RuntimeError(f"the deployed form predicts differently: {check}")
    return f"same predictions, max |logit diff| {check['max_abs_logit_diff']:.2g}"


def predict_check(run_dir: Path, device: torch.device, image_dir: Path) -> str:
    import numpy as np
    from PIL import Image

    from visionmix.data import build_dataset
    from visionmix.deployment import deploy
    from visionmix.predict import load_predictor, predict

    images = build_dataset("digits", "test", max_samples=6).images
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy().astype(np.uint8)).save(image_dir / f"{i}.png")
    model, transform, classes = load_predictor(run_dir)
    deployed = deploy(model, torch.zeros(4, transform.in_chans, *transform.size), "eager", device=device)
    results = list(predict(deployed, sorted(image_dir.iterdir()), transform=transform, classes=classes, topk=3,
                           batch_size=4))
    if len(results) != len(images) or any(r.error for r in results):
        raise RuntimeError(f"{len(results)} predictions for {len(images)} images: {results}")
    return f"{len(results)} images on {deployed.device} ({deployed.backend})"


def gpu_benchmark_check(quick: bool) -> str:
    script = Path(__file__).with_name("gpu.py")
    done = subprocess.run([sys.executable, str(script), *(["--quick"] if quick else [])], capture_output=True,
                          text=True)
    if done.returncode:
        raise RuntimeError(f"benchmarks/gpu.py exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return " | ".join(line.strip() for line in done.stdout.splitlines() if line.startswith("  "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="the checks on the CPU, tiny: that the script works")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        device, steps = torch.device("cpu"), 3
    elif torch.cuda.is_available():
        device, steps = torch.device("cuda"), 20
    else:
        print("benchmarks/gpu_check.py: no CUDA device here (--cpu-smoke runs the checks on the CPU)")
        return 2
    rows: list[tuple[str, str, str]] = []

    def check(name: str, run: Callable[[], str], skip: str | None = None) -> None:
        if skip:
            rows.append((name, "skipped", skip))
            return
        try:
            rows.append((name, "ok", run()))
        except Exception as err:  # every failure is a row; the traceback goes to stderr
            traceback.print_exc()
            rows.append((name, "FAILED", first_line(err)))

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        no_compile = "--cpu-smoke: compiling on the CPU takes minutes" if args.cpu_smoke else None
        for recipe in ("small", "deit"):
            for mode in MODES:
                skip = no_compile if mode == "compile" else None
                check(f"train {recipe} {mode}", lambda r=recipe, m=mode: train_check(r, m, device, steps, out), skip)
        run_dir = out / "small-channels_last"
        ready = None if (run_dir / "summary.json").is_file() else "no finished run to evaluate"
        check("eval --deploy", lambda: eval_deploy_check(run_dir, device), ready)
        (out / "images").mkdir()
        check("predict", lambda: predict_check(run_dir, device, out / "images"), ready)
        check("benchmarks/gpu.py", lambda: gpu_benchmark_check(args.cpu_smoke))
    where = "CPU (smoke)" if args.cpu_smoke else torch.cuda.get_device_name()
    width = max(len(name) for name, _, _ in rows)
    print(f"GPU check on {where}, torch {torch.__version__}:")
    print(f"  {'check':<{width}}  {'status':<8}  details")
    for name, status, details in rows:
        print(f"  {name:<{width}}  {status:<8}  {details}")
    return 1 if any(status == "FAILED" for _, status, _ in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
