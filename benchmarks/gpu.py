"""Training images/s on an accelerator, timed through the real trainer (``visionmix.engine.train``: the deit
recipe's batch stage with flip, RandAugment, erasing and mixup/cutmix on the device, soft-target loss, gradient
clipping, the weights' EMA, the step statistics and the checkpoints), bf16 autocast and channels_last on CUDA, for
uniformer_small, spach_ms_s_patch4_224_conv and mixer_b16_224 at 224 px. Data: in memory (Fashion-MNIST when it is
installed, else the embedded digits, upsampled: the pixels do not change the speed) and, with Fashion-MNIST
installed, streamed from a JPEG ImageFolder (``visionmix data pack --from fashion-mnist``); both crop
(RandomResizedCrop) in --workers processes. Images/s is the run's own: optimizer steps x batch / training time,
after an untimed 2-step run of the same model, so that CUDA's lazy loading and cuDNN's autotuning are not charged
to whichever column runs first (on an H200, without the warm-up and with the in-memory column cropping in the main
process, uniformer_small's in-memory run was 11x slower than its streamed one).

    .venv/bin/python benchmarks/gpu.py [--quick] [--batch-size 128] [--workers 8] [--steps 20]

Without CUDA only ``--quick`` runs (on the CPU in fp32: a nano model at 32 px, to check that the script works).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from visionmix.data.builtin import FASHION_MNIST_DIR
from visionmix.data.pack import pack_fashion_mnist
from visionmix.engine import TrainConfig, train

MODELS = ("uniformer_small", "spach_ms_s_patch4_224_conv", "mixer_b16_224")


def fashion_mnist_installed() -> bool:
    return (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file()


def train_speed(name: str, data: str, *, size: int, batch: int, steps: int, device: torch.device, out_dir: Path,
                data_dir: str | None = None, workers: int) -> float:
    """Training images/s of ``steps`` optimizer steps of ``name`` through the trainer, deit recipe."""
    cuda = device.type == "cuda"
    subset = {} if data == "imagefolder" else {"max_train_samples": batch * steps, "max_eval_samples": batch}
    cfg = TrainConfig.for_recipe(
        "deit", model=name, data=data, data_dir=data_dir, image_size=size, batch_size=batch, epochs=1,
        warmup_epochs=0, clip_grad=5.0, ema_decay=0.9998, amp="bf16" if cuda else "off", channels_last=True,
        device=device.type, workers=workers, recompute_bn="off", **subset)
    summary = train(cfg, out_dir / f"{name}-{data}", progress=False)
    return summary["train_images_per_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="resnet_nano at 32 px, 3 steps (a smoke test)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models, size, steps, batch = MODELS, 224, args.steps, args.batch_size
    if args.quick:
        models, size, steps, batch, args.workers = ("resnet_nano",), 32, 3, 8, 1
    elif device.type != "cuda":
        print("benchmarks/gpu.py: no CUDA device here; the table needs one (--quick checks the script on the CPU)")
        return 0
    in_memory = "fashion-mnist" if fashion_mnist_installed() else "digits"
    with tempfile.TemporaryDirectory() as tmp:
        folder = None
        if fashion_mnist_installed():
            folder = Path(tmp) / "images"
            pack_fashion_mnist(folder, image_size=size, image_format="jpeg", max_samples=batch * steps)
        where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        print(f"training img/s on {where}, batch {batch}, {size} px, deit recipe through the trainer, "
              f"{'bf16' if device.type == 'cuda' else 'fp32'}, channels_last:")
        print(f"  {'model':<28} {f'in memory ({in_memory})':>24} {'streamed':>10}")
        for name in models:
            train_speed(name, in_memory, size=size, batch=batch, steps=2, device=device, out_dir=Path(tmp) / "warm-up",
                        workers=args.workers)
            fed = train_speed(name, in_memory, size=size, batch=batch, steps=steps, device=device,
                              out_dir=Path(tmp), workers=args.workers)
            streamed = "n/a (needs Fashion-MNIST)"
            if folder is not None:
                speed = train_speed(name, "imagefolder", size=size, batch=batch, steps=steps, device=device,
                                    out_dir=Path(tmp), data_dir=str(folder), workers=args.workers)
                streamed = f"{speed:.1f}"
            print(f"  {name:<28} {fed:24.1f} {streamed:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
