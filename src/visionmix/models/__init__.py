"""Model zoo: importing this package registers every family (SPEC.md section 2)."""

from visionmix.models import (  # noqa: F401  (registers the families)
    mlp_mixer,
    resnet,
    s2mlp,
    spach,
    uniformer,
    uniformer_light,
    uniformer_video,
)
from visionmix.models._registry import (
    Reference,
    create_model,
    default_cfg,
    expand_model_names,
    is_model,
    list_models,
    model_entry,
    register_model,
    unregister_model,
)
from visionmix.models.loading import load_checkpoint

__all__ = ["Reference", "create_model", "default_cfg", "expand_model_names", "is_model", "list_models",
           "load_checkpoint", "model_entry", "register_model", "unregister_model"]
