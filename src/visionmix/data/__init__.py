"""Image classification data: built-in datasets loaded into memory, sources streamed from disk (ImageFolder trees,
WebDataset shards), the loaders that batch them, batched augmentation and the evaluation transform.

Modules, in the order imports run (each imports only modules above it): :mod:`.seeds`, :mod:`.decode` (image
files), :mod:`.shards` (the ``info.json`` format); :mod:`.memory` (an in-memory split), :mod:`.transforms`;
:mod:`.sources` (one module per source, one ``Source`` protocol); :mod:`.stats` (channel statistics);
:mod:`.builtin` (Fashion-MNIST, CIFAR, digits); :mod:`.loader` (in-memory batches), :mod:`.streaming` (streamed
batches), :mod:`.evaluation` (the evaluation transform), :mod:`.recipe` (the DeiT recipe), :mod:`.pack`
(``visionmix data pack``).
"""

from visionmix.data.builtin import (
    DATASETS,
    FASHION_MNIST_DIR,
    build_dataset,
    load_cifar,
    load_digits,
    load_fashion_mnist,
    read_cifar_batch,
    read_idx,
)
from visionmix.data.loader import BatchLoader
from visionmix.data.memory import ImageDataset
from visionmix.data.seeds import stable_seed
from visionmix.data.transforms import AUGMENTATIONS, CropFlip, normalize

__all__ = [
    "AUGMENTATIONS", "DATASETS", "FASHION_MNIST_DIR", "BatchLoader", "CropFlip", "ImageDataset",
    "build_dataset", "load_cifar", "load_digits", "load_fashion_mnist", "normalize",
    "read_cifar_batch", "read_idx", "stable_seed",
]
