"""Released weights by name (issue 28): ``create_model(name, pretrained=True)`` and ``name.tag``.

The table of released weights is data, ``released_weights.json`` beside this module (see
:class:`ReleasedWeights`; every fact read off its publisher's page, named in ``facts_from``). A bare model name
picks its default tag. :func:`fetch` downloads a file once: a Hugging Face Hub file with
``huggingface_hub.hf_hub_download`` into its own cache (``$HF_ENDPOINT`` honoured), a URL's file into
``$VISIONMIX_HOME/weights/<model>.<tag>/`` (default ``~/.cache/visionmix``) with
:func:`visionmix.download.download_url` (resumed, locked); both sha256-verified where the publisher states one.
``HF_HUB_OFFLINE=1`` or ``VISIONMIX_OFFLINE=1``: the caches only. A ``.pth`` is converted once to ``.safetensors``
in ``$VISIONMIX_HOME`` (read with ``torch.load(weights_only=True)``). A file that is not what the table says leaves
the caches before the error propagates.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

from torch import nn

from visionmix.errors import DownloadError, InvalidValue

TABLE_FILE = "released_weights.json"
LABEL_FILES = {"imagenet-1k": "imagenet1k_classes.txt"}  # label set -> class names, one a line, in visionmix.data
DEFAULT_HOME = "~/.cache/visionmix"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class ReleasedWeights:
    """One downloadable checkpoint: ``name`` is ``<model>.<tag>``; exactly one of ``hf_hub_id`` (with
    ``hf_filename``/``hf_revision``) and ``url`` says where it is; the rest describes the file (its ``file_format``
    and the key ``wrapped_under`` that holds the state dict), what it was trained for (``num_classes``,
    ``label_set``) and evaluated with (``input_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``), its
    reported ``top1``, ``license`` and ``sha256`` (when the publisher states one)."""

    name: str
    default: bool
    hf_hub_id: str | None
    hf_filename: str | None
    hf_revision: str | None
    url: str | None
    file_format: str
    wrapped_under: str | None
    num_classes: int
    label_set: str
    input_size: tuple[int, ...]
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    top1: float | None
    license: str
    sha256: str | None
    facts_from: tuple[str, ...]
    checked_against_download: bool

    @property
    def model(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def tag(self) -> str:
        return self.name.split(".", 1)[1]

    def source(self) -> str:
        """The URL the file is read from (Hub files: through ``$HF_ENDPOINT``)."""
        if self.url is not None:
            return self.url
        endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_HF_ENDPOINT).rstrip("/")
        return f"{endpoint}/{self.hf_hub_id}/resolve/{self.hf_revision or 'main'}/{self.hf_filename}"

    def pretrained_cfg(self) -> dict[str, object]:
        """The weights' own evaluation settings and label set, for ``model.pretrained_cfg``."""
        return {"tag": self.tag, "num_classes": self.num_classes, "label_set": self.label_set,
                "input_size": self.input_size, "crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "mean": self.mean, "std": self.std, "license": self.license, "hf_hub_id": self.hf_hub_id,
                "url": self.url}


@functools.lru_cache(maxsize=1)
def released_weights() -> dict[str, ReleasedWeights]:
    """The table, by ``<model>.<tag>`` (read once)."""
    table = json.loads(resources.files("visionmix.models").joinpath(TABLE_FILE).read_text())
    tuples = {f.name for f in fields(ReleasedWeights) if "tuple" in str(f.type)}
    return {entry["name"]: ReleasedWeights(**{k: tuple(v) if k in tuples else v for k, v in entry.items()})
            for entry in table["weights"]}


def resolve(model_name: str) -> ReleasedWeights:
    """The released weights ``model_name`` names: ``<model>.<tag>``, or a bare model's default tag."""
    table = released_weights()
    if "." in model_name:
        if model_name in table:
            return table[model_name]
        model = model_name.split(".", 1)[0]
    else:
        model = model_name
        default = [w for w in table.values() if w.model == model and w.default]
        if default:
            return default[0]
    tags = sorted(w.tag for w in table.values() if w.model == model)
    known = f"its tags: {', '.join(tags)}" if tags else "it has no released weights visionmix can download"
    raise InvalidValue(f"no released weights {model_name!r}: {known} (list them with 'visionmix models "
                       f"--pretrained'); for other weights pass checkpoint_path= to a local file")


def label_names(label_set: str, num_classes: int) -> tuple[str, ...]:
    """The class names of a label set (:data:`LABEL_FILES`, package data of ``visionmix.data``), or the class
    indices as names where visionmix ships none (ImageNet-21k, say)."""
    name = LABEL_FILES.get(label_set)
    path = resources.files("visionmix.data").joinpath(name) if name is not None else None
    if path is None or not path.is_file():
        return tuple(str(i) for i in range(num_classes))
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(names) != num_classes:
        raise InvalidValue(f"{path} names {len(names)} classes, and the {label_set} weights have {num_classes}")
    return names


def cache_home() -> Path:
    """The cache directory: ``$VISIONMIX_HOME``, default ``~/.cache/visionmix``."""
    return Path(os.environ.get("VISIONMIX_HOME") or DEFAULT_HOME).expanduser()


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE",
                                                                                     "VISIONMIX_OFFLINE"))


def fetch(weights: ReleasedWeights) -> Path:
    """The ``.safetensors`` file of ``weights``, downloaded (and a ``.pth`` converted) on first use."""
    if weights.file_format == "safetensors":
        return _download(weights)
    converted = _weights_folder(weights) / f"{Path(_file_name(weights)).stem}.safetensors"
    if converted.is_file():
        return converted
    raw = _download(weights)
    try:
        _convert(raw, converted, weights)
    except ValueError:  # not weights, or a pickle that would run code: out of the cache
        evict(weights)
        raise
    return converted


def evict(weights: ReleasedWeights) -> None:
    """Remove every cached file of ``weights`` (a bad download), so that the next use downloads it again."""
    folder = _weights_folder(weights)
    if folder.is_dir():
        for cached in folder.iterdir():
            if not cached.name.endswith(".lock"):
                cached.unlink()
    if weights.hf_hub_id is not None:
        hub_file = _hub_download(weights, local_only=True, missing_ok=True)
        if hub_file is not None:  # the snapshot's link and the blob it points to
            blob = hub_file.resolve()
            hub_file.unlink()
            blob.unlink(missing_ok=True)


def _weights_folder(weights: ReleasedWeights) -> Path:
    return cache_home() / "weights" / weights.name


def _file_name(weights: ReleasedWeights) -> str:
    return weights.hf_filename or weights.source().rsplit("/", 1)[-1].split("?", 1)[0]


def _download(weights: ReleasedWeights) -> Path:
    """The file of ``weights`` as published, verified against its sha256 where the table states one: a Hub file
    in huggingface_hub's own cache, a URL's file in ``$VISIONMIX_HOME/weights/<model>.<tag>/``."""
    from visionmix.download import OFFLINE_ROUTE, check_not_html, check_sha256, download_url

    if weights.hf_hub_id is None:
        raw = _weights_folder(weights) / _file_name(weights)
        if _offline() and not raw.is_file():
            raise DownloadError(f"{weights.name}: offline and not in the cache ({raw}); {OFFLINE_ROUTE}")
        return download_url(weights.source(), raw, sha256=weights.sha256)
    path = _hub_download(weights, local_only=_offline())
    try:
        if weights.sha256 is not None:
            check_sha256(weights.source(), path, weights.sha256)
        check_not_html(weights.source(), path)
    except DownloadError:
        evict(weights)
        raise
    return path


def _hub_download(weights: ReleasedWeights, *, local_only: bool, missing_ok: bool = False) -> Path | None:
    """``huggingface_hub.hf_hub_download`` of ``weights`` (its cache, ``$HF_ENDPOINT`` read at the call); its
    errors as one :class:`DownloadError` line naming the Hub file (``None`` for a missing file with
    ``missing_ok``)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from visionmix.download import OFFLINE_ROUTE

    source = weights.source()
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retries' lines; the outcome is one line here
    try:
        return Path(hf_hub_download(weights.hf_hub_id, weights.hf_filename, revision=weights.hf_revision,
                                    endpoint=os.environ.get("HF_ENDPOINT") or None, local_files_only=local_only))
    except LocalEntryNotFoundError as err:
        cause = err.__cause__ or err
        if missing_ok:
            return None
        if local_only:
            raise DownloadError(f"{weights.name}: offline and not in the cache (huggingface_hub's, of {source}); "
                                f"{OFFLINE_ROUTE}") from err
        if not isinstance(cause, HfHubHTTPError):
            raise DownloadError(f"cannot reach {source} ({type(cause).__name__}); offline: {OFFLINE_ROUTE}") from err
    except HfHubHTTPError as err:
        cause = err
    except OSError as err:  # a transfer that broke beyond huggingface_hub's own resumes
        raise DownloadError(f"{source}: {str(err).splitlines()[0]}; run again to resume it") from err
    finally:
        hub_logger.setLevel(level)
    raise DownloadError(f"{source}: HTTP {cause.response.status_code} {cause.response.reason_phrase}") from cause


def _convert(raw: Path, converted: Path, weights: ReleasedWeights) -> None:
    """``raw`` (a ``.pth``) as a flat ``.safetensors`` beside it, written atomically."""
    from safetensors.torch import save_file

    from visionmix.files import staged
    from visionmix.models.loading import read_state_dict

    state = read_state_dict(raw, weights.wrapped_under)  # refuses a pickle that would run code
    with staged(converted, force=True) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"source": weights.source(), "name": weights.name})


def load_pretrained(model: nn.Module, weights: ReleasedWeights) -> list[str]:
    """Load ``weights`` (fetched) into ``model``: strictly when its classifier has the weights' class count, else
    every key but the classifier's, which starts fresh (the dropped keys are named once). Returns them. A file
    that does not fit its own model as registered is removed from the cache before the error propagates; one that
    fits it but not ``model`` (built with another ``img_size``, say) stays, and the error says so."""
    from visionmix.models.loading import load_checkpoint, load_for_finetuning, read_state_dict
    from visionmix.runlog import logger

    path = fetch(weights)
    try:
        if getattr(model, "num_classes", weights.num_classes) == weights.num_classes:
            load_checkpoint(model, path)
            return []
        dropped = load_for_finetuning(model, read_state_dict(path), path)
    except ValueError as err:
        if not _fits_its_model(weights, path):  # a file of another model: downloaded again next time
            evict(weights)
            raise
        raise InvalidValue(f"{err}; the file fits {weights.model} as registered, so the arguments this model was "
                           f"built with change its shapes (the file stays in the cache)") from err
    logger("models").warning(f"{weights.name}: {weights.num_classes}-class classifier not loaded into a "
                             f"{model.num_classes}-class model (fresh: {', '.join(dropped)})")
    return dropped


def _fits_its_model(weights: ReleasedWeights, path: Path) -> bool:
    """Whether the file at ``path`` loads strictly into the model ``weights`` are for, as registered with the weights'
    class count (built on the meta device: shapes only)."""
    import torch

    from visionmix.models import create_model
    from visionmix.models.loading import read_state_dict, state_dict_problems

    try:
        state = read_state_dict(path)
    except ValueError:
        return False
    with torch.device("meta"):
        reference = create_model(weights.model, num_classes=weights.num_classes)
    filter_fn = getattr(type(reference), "checkpoint_filter_fn", None)
    return not state_dict_problems(reference.state_dict(), filter_fn(state, reference) if filter_fn else state)
