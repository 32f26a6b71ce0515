"""Finding inputs: image files and folders, walked recursively into a sorted, de-duplicated list.

The order is a pure function of the file names (sorted by source path), so shard contents do not depend
on the order of arguments, on the file system's listing order or on the number of workers.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .decode import IMAGE_SUFFIXES, looks_like_image
from .errors import VlmtileError

_KEY_UNSAFE = re.compile(r"[^\w-]+")


@dataclass(frozen=True, order=True)
class InputItem:
    """One input image: where it is (`source`) and the record key it will be stored under."""

    source: str
    key: str


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk(root: str) -> Iterator[tuple[str, str, str]]:
    """(path, path relative to root, real path) of every non-hidden file under root, recursively.

    Directory symlinks are followed (once: a link back up the tree is not a loop), and the real path is
    resolved once per directory rather than once per file, which keeps listing a million files cheap.
    Anything that is not a directory is yielded, so a broken link or a FIFO becomes an error record later
    instead of disappearing. So is a directory named like an image (`x.jpg/`): where an image file was
    expected there is none, which is worth an error record; it is walked as well, so that images inside
    it are not lost.
    """
    pending = [(root, "", os.path.realpath(root))]
    visited: set[str] = set()
    while pending:
        directory, rel_dir, real_dir = pending.pop()
        if real_dir in visited:
            continue
        visited.add(real_dir)
        try:
            entries = list(os.scandir(directory))
        except OSError as e:
            raise VlmtileError(f"cannot list {display_path(directory)}: {e.strerror or e}") from None
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            rel = rel_dir + entry.name
            is_link = entry.is_symlink()
            real = os.path.realpath(entry.path) if is_link else os.path.join(real_dir, entry.name)
            if entry.is_dir():
                pending.append((entry.path, rel + os.sep, real))
                if os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                    yield entry.path, rel, real
            else:
                yield entry.path, rel, real


def _taken(path: str, containers: list[str] | None) -> bool:
    """A tar / Parquet file found while walking goes to `containers` (when collecting them)."""
    if containers is not None and is_container(path):
        containers.append(path)
        return True
    return False


def _wanted(path: str) -> bool:
    """Image suffix -> yes (and fail loudly later if it is not one); otherwise sniff the content."""
    if os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES:
        return True
    return looks_like_image(path)


def make_key(relpath: str) -> str:
    """A WebDataset-safe key from a relative path: letters, digits, '_' and '-' only (no dots, no slashes).

    The suffix is kept in the key ("a/b.jpg" -> "a_b_jpg") so "b.jpg" and "b.png" do not collide. Letters
    include non-ASCII ones ("猫.jpg" -> "猫_jpg"); undecodable bytes in a file name become "_".
    """
    key = _KEY_UNSAFE.sub("_", display_path(relpath).replace("\\", "_")).strip("_")
    return key or "image"


def display_path(path: str) -> str:
    """A path as valid UTF-8 text for metadata and error records.

    File names that are not valid UTF-8 reach Python with surrogate escapes, which neither JSON nor
    Parquet strings can hold; such bytes are shown as `\\xNN` escapes. The real path is kept for reading.
    """
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _unique_keys(entries: list[tuple[str, str]]) -> list[str]:
    """Keys for (source, relpath) entries, disambiguating collisions with a hash of the source path.

    The hash grows until no key collides, including with another file's natural key.
    """
    keys = [make_key(rel) for _, rel in entries]
    for digits in (8, 16, 40):
        counts = Counter(keys)
        colliding = [i for i, key in enumerate(keys) if counts[key] > 1]
        if not colliding:
            return keys
        for i in colliding:
            digest = hashlib.sha1(entries[i][0].encode("utf-8", "surrogateescape")).hexdigest()
            keys[i] = f"{make_key(entries[i][1])}-{digest[:digits]}"
    raise VlmtileError("could not make unique record keys (the same source listed twice?)")


def is_container(path: str) -> bool:
    """Tar shards and Parquet files: inputs holding many samples, read as streams rather than images."""
    return path.lower().endswith((".tar", ".tar.gz", ".tgz", ".parquet"))


def list_inputs(
    paths: Iterable[str | os.PathLike[str]], *, containers: list[str] | None = None
) -> list[InputItem]:
    """Every image under `paths` (files are taken as given, folders walked), sorted by source path.

    Keys that collide after sanitizing get a short hash of their source appended, so that every record
    key is unique and stays the same from run to run. With `containers`, tar shards and Parquet files met
    on the way (given or inside folders) are appended to it instead of being taken as images.
    """
    found: dict[str, tuple[str, str]] = {}  # realpath -> smallest (source, relpath) reaching it
    for raw in paths:
        path = os.fspath(raw)
        if containers is not None and is_container(path) and os.path.isfile(path):
            containers.append(path)
            continue
        if os.path.isdir(path):
            candidates: Iterable[tuple[str, str, str]] = (
                entry for entry in _walk(path) if not _taken(entry[0], containers) and _wanted(entry[0])
            )
        elif os.path.lexists(path):
            candidates = [(path, os.path.basename(path), os.path.realpath(path))]
        else:
            raise VlmtileError(f"input not found: {display_path(path)}")
        for source, rel, real in candidates:
            # The same file reached twice (argument and folder, symlink): keep one, independent of order.
            entry = (source, rel)
            found[real] = min(found.get(real, entry), entry)
    entries = sorted(found.values())
    keys = _unique_keys(entries)
    return [InputItem(source=source, key=key) for (source, _), key in zip(entries, keys, strict=True)]
