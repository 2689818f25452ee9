"""Forward speed of the layers against a plain ``nn.Conv2d`` of the same in/out shape (issue 2, SPEC.md section 5).

Conv-like and attention layers run at 32x64x56x56 -> 64 channels, k=3; ``spatial_shift`` runs on 8x56x56x256
against an ``nn.Linear(256, 256)`` on the same tensor. Every group is timed in interleaved rounds in one process
(``time_alternately``), eval mode under ``torch.inference_mode``; medians, ratio of medians to the group's
reference, spread = inter-quartile range / median. Shared machines drift: compare ratios, not milliseconds.

    flock /tmp/visionmix-bench.lock .venv/bin/python benchmarks/layers.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import torch
import torch.nn.functional as F
from torch import nn

from visionmix.layers import (
    ULSAM,
    CondConv2d,
    PSConv2d,
    SelectiveKernel,
    SEModule,
    WeightNetConv2d,
    spatial_shift,
)
from visionmix.timing import Timing, time_alternately

BATCH, CHANNELS, SIZE = 32, 64, 56
# row -> (largest ratio to the group's reference, where the target comes from)
TARGETS = {
    "CondConv2d (4 experts)": (1.3, "<= 1.3x plain conv"),
    "WeightNetConv2d (M=2, G=2)": (2.0, "<= 2x plain conv"),
    "PSConv2d (d=2, parts=4)": (1.5, "<= 1.5x plain conv (stretch 1.2x)"),
    "spatial_shift": (0.5, "< 0.5x Linear"),
}


def cond_conv_loop(layer: CondConv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's computation with one ``F.conv2d`` per sample: the pattern the batched form replaces."""
    routing = torch.sigmoid(layer.routing(x.mean((2, 3))))
    kernels = (routing @ layer.weight.flatten(1)).view(-1, *layer.kernel_shape)
    return torch.cat([F.conv2d(x[b:b + 1], kernels[b], None, layer.stride, layer.padding, layer.dilation,
                               layer.groups) for b in range(x.shape[0])])


def conv_group() -> dict[str, object]:
    """Callables of the 64 -> 64, k=3 group; the first is the reference."""
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    plain = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False)
    plain_cl = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    cond = CondConv2d(CHANNELS, CHANNELS, 3, num_experts=4)
    modules = {
        "WeightNetConv2d (M=2, G=2)": WeightNetConv2d(CHANNELS, CHANNELS, 3),
        "PSConv2d (d=2, parts=4)": PSConv2d(CHANNELS, CHANNELS, 3, dilation=2, parts=4),
        "SEModule (r=1/16)": SEModule(CHANNELS),
        "SelectiveKernel (3, 5)": SelectiveKernel(CHANNELS, CHANNELS),
        "ULSAM (g=4)": ULSAM(CHANNELS, 4),
    }
    fns = {
        "nn.Conv2d": lambda: plain(x),
        "nn.Conv2d channels_last": lambda: plain_cl(x_cl),
        "CondConv2d (4 experts)": lambda: cond(x),
        "CondConv per-sample loop": lambda: cond_conv_loop(cond, x),
    }
    for name, module in modules.items():
        module.eval()
        fns[name] = lambda m=module: m(x)
    ps = modules["PSConv2d (d=2, parts=4)"]
    fns["PSConv2d channels_last"] = lambda: ps(x_cl)
    # What bounds PSConv2d here: each of its two grouped dilated convs (1/4 of the MACs) costs a third to two
    # thirds of a whole plain conv; summing a partial output into the result is cheap by comparison.
    fns["PSConv2d's gwconv alone (groups 4, d=2)"] = lambda: ps.gwconv(x)
    acc = torch.zeros_like(x)
    fns["one summing pass: acc.add_(x)"] = lambda: acc.add_(x)
    return fns


def shift_group() -> dict[str, object]:
    x = torch.randn(8, SIZE, SIZE, 256)
    linear = nn.Linear(256, 256)
    return {"nn.Linear(256, 256)": lambda: linear(x), "spatial_shift": lambda: spatial_shift(x)}


def report(title: str, timings: dict[str, Timing]) -> list[str]:
    """Print a markdown table of ``timings`` (the first entry is the reference); return the missed targets."""
    reference, base = next(iter(timings.items()))
    lines = [f"\n**{title}** (reference: {reference})\n", "| layer | forward ms | ratio | spread | target | met |",
             "|---|---:|---:|---:|---|---|"]
    missed = []
    for name, timing in timings.items():
        ratio = timing.median / base.median
        limit, target = TARGETS.get(name, (None, ""))
        met = "" if limit is None else ("yes" if ratio <= limit else "NO")
        if met == "NO":
            missed.append(f"{name}: {ratio:.2f}x, target {target}")
        lines.append(f"| {name} | {timing.median * 1e3:.1f} | {ratio:.2f}x | {timing.spread:.0%} | {target} | {met} |")
    print("\n".join(lines))
    return missed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up call (smoke runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rounds, warmup = (3, 1) if args.quick else (args.rounds, 3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds; medians of interleaved "
          "rounds, spread = IQR / median")
    with torch.inference_mode():
        convs = time_alternately(conv_group(), warmup=warmup, repeats=rounds)
        shifts = time_alternately(shift_group(), warmup=warmup, repeats=rounds)
    missed = report(f"{BATCH}x{CHANNELS}x{SIZE}x{SIZE} -> {CHANNELS}, k=3", convs)
    loop_ratio = convs["CondConv2d (4 experts)"].median / convs["CondConv per-sample loop"].median
    print(f"\nCondConv2d / per-sample loop: {loop_ratio:.2f}x (target <= 1.0x)")
    if loop_ratio > 1.0:
        missed.append(f"CondConv2d slower than the per-sample loop: {loop_ratio:.2f}x")
    missed += report("8x56x56x256, channels last", shifts)
    print("\ntargets missed: " + ("; ".join(missed) if missed else "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
