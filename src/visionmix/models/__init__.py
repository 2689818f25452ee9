"""Model zoo: importing this package registers every family (SPEC.md section 2)."""

from visionmix.models._registry import (
    Reference,
    create_model,
    default_cfg,
    is_model,
    list_models,
    model_entry,
    register_model,
)

__all__ = ["Reference", "create_model", "default_cfg", "is_model", "list_models", "model_entry", "register_model"]
