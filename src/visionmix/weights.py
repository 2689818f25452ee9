"""Official weights made visionmix's own, for a machine without internet (issue 28: download elsewhere, copy,
convert): :func:`download_weights` fetches released weights by name into the cache (and a directory), and
:func:`convert_weights` reads a publisher's checkpoint as :mod:`visionmix.models.loading` does (a
``.pth`` wrapped under ``model``/``state_dict``, a ``module.`` prefix, the official key layout through the model's
``checkpoint_filter_fn``; a pickle that would run code is refused), builds the registered model with the file's
class count and input channels, loads it strictly, and writes the model's state dict as ``.safetensors`` with
where it came from in the file's metadata, loadable by ``create_model(name, num_classes=N,
checkpoint_path=...)``.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from visionmix.errors import InvalidValue

WEIGHTS_FORMAT = "visionmix-weights/1"  # the metadata "format" of a converted file


def convert_weights(path: str | Path, model_name: str, *, to_dir: str | Path | None = None,
                    force: bool = False) -> Path:
    """Convert the checkpoint at ``path`` for the registered model ``model_name`` into ``<to_dir>/<stem>.safetensors``
    (``to_dir`` defaults to the file's directory) and return its path. An existing output is an error unless
    ``force``; a file that does not fit the model is an error naming the file and the keys."""
    from safetensors.torch import save_file

    from visionmix.engine.run_files import state_dict_tensors
    from visionmix.files import staged
    from visionmix.models import create_model, load_checkpoint, model_entry
    from visionmix.models.loading import read_state_dict

    model_entry(model_name)  # an unknown name fails before the file is read
    path = Path(path)
    out = Path(to_dir if to_dir is not None else path.parent) / f"{path.stem}.safetensors"
    if out.resolve() == path.resolve():
        raise InvalidValue(f"{path} would be converted onto itself; choose another directory with --to DIR")
    shape = _head_and_stem(create_model(model_name), read_state_dict(path))
    model = create_model(model_name, **shape)
    load_checkpoint(model, path)
    metadata = {"format": WEIGHTS_FORMAT, "model": model_name, "num_classes": str(model.num_classes),
                "in_chans": str(shape.get("in_chans", model.pretrained_cfg["input_size"][0])),
                "source": path.name, "source_sha256": _sha256(path)}
    with staged(out, force) as tmp:
        save_file(state_dict_tensors(model), str(tmp), metadata=metadata)
    return out


def _head_and_stem(model: object, state: dict) -> dict[str, int]:
    """The ``num_classes`` and ``in_chans`` the checkpoint ``state`` was trained with, read off its classifier and
    first conv (after the model's ``checkpoint_filter_fn``), where it has them."""
    filter_fn = getattr(type(model), "checkpoint_filter_fn", None)
    state = filter_fn(dict(state), model) if filter_fn is not None else state
    cfg = model.pretrained_cfg
    shape = {}
    head = state.get(f"{cfg['classifier']}.weight")
    if head is not None and head.dim() >= 1:
        shape["num_classes"] = int(head.shape[0])
    stem = state.get(f"{cfg['first_conv']}.weight") if cfg.get("first_conv") else None
    if stem is not None and stem.dim() >= 2:
        shape["in_chans"] = int(stem.shape[1])
    return shape


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_weights(name: str, *, to_dir: str | Path | None = None, force: bool = False) -> Path:
    """Fetch the released weights ``name`` (``<model>[.<tag>]``) into the cache and return the cached
    ``.safetensors``; with ``to_dir`` also copy it to ``<to_dir>/<model>.<tag>.safetensors`` (an existing file
    there is an error unless ``force``) and return that copy."""
    from visionmix.files import check_new, staged
    from visionmix.models import model_entry
    from visionmix.models.pretrained import fetch, resolve

    model_entry(name)
    weights = resolve(name)
    dest = Path(to_dir) / f"{weights.name}.safetensors" if to_dir is not None else None
    check_new(dest, force)  # before a download of up to gigabytes
    cached = fetch(weights)
    if dest is None:
        return cached
    with staged(dest, force) as tmp:
        shutil.copyfile(cached, tmp)  # streamed (Mixer-L/16's 21k weights are 1.2 GB)
    return dest
