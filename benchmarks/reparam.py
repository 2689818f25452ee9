"""Train form vs deployed form vs a plain layer for the re-parameterisable blocks (issue 3, SPEC.md sections 3 and 5).

Conv blocks run at 32x64x56x56 -> 64 channels, k=3; RepMLP at 8x256x14x14 (h = w = 7, fc3_groups = 8,
reparam_conv_k = (1, 3, 5)) against a 3x3 conv of the same width. Per block, the train form (train mode: BNs use
batch statistics), its ``reparameterize()`` form and the plain layer are timed in interleaved rounds in one process
(``time_alternately``), forward only, without autograd; medians, ratios of medians, spread = IQR / median. Each row
also checks the deployed form against the train form in eval mode with random BN statistics (max |diff| / scale).

    flock /tmp/visionmix-bench.lock .venv/bin/python benchmarks/reparam.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import torch
from torch import nn

from visionmix.layers import ConvBN, DiverseBranchBlock, DOConv2d, RepMLPBlock
from visionmix.layers.diverse_branch import AvgPoolConv
from visionmix.reparam import check_equivalence, randomize_batchnorm, reparameterize
from visionmix.timing import time_alternately

C, SIZE = 64, 56
# block -> (train-form limit, deployed limit), as multiples of the plain layer
TARGETS = {
    "ConvBN": (None, 1.05),
    "DOConv2d": (1.3, 1.05),
    "DiverseBranchBlock": (4.0, 1.05),
    "DiverseBranchBlock depthwise": (None, 1.05),
    "RepMLPBlock (vs 3x3 conv)": (None, None),
}


def blocks(batch: int) -> dict[str, tuple[nn.Module, nn.Module, torch.Tensor]]:
    """name -> (train-form block, plain layer of the deployed shape, input)."""
    x = torch.randn(batch, C, SIZE, SIZE)
    x_mlp = torch.randn(max(batch // 4, 1), 256, 14, 14)
    return {
        "ConvBN": (ConvBN(C, C, 3), nn.Conv2d(C, C, 3, padding=1), x),
        "DOConv2d": (DOConv2d(C, C, 3), nn.Conv2d(C, C, 3, padding=1, bias=False), x),
        "DiverseBranchBlock": (DiverseBranchBlock(C, C, 3), nn.Conv2d(C, C, 3, padding=1), x),
        "DiverseBranchBlock depthwise": (DiverseBranchBlock(C, C, 3, groups=C),
                                         nn.Conv2d(C, C, 3, padding=1, groups=C), x),
        "RepMLPBlock (vs 3x3 conv)": (RepMLPBlock(256, 256, 14, 14, 7, 7, fc3_groups=8),
                                      nn.Conv2d(256, 256, 3, padding=1), x_mlp),
    }


def deploy_error(block: nn.Module, x: torch.Tensor) -> float:
    """max |train form - deployed| / max |train form| in eval mode, with random BN statistics, on a small input."""
    block = randomize_batchnorm(block)
    return check_equivalence(block, reparameterize(block), x[:2]).max_rel


def dbb_floor(x: torch.Tensor, warmup: int, rounds: int) -> str:
    """The train form's unavoidable work priced one op at a time: 2 KxK convs, 3 1x1 convs, 6 train-mode BNs, one
    3x3 average pool and 3 summing passes, as a multiple of the plain KxK conv (pads and tiny ops left out)."""
    conv3, conv1 = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 1, bias=False)
    bn, avg, acc = nn.BatchNorm2d(C).train(), AvgPoolConv(3, 1, 1), torch.zeros_like(x)
    with torch.no_grad():
        t = time_alternately({"conv3": partial(conv3, x), "conv1": partial(conv1, x), "bn": partial(bn, x),
                              "avg": partial(avg, x), "sum": partial(acc.add_, x)}, warmup=warmup, repeats=rounds)
    r = {name: timing.median / t["conv3"].median for name, timing in t.items()}
    floor = 2 + 3 * r["conv1"] + 6 * r["bn"] + r["avg"] + 3 * r["sum"]
    return (f"DiverseBranchBlock train-form floor: 2 KxK convs + 3 x 1x1 conv ({r['conv1']:.2f}x) + 6 x train-mode "
            f"BN ({r['bn']:.2f}x) + avg pool ({r['avg']:.2f}x) + 3 x summing pass ({r['sum']:.2f}x) = {floor:.2f}x "
            f"the plain conv")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 8, 3 rounds, 1 warm-up call (smoke runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, rounds, warmup = (8, 3, 1) if args.quick else (32, args.rounds, 3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch}, {rounds} rounds, load "
          f"average {os.getloadavg()[0]:.1f}; medians of interleaved rounds, spread = IQR / median\n")
    lines = ["| block | train ms | deployed ms | plain ms | train/plain | deployed/plain | spread t/d/p | "
             "targets | deploy rel. err |", "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    missed = []
    for name, (block, plain, x) in blocks(batch).items():
        deployed = reparameterize(block)
        block.train()
        plain.eval()
        with torch.no_grad():
            forms = {"train": block, "deployed": deployed, "plain": plain}
            t = time_alternately({form: partial(module, x) for form, module in forms.items()}, warmup=warmup,
                                 repeats=rounds)
        ratios = {form: t[form].median / t["plain"].median for form in ("train", "deployed")}
        limits = dict(zip(("train", "deployed"), TARGETS[name], strict=True))
        target_text = []
        for form, limit in limits.items():
            if limit is not None:
                met = ratios[form] <= limit
                target_text.append(f"{form} <= {limit}x: {'yes' if met else 'NO'}")
                if not met:
                    missed.append(f"{name} {form}: {ratios[form]:.2f}x, target <= {limit}x")
        error = deploy_error(block, x)
        spread = "/".join(f"{t[form].spread:.0%}" for form in ("train", "deployed", "plain"))
        lines.append(f"| {name} | {t['train'].median * 1e3:.1f} | {t['deployed'].median * 1e3:.1f} | "
                     f"{t['plain'].median * 1e3:.1f} | {ratios['train']:.2f}x | {ratios['deployed']:.2f}x | {spread} | "
                     f"{'; '.join(target_text)} | {error:.1e} |")
        print(lines[-1] if len(lines) > 3 else "\n".join(lines), flush=True)
    print("\n" + dbb_floor(torch.randn(batch, C, SIZE, SIZE), warmup, rounds))
    print("\ntargets missed: " + ("; ".join(missed) if missed else "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
