"""Where the output directory lives: a local (or mounted) directory, or object storage through fsspec.

Every file vlmtile writes goes through the few functions here, which take the output's own path or URL.
Local paths keep the POSIX guarantees the ledger is built on: temporary name, fsync, atomic rename, and
`flock` for the run lock (in `ledger`). Object storage (`s3://`, `gs://`, `az://`, ...; `memory://` for
in-process tests; `local://` reaches a local directory through the same code) has neither rename nor
locks, but it has something as good for one file: an object appears whole when its upload completes, or
not at all. So there:

- a writer builds each file on local disk (a staging directory) and uploads it under its hidden part
  name (`.part-...`), then writes its completion record; nothing ever exists half-written under a name
  that a reader trusts;
- finalizing gives a part its shard name by a server-side copy and a delete (`fs.mv`): a run killed
  between the two leaves the part, and the next run copies it again;
- the run lock is a lease object (see `ledger.run_lock`).

fsspec is imported only when a URL output is used (`pip install "vlmtile[remote]"` plus the scheme's
backend: `s3fs`, `gcsfs`, `adlfs`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import shutil
from functools import cache
from typing import IO, Any

from .errors import VlmtileError
from .streams import is_url


def is_remote(path: str) -> bool:
    """True for an fsspec URL output (callers have already turned `file://` into its path)."""
    return is_url(path) and not path.startswith("pipe:")


@cache
def _fsspec() -> Any:
    try:
        return importlib.import_module("fsspec")
    except ImportError:
        raise VlmtileError(
            "an output URL needs fsspec: pip install 'vlmtile[remote]' (plus s3fs / gcsfs / adlfs for those "
            "schemes)"
        ) from None


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a URL; a missing backend is a `VlmtileError`."""
    try:
        fs, path = _fsspec().core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise VlmtileError(f"{url}: {e}") from None
    return fs, path


def _fresh(url: str) -> tuple[Any, str]:
    """`filesystem`, with what fsspec remembers of `url`'s listing forgotten first.

    Backends such as s3fs answer `exists` and `ls` from a listing cached by an earlier call; the files
    that other processes (the tasks) wrote since would look missing to the driver.
    """
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    return fs, path


def join(base: str, *names: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *names])
    return os.path.join(base, *names)


def exists(path: str) -> bool:
    if is_remote(path):
        fs, inner = _fresh(path)
        return bool(fs.exists(inner))
    return os.path.exists(path)


def isdir(path: str) -> bool:
    if is_remote(path):
        fs, inner = _fresh(path)
        return bool(fs.isdir(inner))
    return os.path.isdir(path)


def makedirs(path: str) -> None:
    if is_remote(path):
        fs, inner = filesystem(path)
        fs.makedirs(inner, exist_ok=True)  # a no-op on object stores: "folders" are key prefixes
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
    """Names directly in `path` (empty when it does not exist)."""
    if is_remote(path):
        fs, inner = _fresh(path)
        try:
            entries = fs.ls(inner, detail=False)
        except FileNotFoundError:
            return []
        return sorted({str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries})
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def read_bytes(path: str) -> bytes:
    """The whole file; `FileNotFoundError` when it is not there."""
    if is_remote(path):
        fs, inner = filesystem(path)
        data: bytes = fs.cat_file(inner)
        return data
    with open(path, "rb") as f:
        return f.read()


def write_atomic(path: str, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one (local: temp, fsync, rename)."""
    if is_remote(path):
        fs, inner = filesystem(path)
        fs.pipe_file(inner, data)  # one object, whole or not at all
        return
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove(path: str) -> None:
    """Remove a file; nothing happens if it is not there."""
    if is_remote(path):
        fs, inner = filesystem(path)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(inner)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def rmtree(path: str) -> None:
    if is_remote(path):
        fs, inner = filesystem(path)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(inner, recursive=True)
        return
    shutil.rmtree(path)


def replace(source: str, target: str) -> None:
    """Rename (local, atomic), or server-side copy then delete (object storage: no rename there)."""
    if is_remote(source):
        fs, inner = filesystem(source)
        _, target_inner = filesystem(target)
        fs.mv(inner, target_inner)
        return
    os.replace(source, target)


def getsize(path: str) -> int:
    if is_remote(path):
        fs, inner = _fresh(path)
        return int(fs.size(inner))
    return os.path.getsize(path)


def open_read(path: str) -> IO[bytes]:
    """A seekable binary file object (Parquet footers and tar headers are read with seeks)."""
    if is_remote(path):
        fs, inner = filesystem(path)
        handle: IO[bytes] = fs.open(inner, "rb")
        return handle
    return open(path, "rb")


def upload(local: str, path: str) -> None:
    """Copy a finished local file to `path` (an object appears whole when the upload completes)."""
    fs, inner = filesystem(path)
    fs.put_file(local, inner)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open_read(path) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sync_dir(path: str) -> None:
    """fsync a local directory, so that renames in it survive a power loss (object stores: nothing)."""
    if is_remote(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
