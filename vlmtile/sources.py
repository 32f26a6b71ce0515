"""Finding inputs: image files and folders, walked recursively into a sorted, de-duplicated list.

The order is a pure function of the file names (sorted by source path), so shard contents do not depend
on the order of arguments, on the file system's listing order or on the number of workers.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from .decode import IMAGE_SUFFIXES, looks_like_image
from .errors import VlmtileError

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True, order=True)
class InputItem:
    """One input image: where it is (`source`) and the record key it will be stored under."""

    source: str
    key: str


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk(root: str) -> Iterable[tuple[str, str]]:
    """(path, path relative to root) of every non-hidden file under root, recursively."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if not _is_hidden(name):
                path = os.path.join(dirpath, name)
                yield path, os.path.relpath(path, root)


def _wanted(path: str) -> bool:
    """Image suffix -> yes (and fail loudly later if it is not one); otherwise sniff the content."""
    if os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES:
        return True
    return looks_like_image(path)


def make_key(relpath: str) -> str:
    """A WebDataset-safe key from a relative path: no dots, no slashes, nothing a shell would mangle.

    The suffix is kept in the key ("a/b.jpg" -> "a_b_jpg") so "b.jpg" and "b.png" do not collide.
    """
    key = _KEY_UNSAFE.sub("_", relpath.replace(os.sep, "/")).strip("_")
    return key or "image"


def list_inputs(paths: Iterable[str | os.PathLike[str]]) -> list[InputItem]:
    """Every image under `paths` (files are taken as given, folders walked), sorted by source path.

    Keys that collide after sanitizing get a short hash of their source appended, so that every record
    key is unique and stays the same from run to run.
    """
    found: dict[str, tuple[str, str]] = {}  # realpath -> (source, relpath)
    for raw in paths:
        path = os.fspath(raw)
        if os.path.isdir(path):
            for source, rel in _walk(path):
                if _wanted(source):
                    found.setdefault(os.path.realpath(source), (source, rel))
        elif os.path.exists(path):
            found.setdefault(os.path.realpath(path), (path, os.path.basename(path)))
        else:
            raise VlmtileError(f"input not found: {path}")
    entries = sorted(found.values())
    keys = [make_key(rel) for _, rel in entries]
    counts = Counter(keys)
    items = []
    for (source, _), key in zip(entries, keys, strict=True):
        if counts[key] > 1:
            key = f"{key}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"
        items.append(InputItem(source=source, key=key))
    return items
