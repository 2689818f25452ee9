"""The ``info.json`` that ``visionmix data pack`` writes beside its output, which the sources read and which says
which files pack wrote (and so may replace).

Format (strict JSON)::

    {"format": "visionmix-shards", "version": 1, "layout": "shards",     # or "imagefolder"
     "classes": ["0_T-shirt_top", ...],        # label i is classes[i]
     "class_names": ["T-shirt/top", ...],      # optional display names (default: classes)
     "channels": 1, "image_size": [28, 28],    # image_size null when the images differ in size
     "mean": [0.286], "std": [0.353],          # optional training statistics of images in [0, 1]
     "splits": {"train": {"pattern": "train-{000000..000059}.tar", "count": 60000,
                          "shards": [{"name": "train-000000.tar", "count": 1000}, ...]}, "val": {...}}}

A split that pack is still writing (or was writing when it was killed) is ``{"incomplete": true}``: every file
named like its shards is pack's, and readers refuse it until a pack finishes it. An ``imagefolder`` layout's splits
are ``{"count": N}`` and its files ``<split>/<class>/<NNNNN>.<ext>``. Files written before ``layout`` existed are
shards (or, with ``counts`` instead of ``splits``, an ImageFolder tree).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from visionmix.errors import DataError
from visionmix.files import temporary_target

INFO_NAME = "info.json"
INFO_FORMAT = "visionmix-shards"
LAYOUTS = ("shards", "imagefolder")
SHARD_RE = re.compile(r"(?P<split>train|val)-\d{6}\.tar")
IMAGE_FILE_RE = re.compile(r"\d{5}\.(?:png|jpg)")


def read_info(directory: str | Path) -> dict[str, Any] | None:
    """``directory/info.json`` if pack wrote it (``format`` is ours), else ``None``; a damaged one is a DataError."""
    path = Path(directory) / INFO_NAME
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc}); re-run 'visionmix data pack'") from exc
    return info if isinstance(info, dict) and info.get("format") == INFO_FORMAT else None


def layout(info: dict[str, Any]) -> str:
    """The layout pack wrote (older files: shards, or an ImageFolder tree when they list ``counts``)."""
    return info.get("layout") or ("imagefolder" if "counts" in info else "shards")


def is_incomplete(info: dict[str, Any] | None, split: str | None = None) -> bool:
    """Whether pack is still writing (or was killed writing) ``split``, or any split when ``split`` is None."""
    splits = (info or {}).get("splits", {})
    entries = splits.values() if split is None else [splits.get(split) or {}]
    return any(entry.get("incomplete") for entry in entries)


def stats(info: dict[str, Any] | None, channels: int) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """The training mean/std ``info`` records for ``channels`` channels, or ``(None, None)``."""
    mean, std = (info or {}).get("mean"), (info or {}).get("std")
    if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == channels:
        return tuple(map(float, mean)), tuple(map(float, std))
    return None, None


def class_names(info: dict[str, Any] | None, classes: tuple[str, ...]) -> tuple[str, ...]:
    """The display names ``info`` gives ``classes`` (folder names), or the folder names."""
    names = (info or {}).get("class_names")
    if info and info.get("classes") == list(classes) and isinstance(names, list) and len(names) == len(classes):
        return tuple(map(str, names))
    return classes


def owned_files(directory: Path, info: dict[str, Any] | None) -> set[Path]:
    """The files under ``directory`` that pack wrote, by what its ``info`` says (none without one): info.json, the
    shards it lists (every shard-named file of an incomplete split), the images of an ImageFolder layout, and the
    temporary files a killed write of any of them left."""
    if info is None:
        return set()
    kept: set[Path] = set()
    if layout(info) == "shards":
        splits = info.get("splits", {})
        listed = {s["name"] for entry in splits.values() for s in entry.get("shards", [])}
        writing = {split for split, entry in splits.items() if entry.get("incomplete")}
        for path in directory.iterdir():
            name = temporary_target(path.name) or path.name
            match = SHARD_RE.fullmatch(name)
            if path.is_file() and (name in listed or (match and match["split"] in writing)):
                kept.add(path)
    else:
        for cls in info.get("classes", []):
            for split in ("train", "val"):
                folder = directory / split / str(cls)
                if folder.is_dir():
                    kept.update(p for p in folder.iterdir() if p.is_file()
                                and IMAGE_FILE_RE.fullmatch(temporary_target(p.name) or p.name))
    kept.update(p for p in directory.iterdir() if p.is_file() and (temporary_target(p.name) or p.name) == INFO_NAME)
    return kept
