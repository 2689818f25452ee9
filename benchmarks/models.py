"""Speed of the 224x224 models: images/s at batch 8 in eval mode under ``torch.inference_mode``, and the achieved
GFLOP/s (2 x MACs x images/s) as a fraction of an fp32 2048^3 matmul timed alternately with each model.

Targets (issue 6): Mixer-B/16 reaches >= 0.8 of the matmul rate; no re-parameterisable model is slower deployed
than in its training form. Each model is timed in interleaved rounds with the matmul (and with its deployed form),
so machine drift hits both sides of a ratio alike; medians over the rounds, spread = inter-quartile range / median.

    flock /tmp/visionmix-bench.lock .venv/bin/python benchmarks/models.py [--quick] [--models a,b] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import torch

from visionmix import create_model, is_model, reparameterize
from visionmix.bench.profile import count_macs, count_params, matmul_workload
from visionmix.timing import time_alternately

MODELS = ("mixer_s16_224", "mixer_b16_224", "s2mlpv2_small", "spach_ms_s_patch4_224_conv",
          "spach_ms_s_patch4_224_attn", "spach_ms_s_patch4_224_mlp", "uniformer_small", "uniformer_xxs", "uniformer_xs",
          "uniformer_small_k400_8x8", "resnet18", "dbb_resnet18")  # video rows: clips of 8x224x224 per second
REPARAM = ("dbb_resnet18",)  # also timed deployed, alternately with the training form
MIXER_B_TARGET = 0.8


def bench_one(name: str, batch_size: int, rounds: int, warmup: int) -> list[dict[str, object]]:
    model = create_model(name).eval()
    forms = {"train": model}
    if name in REPARAM:
        forms["deploy"] = reparameterize(model)
    x = torch.randn(batch_size, *model.pretrained_cfg["input_size"])
    matmul, matmul_flops = matmul_workload(2048)
    fns = {"matmul": matmul, **{form: (lambda m=m: m(x)) for form, m in forms.items()}}
    with torch.inference_mode():
        timings = time_alternately(fns, warmup=warmup, repeats=rounds, min_sample_s=0.0)
    matmul_gflops = matmul_flops / timings["matmul"].median / 1e9
    rows = []
    for form, module in forms.items():
        macs = count_macs(module, x[:1])
        throughput = batch_size / timings[form].median
        gflops = 2 * macs * throughput / 1e9
        rows.append({"model": name, "form": form, "params": count_params(module), "macs": macs,
                     "throughput": throughput, "spread": timings[form].spread, "gflops": gflops,
                     "matmul_gflops": matmul_gflops, "fraction": gflops / matmul_gflops})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up call (for `make bench`)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated registered names")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds, warmup = (3, 1) if args.quick else (args.rounds, 2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, 224x224, "
          f"{rounds} rounds, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    header = f"{'model':<28} {'form':<6} {'params':>8} {'GMACs':>6} {'img/s':>8} {'spread':>6} {'GFLOP/s':>8} " \
             f"{'matmul':>7} {'of matmul':>9}"
    print(header)
    print("-" * len(header))
    results = []
    for name in args.models.split(","):
        if not is_model(name):
            print(f"{name:<28} not registered, skipped")
            continue
        for r in bench_one(name, args.batch_size, rounds, warmup):
            results.append(r)
            print(f"{r['model']:<28} {r['form']:<6} {r['params'] / 1e6:>7.2f}M {r['macs'] / 1e9:>6.2f} "
                  f"{r['throughput']:>8.1f} {r['spread']:>6.1%} {r['gflops']:>8.1f} {r['matmul_gflops']:>7.1f} "
                  f"{r['fraction']:>9.2f}", flush=True)
    by_key = {(r["model"], r["form"]): r for r in results}
    if ("mixer_b16_224", "train") in by_key:
        fraction = by_key["mixer_b16_224", "train"]["fraction"]
        verdict = "ok" if fraction >= MIXER_B_TARGET else "MISSED (noisy machine? re-run when idle)"
        print(f"Mixer-B/16 reaches {fraction:.2f} of the matmul rate (target >= {MIXER_B_TARGET}): {verdict}")
    for name in REPARAM:
        if (name, "deploy") in by_key:
            ratio = by_key[name, "deploy"]["throughput"] / by_key[name, "train"]["throughput"]
            verdict = "ok" if ratio >= 1.0 else "MISSED (noisy machine? re-run when idle)"
            print(f"{name}: deployed form runs {ratio:.2f}x the training form's images/s (target >= 1): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
