"""In-memory image datasets, batched loading and batched augmentation (SPEC.md section 4)."""

from visionmix.data.datasets import (
    DATASETS,
    FASHION_MNIST_DIR,
    ImageDataset,
    build_dataset,
    load_cifar,
    load_digits,
    load_fashion_mnist,
    read_cifar_batch,
    read_idx,
)
from visionmix.data.loader import BatchLoader, stable_seed
from visionmix.data.transforms import AUGMENTATIONS, CropFlip, normalize

__all__ = [
    "AUGMENTATIONS", "DATASETS", "FASHION_MNIST_DIR", "BatchLoader", "CropFlip", "ImageDataset",
    "build_dataset", "load_cifar", "load_digits", "load_fashion_mnist", "normalize",
    "read_cifar_batch", "read_idx", "stable_seed",
]
