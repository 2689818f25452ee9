"""Deployed inference speed: ``visionmix.deploy(model, x, "auto")`` against the eager model it came from.

Targets (issue 18), batch 8 at 224 px unless --batch-size: deploy(auto) >= 1.3x eager for resnet50, uniformer_small
and spach_ms_s_patch4_224_conv, >= 1.1x for mixer_b16_224, and never slower than eager for any registered model at a
small batch (--zoo PATTERN, batch 2); --int8 adds the opt-in int8 form (``quantize="int8"``, not held to the float
check). The eager side is the model as built (eval mode, torch.inference_mode), at
parity with timm's and the official code (SPEC section 5); both sides have the same random weights (BN statistics
calibrated by ``randomize_weights``) and are timed alternately in one process; medians over the rounds, spread =
inter-quartile range / median.

    flock /tmp/visionmix-bench.lock .venv/bin/python benchmarks/inference.py [--quick] [--models a,b] [--zoo '*nano*']
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import torch

from visionmix import create_model, deploy, list_models
from visionmix.export import randomize_weights
from visionmix.timing import time_alternately

TARGETS = {"resnet50": 1.3, "uniformer_small": 1.3, "spach_ms_s_patch4_224_conv": 1.3, "mixer_b16_224": 1.1}


def bench_one(name: str, batch_size: int, rounds: int, warmup: int, int8: bool = False) -> dict[str, object]:
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.randn(batch_size, *model.pretrained_cfg["input_size"])
    randomize_weights(model, x)
    deployed = deploy(model, x, "auto", repeats=max(2, rounds // 2))
    calls = {"eager": lambda: model(x), "deployed": lambda: deployed(x)}
    if int8:
        quantized = deploy(model, x, quantize="int8")
        calls["int8"] = lambda: quantized(x)
    with torch.inference_mode():
        timings = time_alternately(calls, warmup=warmup, repeats=rounds, min_sample_s=0.0)
    eager = timings["eager"].median
    return {"model": name, "backend": deployed.backend, "ratio": eager / timings["deployed"].median,
            "eager_img_s": batch_size / eager, "img_s": batch_size / timings["deployed"].median,
            "spread": max(t.spread for t in timings.values()), "diff": deployed.max_rel_diff,
            "candidates": {k: batch_size / v for k, v in deployed.seconds.items()}, "skipped": deployed.skipped,
            "int8": (eager / timings["int8"].median, quantized.max_rel_diff) if int8 else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up call (for `make bench-quick`)")
    parser.add_argument("--models", default=",".join(TARGETS), help="comma-separated registered names")
    parser.add_argument("--zoo", metavar="PATTERN", help="instead: every model matching PATTERN at --batch-size 2")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (2 with --zoo)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--int8", action="store_true", help="also time deploy(..., quantize='int8')")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # exporters' deprecation chatter
    rounds, warmup = (3, 1) if args.quick else (args.rounds, 2)
    names = ([n for n in list_models(args.zoo) if not n.startswith("tiny_test")] if args.zoo
             else args.models.split(","))
    batch = args.batch_size or (2 if args.zoo else 8)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch}, {rounds} rounds")
    header = f"{'model':<30} {'backend':<13} {'eager img/s':>11} {'img/s':>8} {'x eager':>7} {'spread':>6} " \
             f"{'rel diff':>8}  candidates (img/s)"
    print(header)
    print("-" * len(header))
    missed = []
    for name in names:
        r = bench_one(name, batch, rounds, warmup, args.int8)
        candidates = ", ".join(f"{k} {v:.0f}" for k, v in r["candidates"].items())
        if r["int8"] is not None:
            candidates += f"; int8 {r['int8'][0]:.2f}x eager, rel diff {r['int8'][1]:.1e}"
        skipped = f"; skipped {', '.join(r['skipped'])}" if r["skipped"] else ""
        print(f"{name:<30} {r['backend']:<13} {r['eager_img_s']:>11.1f} {r['img_s']:>8.1f} {r['ratio']:>6.2f}x "
              f"{r['spread']:>6.1%} {r['diff']:>8.1e}  {candidates}{skipped}", flush=True)
        target = 1.0 if args.zoo else TARGETS.get(name)
        if target is not None and r["ratio"] < target:
            missed.append(f"{name} {r['ratio']:.2f}x < {target}x")
    print("targets: " + ("all met" if not missed else "MISSED " + "; ".join(missed) + " (noisy machine? re-run)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
