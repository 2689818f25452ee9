"""The streamed input pipeline against the models it feeds (issue 15): is the loader what limits training here?

1. Decoded + augmented images/s at --size (default 224) from a JPEG ImageFolder that ``visionmix data pack --from
   fashion-mnist`` writes: per worker (decode + RandomResizedCrop, in-process, 1 thread), the batch stage of the
   deit recipe (flip, RandAugment, random erasing, mixup/cutmix on the training device), and the whole loader with
   --workers processes; next to one training step's images/s of each --models at the same size. Also the deit
   batch stage on random RGB images with 1 thread, and RandomResizedCrop of a 2 x --size image (1 thread, as in a
   DataLoader worker).
2. Peak memory of a streamed epoch over --small vs --large images (shards written by ``visionmix data pack``): the
   main process's and the largest worker's peak RSS must not grow with the dataset.

    flock /tmp/visionmix-bench.lock .venv/bin/python benchmarks/data.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import torch
from torch import nn

from visionmix.data.pack import pack_fashion_mnist
from visionmix.data.recipe import DeitAugment, DeitBatchTransform, RandomResizedCropTransform
from visionmix.data.sources import ImageFolderSource
from visionmix.data.streaming import StreamingLoader
from visionmix.engine.optim import param_groups
from visionmix.models import create_model

EPOCH_SCRIPT = """
import json
import resource
import sys
from visionmix.data.sources import WebDatasetSource
from visionmix.data.streaming import StreamingLoader
from visionmix.data.transforms import resize_to
source = WebDatasetSource(sys.argv[1], "train")
loader = StreamingLoader(source, 64, train=True, transform=resize_to(28), workers=2)
seen = sum(len(labels) for _, labels in loader.epoch(0))
del loader
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
main = int(status["VmHWM"].split()[0])  # ru_maxrss would carry over the launching process's peak (kept by exec)
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"images": seen, "main_mb": main / 1024, "worker_mb": workers / 1024}))
"""


def rate(fn, images: int, rounds: int) -> float:
    """Median images/s of ``fn()`` (which handles ``images`` images) over ``rounds`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return images / statistics.median(times)


def pipeline_rates(root: Path, size: int, batch: int, workers: int, rounds: int) -> dict[str, float]:
    source = ImageFolderSource(root, "train")
    crop = RandomResizedCropTransform(size)
    torch.set_num_threads(1)
    inline = StreamingLoader(source, batch, train=True, transform=crop, workers=0)
    batches = iter(inline.epoch(0))
    per_worker = rate(lambda: next(batches), batch, rounds)
    torch.set_num_threads(2)
    images, labels = next(batches)
    augment = DeitBatchTransform(10, source.mean or (0.5,), source.std or (0.5,), DeitAugment())
    seeds = iter(range(10**6))
    batch_stage = rate(lambda: augment(images, labels, next(seeds)), batch, rounds)
    loader = StreamingLoader(source, batch, train=True, transform=crop, workers=workers)
    streamed = iter(loader.epoch(0))
    whole = rate(lambda: next(streamed), batch, rounds)
    return {"decode_rrc_per_worker": per_worker, "batch_augment": batch_stage, f"loader_{workers}_workers": whole}


def recipe_rates(size: int, batch: int, rounds: int) -> dict[str, float]:
    """The deit recipe's two stages alone on random RGB images: the batch transform with 1 thread, and
    RandomResizedCrop of a ``2 * size`` image to ``size`` with 1 thread (as in a DataLoader worker)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 1000, (batch,), generator=g)
    augment = DeitBatchTransform(1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), DeitAugment())
    seeds = iter(range(10**6))
    crop = RandomResizedCropTransform(size)
    big = torch.randint(0, 256, (3, 2 * size, 2 * size), dtype=torch.uint8, generator=g)
    torch.set_num_threads(1)
    return {"batch_augment_rgb_1_thread": rate(lambda: augment(images, labels, next(seeds)), batch, rounds),
            f"rrc_{2 * size}_to_{size}_1_thread": rate(lambda: crop(big, g), 1, 2 * rounds)}


def training_rates(names: list[str], size: int, batch: int, rounds: int) -> dict[str, float]:
    torch.set_num_threads(2)
    x, y = torch.randn(batch, 1, size, size), torch.randint(0, 10, (batch,))
    out = {}
    for name in names:
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, in_chans=1, img_size=size).train()
        optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)

        def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        out[name] = rate(step, batch, rounds)
    return out


def epoch_memory(shards: Path) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", EPOCH_SCRIPT, str(shards)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 3 rounds (for `make bench-quick`)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--models", default="resnet_nano,spach_ms_nano_conv,mixer_nano")
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch_size, args.rounds, args.small, args.large = 64, 8, 3, 500, 1000
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("peak RSS of one streamed epoch (20 shards of 28 px PNG, batch 64, 2 workers):")
        for n in (args.small, args.large):
            pack_fashion_mnist(root / f"shards{n}", image_size=28, layout="shards", max_samples=n,
                               shard_size=max(50, n // 20))
            record = epoch_memory(root / f"shards{n}")
            print(f"  {record['images']:>6} images: main {record['main_mb']:6.0f} MB, largest worker "
                  f"{record['worker_mb']:6.0f} MB")
        images = args.batch_size * (2 * args.rounds + 4)
        pack_fashion_mnist(root / "jpeg", image_size=args.size, image_format="jpeg", max_samples=images)
        speeds = pipeline_rates(root / "jpeg", args.size, args.batch_size, args.workers, args.rounds)
        speeds |= recipe_rates(args.size, args.batch_size, args.rounds)
        speeds |= {f"train step {n}": v for n, v in
                   training_rates(args.models.split(","), args.size, args.batch_size, max(3, args.rounds // 2)).items()}
        print(f"images/s at {args.size} px, batch {args.batch_size} (deit recipe; training steps at 2 threads):")
        for name, value in speeds.items():
            print(f"  {name:<34} {value:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
