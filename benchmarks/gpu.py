"""Training images/s on an accelerator (issue 15): uniformer_small, spach_ms_s_patch4_224_conv and mixer_b16_224 at
224 px with the deit recipe's batch stage (flip, RandAugment, erasing, mixup/cutmix on the GPU) and soft-target
loss, bf16 autocast, channels_last; fed from synthetic uint8 batches already on the device, and streamed from a JPEG
ImageFolder (``visionmix data pack --from fashion-mnist``, RandomResizedCrop in --workers processes).

    .venv/bin/python benchmarks/gpu.py [--quick] [--batch-size 128] [--workers 8]

Without CUDA only ``--quick`` runs (on the CPU in fp32: a nano model at 64 px, to check that the script works).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch

from visionmix.data.pack import pack_fashion_mnist
from visionmix.data.recipe import DeitAugment, DeitBatchTransform, RandomResizedCropTransform, SoftTargetCrossEntropy
from visionmix.data.sources import ImageFolderSource
from visionmix.data.streaming import StreamingLoader
from visionmix.engine.optim import param_groups
from visionmix.models import create_model

MODELS = ("uniformer_small", "spach_ms_s_patch4_224_conv", "mixer_b16_224")


def train_speed(name: str, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], *, size: int, steps: int,
                device: torch.device) -> float:
    """Median images/s of a deit-recipe training step of ``name`` over ``steps`` steps (after 3 warm-up steps)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1, img_size=size).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=5e-4)
    augment = DeitBatchTransform(10, (0.286,), (0.353,), DeitAugment())
    criterion = SoftTargetCrossEntropy()
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    times = []
    for step in range(steps + 3):
        start = time.perf_counter()
        images, labels = next(batches)
        images = images.to(device, non_blocking=True)
        x, target = augment(images, labels.to(device, non_blocking=True), step)
        with autocast:
            loss = criterion(model(x.contiguous(memory_format=torch.channels_last)).float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - start)
    return len(labels) / statistics.median(times)


def synthetic(batch: int, size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    images = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    while True:
        yield images, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="resnet_nano at 64 px, 3 steps (a smoke test)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    models, size, steps, batch = MODELS, 224, args.steps, args.batch_size
    if args.quick:
        models, size, steps, batch, args.workers = ("resnet_nano",), 64, 3, 8, 2
    elif device.type != "cuda":
        print("benchmarks/gpu.py: no CUDA device here; the table needs one (--quick checks the script on the CPU)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        pack_fashion_mnist(Path(tmp), image_size=size, image_format="jpeg", max_samples=batch * (steps + 4))
        source = ImageFolderSource(tmp, "train")
        loader = StreamingLoader(source, batch, train=True, transform=RandomResizedCropTransform(size),
                                 workers=args.workers, device=device)
        print(f"training img/s on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, batch {batch}, "
              f"{size} px, deit recipe, {'bf16' if device.type == 'cuda' else 'fp32'}, channels_last:")
        print(f"  {'model':<28} {'synthetic':>10} {'streamed':>10}")
        for name in models:
            fed = train_speed(name, synthetic(batch, size, device), size=size, steps=steps, device=device)
            streamed = train_speed(name, iter(loader.epoch(0)), size=size, steps=steps, device=device)
            print(f"  {name:<28} {fed:10.1f} {streamed:10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
