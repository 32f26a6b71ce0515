"""Reading inputs that are streams: brace-expanded shard lists, local/remote/pipe URLs and tar shards.

WebDataset training data lives in tar shards named by brace patterns (`shard-{000000..000999}.tar`), often
remote (s3://, gs://, https://) or produced by a command (`pipe:aws s3 cp ... -`). Such a shard is read
exactly once, front to back: tar members are consumed as they arrive, nothing seeks back, so a remote
shard is never downloaded twice and memory stays at one sample.

fsspec, which reads the remote schemes, is optional (`vlmtile[remote]`) and imported only when a remote
URL is actually opened, so local-only users neither install nor pay for it.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import os
import re
import signal
import subprocess
import tarfile
import threading
import zlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from typing import IO
from urllib.parse import unquote_to_bytes, urlsplit
from urllib.request import url2pathname

from .errors import ImageError, VlmtileError

# -- brace expansion ----------------------------------------------------------------------------------

_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def expand_braces(pattern: str) -> list[str]:
    """Every name a WebDataset-style brace pattern stands for, in order; `[pattern]` if it has no braces.

    Written here rather than taken from `braceexpand` so that a typo in a shard pattern fails loudly
    (`{1..}`, a missing `}`) instead of silently reading a literal file name. Supported: numeric ranges
    `{000..099}` (zero-padded to the width of the first bound; descending ranges count down), comma
    lists `{a,b,c}` (empty alternatives allowed), several groups (cartesian product, the leftmost group
    varying slowest, as the shards are numbered) and groups nested inside list alternatives.
    """
    _check_balanced(pattern)
    return _expand(pattern, pattern)


def _check_balanced(pattern: str) -> None:
    depth = 0
    for i, char in enumerate(pattern):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise VlmtileError(
                    f"bad brace pattern {pattern!r}: '}}' at position {i} has no matching '{{'"
                )
    if depth:
        raise VlmtileError(f"bad brace pattern {pattern!r}: {depth} unclosed '{{'")


def _expand(text: str, pattern: str) -> list[str]:
    """Expansion of `text` (balanced); `pattern` is the user's whole pattern, for error messages."""
    start = text.find("{")
    if start < 0:
        return [text]
    end = _matching_brace(text, start)
    prefix, body, rest = text[:start], text[start + 1 : end], text[end + 1 :]
    alternatives = _split_top_level(body)
    if len(alternatives) > 1:
        choices = [expanded for alternative in alternatives for expanded in _expand(alternative, pattern)]
    else:
        choices = _range(body, pattern)
    tails = _expand(rest, pattern)
    return [prefix + choice + tail for choice in choices for tail in tails]


def _matching_brace(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    raise AssertionError("unbalanced braces passed _check_balanced")  # pragma: no cover


def _split_top_level(body: str) -> list[str]:
    """`body` split at the commas that are not inside a nested group."""
    parts: list[str] = []
    depth = 0
    last = 0
    for i, char in enumerate(body):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    parts.append(body[last:])
    return parts


def _range(body: str, pattern: str) -> list[str]:
    match = _RANGE.fullmatch(body)
    if match is None:
        if ".." in body:
            why = "a range needs two non-negative integers, as in {000..099}"
        else:
            why = "a group is either a list {a,b} or a range {0..9}"
        raise VlmtileError(f"bad brace pattern {pattern!r}: {{{body}}}: {why}")
    first, last = match.group(1), match.group(2)
    low, high = int(first), int(last)
    step = 1 if high >= low else -1
    width = len(first)
    return [str(n).zfill(width) for n in range(low, high + step, step)]


# -- URLs -----------------------------------------------------------------------------------------------

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")
"""Two characters at least, so that a Windows drive letter (`C://x`) is never taken for a scheme."""

_STDERR_TAIL = 64 * 1024
"""Bytes of a pipe command's stderr kept for the error message; the rest is read and dropped."""


def is_url(text: str) -> bool:
    """True for `pipe:CMD` and `scheme://...` (including `file://`), False for local paths.

    Decides how an input is opened and whether relative image paths are resolved against it. `data:`
    URIs are not URLs here: they hold their content and are decoded by `read_bytes_url`.
    """
    return text.startswith("pipe:") or _SCHEME.match(text) is not None


class _OpenError(Exception):
    """Why one URL cannot be read: `open_stream` raises it as VlmtileError, `read_bytes_url` as ImageError."""


def _os_reason(error: BaseException) -> str:
    """A short human reason for an OS / fsspec error, without repeating the path it already names."""
    if isinstance(error, FileNotFoundError):
        return "not found"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, IsADirectoryError):
        return "is a directory"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


@contextmanager
def open_stream(url: str) -> Iterator[IO[bytes]]:
    """A binary file object reading `url` (local path, `file://`, `pipe:CMD` or any fsspec URL).

    Meant to be read once, sequentially (a pipe cannot seek). Remote files come straight from fsspec,
    which keeps them seekable for readers that need it (Parquet footers). Any failure to open raises
    `VlmtileError` naming the URL; a `pipe:` command that exits non-zero raises one when the block ends.
    """
    try:
        with _open(url) as f:
            yield f
    except _OpenError as e:
        raise VlmtileError(f"{url}: {e}") from None


def _open(url: str) -> AbstractContextManager[IO[bytes]]:
    """The context manager `open_stream` delegates to; raises `_OpenError` for problems with `url`."""
    if url.startswith("pipe:"):
        return _open_pipe(url[len("pipe:") :])
    if url.lower().startswith("file://"):
        return _open_local(_file_url_path(url))
    if is_url(url):
        return _open_fsspec(url)
    return _open_local(url)


def local_path(url: str) -> str:
    """The path a `file://` URL names (a mounted file system is a local path), else `url` unchanged.

    Raises `VlmtileError` for a `file://` URL with a remote host.
    """
    if not url.lower().startswith("file://"):
        return url
    try:
        return _file_url_path(url)
    except _OpenError as e:
        raise VlmtileError(f"{url}: {e}") from None


def _file_url_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise _OpenError(f"file URL with a remote host {parts.netloc!r} is not supported")
    return url2pathname(parts.path)


@contextmanager
def _open_local(path: str) -> Iterator[IO[bytes]]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with block below, outside the try
    except OSError as e:
        raise _OpenError(_os_reason(e)) from None
    with f:
        yield f


@contextmanager
def _open_fsspec(url: str) -> Iterator[IO[bytes]]:
    try:
        fsspec = importlib.import_module("fsspec")
    except ImportError:
        raise VlmtileError(
            f"reading {url} needs fsspec: pip install 'vlmtile[remote]' (plus s3fs / gcsfs for those schemes)"
        ) from None
    try:
        f = fsspec.open(url, "rb").open()
    except ImportError as e:  # the scheme's backend (s3fs, gcsfs, aiohttp, ...) is not installed
        raise VlmtileError(f"reading {url}: {e}") from None
    except Exception as e:  # noqa: BLE001 - each backend has its own errors; all mean "cannot read this URL"
        raise _OpenError(_os_reason(e)) from None
    with f:
        yield f


@contextmanager
def _open_pipe(command: str) -> Iterator[IO[bytes]]:
    """stdout of `command` (run by the shell); its exit status is checked when the block ends.

    stderr is drained by a thread (a full stderr pipe would block the command) that keeps only its tail.
    If the reader fails, the command's whole process group is killed: `sh -c` does not always exec the
    command, and killing only the shell would leave the command running, holding the pipes.
    A command killed by SIGPIPE is not an error: it means the reader stopped early on purpose (the tar
    reader leaves the end-of-archive padding unread), which closes the pipe under the writer.
    """
    try:
        process = subprocess.Popen(
            command,
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            process_group=0,  # its own group, so that an abort kills the shell's children too
        )
    except OSError as e:
        raise _OpenError(f"cannot run command: {_os_reason(e)}") from None
    assert process.stdout is not None and process.stderr is not None
    tail = bytearray()
    drain = threading.Thread(target=_keep_tail, args=(process.stderr, tail), daemon=True)
    drain.start()
    try:
        yield process.stdout
    except BaseException:
        # The reader failed (or was interrupted): do not wait for a command that may never write again.
        process.stdout.close()
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        drain.join(timeout=1)
        raise
    process.stdout.close()
    status = process.wait()
    # A grandchild of the shell may hold stderr open after the command exits; do not hang for it.
    drain.join(timeout=5)
    if status in (0, -signal.SIGPIPE, 128 + signal.SIGPIPE):
        return
    if status < 0:
        reason = f"command was killed by signal {signal.Signals(-status).name}"
    else:
        reason = f"command exited with status {status}"
    last = _last_line(bytes(tail))
    raise _OpenError(f"{reason}: {last}" if last else reason)


def _keep_tail(stream: IO[bytes], tail: bytearray) -> None:
    """Read `stream` to its end, keeping only its last `_STDERR_TAIL` bytes in `tail` (bounded memory)."""
    with stream:
        while chunk := stream.read(_STDERR_TAIL):
            tail += chunk
            del tail[:-_STDERR_TAIL]


def _last_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:500] if lines else ""


def read_bytes_url(url: str) -> bytes:
    """The whole content of a path, URL or `data:` URI (an image named by a manifest).

    `data:` URIs (base64 or percent-encoded) are decoded without any I/O. Any failure of this one input
    raises `ImageError` with the reason; only a setup problem (fsspec or a scheme backend missing) raises
    `VlmtileError`, since it would fail every remote image alike.
    """
    if url[:5].lower() == "data:":
        return _decode_data_uri(url)
    try:
        with _open(url) as f:
            data: bytes = f.read()
    except _OpenError as e:
        raise ImageError(str(e)) from None
    except OSError as e:
        raise ImageError(f"read error: {_os_reason(e)}") from None
    return data


def _decode_data_uri(uri: str) -> bytes:
    """RFC 2397: `data:[<media type>][;base64],<data>`, the data percent-encoded unless base64."""
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise ImageError("malformed data URI: no ',' before the data")
    raw = unquote_to_bytes(payload)
    if not header.lower().endswith(";base64"):
        return raw
    compact = re.sub(rb"\s+", b"", raw)
    compact += b"=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"malformed data URI: invalid base64 ({e})") from None


# -- tar shards ---------------------------------------------------------------------------------------

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    "jpg jpeg jpe jfif png webp bmp gif tif tiff ppm pgm pbm pnm tga jp2 j2k avif heic heif".split()
)
"""Last dotted component of a tar member extension that makes the member an image of its sample."""


def is_image_member(ext: str) -> bool:
    """Whether a member with extension `ext` ("jpg", "0.JPG", "left.png") is one of the sample's images.

    Decided by the last dotted component, case-insensitively, so multi-image samples (`abc.0.jpg`,
    `abc.1.jpg`) and named views (`abc.left.png`) work; everything else (json, txt, cls, npy) is a field.
    """
    return ext.rpartition(".")[2].lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class TarSample:
    """One WebDataset sample: the consecutive tar members sharing a key."""

    key: str
    """Member path up to the first dot of its basename ("dir/abc" for "dir/abc.0.jpg")."""
    members: tuple[tuple[str, bytes], ...]
    """(extension after that first dot, content), in tar order; the extension is "" for a dotless name."""
    source: str
    """`{tar source}:{key}`, for messages and metadata."""


@dataclass(frozen=True)
class TarProblem:
    """Something in a tar that could not become a sample; the tar reader reports it instead of raising."""

    source: str
    """`{tar source}:{member name}`, or the tar source alone when the archive itself is damaged."""
    reason: str
    key: str | None
    """Key of the sample that was dropped, None when the damage is not tied to one sample."""


def _lzma_error() -> tuple[type[Exception], ...]:
    """lzma's error class; a Python built without liblzma has none (and tarfile then reads no .xz tar)."""
    try:
        import lzma
    except ImportError:  # pragma: no cover - depends on how Python was built
        return ()
    return (lzma.LZMAError,)


_CORRUPT: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    OSError,
    EOFError,
    zlib.error,
    *_lzma_error(),
    TypeError,  # tarfile's gzip header parser on a stream cut inside the header (CPython 3.11)
)
"""What reading a damaged or truncated (possibly compressed) tar stream raises (checked by fuzzing)."""

_EOFHeaderError: type[tarfile.HeaderError] = tarfile.EOFHeaderError  # type: ignore[attr-defined]


def _split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, as WebDataset groups them; a leading "./" is not part of a key."""
    while name.startswith("./"):
        name = name[2:]
    directory, slash, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return directory + slash + stem, ext


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    if member.isfifo():
        return "a FIFO"
    if member.ischr() or member.isblk():
        return "a device"
    return "not a regular file"


def iter_tar_samples(stream: IO[bytes], source: str) -> Iterator[TarSample | TarProblem]:
    """The samples of a tar (plain or compressed) read sequentially from `stream`, in tar order; never raises.

    A sample is a run of consecutive members with the same key (WebDataset's rule; the same key later in
    the tar starts another sample). Directories are skipped; a link, device or FIFO, or an extension seen
    twice in one sample, drops that sample with one `TarProblem`. A damaged or truncated tar yields the
    samples completed before the damage, then one `TarProblem` for the tar, and ends: the sample being
    read when the damage was found is dropped, since members of it may be missing. A tar that ends
    without its end-of-archive block counts as truncated (tarfile itself would say nothing).
    """
    stops: list[tarfile.HeaderError] = []
    done: str | None = None  # the last member read completely
    reading: str | None = None  # the member whose content is being read
    key: str | None = None
    members: list[tuple[str, bytes]] = []
    problem: TarProblem | None = None
    damage: BaseException | None = None
    try:
        # Not a with statement: opening is where a non-tar fails, and that failure is a TarProblem.
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_recording_tarinfo(stops))  # noqa: SIM115
    except _CORRUPT as e:
        yield _damage(source, e, done, reading, key)
        return
    with tar:
        while True:
            try:
                member = tar.next()
            except _CORRUPT as e:
                damage = e
                break
            # tarfile keeps every header it has read; a stream needs only the current one.
            tar.members = []  # type: ignore[attr-defined]
            if member is None:
                if stops and not isinstance(stops[-1], _EOFHeaderError):
                    damage = stops[-1]
                break
            if member.isdir():
                continue
            member_key, ext = _split_name(member.name)
            if member_key != key:
                # This header ends the previous run, so that sample is complete whatever follows.
                if key is not None:
                    yield problem or TarSample(key, tuple(members), f"{source}:{key}")
                key, members, problem = member_key, [], None
            if problem is not None:  # the sample is dropped already: let tarfile skip the content
                done = member.name
                continue
            reading = member.name
            try:
                data = _member_data(tar, member)
            except _CORRUPT as e:
                damage = e
                break
            done, reading = member.name, None
            if data is None:
                problem = TarProblem(f"{source}:{member.name}", f"{_member_kind(member)}, not a file", key)
            elif any(ext == seen for seen, _ in members):
                problem = TarProblem(
                    f"{source}:{member.name}", f"duplicate extension {ext!r} in sample {key!r}", key
                )
            else:
                members.append((ext, data))
    if damage is not None:
        yield _damage(source, damage, done, reading, key)
    elif key is not None:
        yield problem or TarSample(key, tuple(members), f"{source}:{key}")


def _member_data(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes | None:
    """Content of a regular member (read now: a stream cannot come back to it), None for anything else."""
    if not member.isreg():
        return None
    f = tar.extractfile(member)
    if f is None:  # pragma: no cover - extractfile returns a file for every regular member
        return None
    with f:
        return f.read()


def _damage(
    source: str, error: BaseException, done: str | None, reading: str | None, key: str | None
) -> TarProblem:
    """The one problem reported for a damaged tar, saying where the damage is and what was lost."""
    if reading is not None:
        where = f"in member {reading}"
    elif done is not None:
        where = f"after member {done}"
    else:
        where = "before the first member"
    kind = type(error).__name__
    if kind == "EmptyHeaderError":
        detail = "the data ends without an end-of-archive block"
    elif kind == "TruncatedHeaderError":
        detail = "the data ends inside a member header"
    elif kind == "InvalidHeaderError":
        detail = (
            "invalid member header"
            if str(error) in ("", "invalid header")
            else f"invalid member header ({error})"
        )
    else:
        detail = str(error) or kind
    if key is not None:
        detail += f"; sample {key!r} may be incomplete and was skipped"
    return TarProblem(source, f"corrupt or truncated tar {where}: {detail}", None)


def _recording_tarinfo(stops: list[tarfile.HeaderError]) -> type[tarfile.TarInfo]:
    """A TarInfo class that notes, in `stops`, each header tarfile could not read before re-raising it.

    tarfile ends a stream quietly at a missing, short or invalid header after the first member, which
    would make a shard cut at a member boundary look complete. Only a zero block (EOFHeaderError) is a
    real end of archive; the iterator checks the last recorded stop.
    """

    class RecordingTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tar: tarfile.TarFile) -> RecordingTarInfo:
            try:
                return super().fromtarfile(tar)
            except tarfile.HeaderError as e:
                stops.append(e)
                raise

    return RecordingTarInfo
