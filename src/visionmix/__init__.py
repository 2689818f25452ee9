"""visionmix: mixing layers, re-parameterisable blocks and fair comparisons of vision architectures.

The public names are imported lazily so that ``import visionmix`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "create_model": "visionmix.models",
    "list_models": "visionmix.models",
    "is_model": "visionmix.models",
    "model_entry": "visionmix.models",
    "load_checkpoint": "visionmix.models",
    "reparameterize": "visionmix.reparam",
    "check_equivalence": "visionmix.reparam",
    "convert_convs": "visionmix.reparam",
    "deploy": "visionmix.deployment",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'visionmix' has no attribute {name!r}")
