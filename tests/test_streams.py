"""Streams: brace expansion, opening local / file:// / pipe: / fsspec URLs, data: URIs, tar samples."""

from __future__ import annotations

import base64
import gc
import io
import re
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import fsspec
import pytest

from vlmtile.errors import ImageError, VlmtileError
from vlmtile.streams import (
    IMAGE_EXTENSIONS,
    TarProblem,
    TarSample,
    expand_braces,
    is_image_member,
    is_url,
    iter_tar_samples,
    open_stream,
    read_bytes_url,
)

Member = tuple[str, bytes] | tarfile.TarInfo
"""A regular file (name, content) or a prepared TarInfo (directory, link, device) for `make_tar`."""


def make_tar(members: Sequence[Member], mode: str = "w") -> bytes:
    """A tar (GNU format: one 512-byte header per short-named member) holding `members` in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=tarfile.GNU_FORMAT) as tar:  # type: ignore[call-overload]
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return buffer.getvalue()


def raises_exactly(error: type[Exception], message: str) -> pytest.RaisesExc[Exception]:
    """pytest.raises matching the whole message, literally."""
    return pytest.raises(error, match=f"^{re.escape(message)}$")


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def read_all(data: bytes, source: str = "s.tar") -> list[TarSample | TarProblem]:
    return list(iter_tar_samples(io.BytesIO(data), source))


def sample(key: str, *members: tuple[str, bytes], source: str = "s.tar") -> TarSample:
    return TarSample(key, tuple(members), f"{source}:{key}")


@pytest.fixture
def memfs() -> Iterator[fsspec.AbstractFileSystem]:
    """fsspec's in-memory file system, emptied afterwards (it is a process-wide singleton)."""
    fs = fsspec.filesystem("memory")
    yield fs
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")


# -- expand_braces ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("shard.tar", ["shard.tar"]),
        (
            "s3://b/x-{000..003}.tar",
            ["s3://b/x-000.tar", "s3://b/x-001.tar", "s3://b/x-002.tar", "s3://b/x-003.tar"],
        ),
        ("{8..11}", ["8", "9", "10", "11"]),
        ("{08..11}", ["08", "09", "10", "11"]),
        ("{0098..0101}", ["0098", "0099", "0100", "0101"]),
        ("{3..1}", ["3", "2", "1"]),
        ("{5..5}", ["5"]),
        ("{a,b,c}.tar", ["a.tar", "b.tar", "c.tar"]),
        ("x{a,}y", ["xay", "xy"]),
        ("{a,b}-{0..1}-{x,y}", ["a-0-x", "a-0-y", "a-1-x", "a-1-y", "b-0-x", "b-0-y", "b-1-x", "b-1-y"]),
        ("x{a,b{1..2}}y", ["xay", "xb1y", "xb2y"]),
        ("{{a,b},c}", ["a", "b", "c"]),
        ("{a,b{0..1}{x,y}}", ["a", "b0x", "b0y", "b1x", "b1y"]),
        (
            "pipe:curl -s https://h/s-{00..01}.tar",
            ["pipe:curl -s https://h/s-00.tar", "pipe:curl -s https://h/s-01.tar"],
        ),
    ],
)
def test_expand_braces(pattern: str, expected: list[str]) -> None:
    assert expand_braces(pattern) == expected


def test_expand_braces_large_range_keeps_padding() -> None:
    names = expand_braces("shard-{000000..000099}.tar")
    assert len(names) == 100
    assert names[0] == "shard-000000.tar"
    assert names[42] == "shard-000042.tar"
    assert names[-1] == "shard-000099.tar"


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("s-{1..}.tar", "bad brace pattern 's-{1..}.tar': {1..}: a range needs two non-negative integers"),
        ("{..2}", "bad brace pattern '{..2}': {..2}: a range needs two non-negative integers"),
        ("{a..c}", "bad brace pattern '{a..c}': {a..c}: a range needs two non-negative integers"),
        ("{-1..2}", "bad brace pattern '{-1..2}': {-1..2}: a range needs two non-negative integers"),
        ("{abc}", "bad brace pattern '{abc}': {abc}: a group is either a list {a,b} or a range {0..9}"),
        ("x{}", "bad brace pattern 'x{}': {}: a group is either a list {a,b} or a range {0..9}"),
        ("s-{000..009.tar", "bad brace pattern 's-{000..009.tar': 1 unclosed '{'"),
        ("{a,{b}", "bad brace pattern '{a,{b}': 1 unclosed '{'"),
        ("a}b{c,d}", "bad brace pattern 'a}b{c,d}': '}' at position 1 has no matching '{'"),
        ("{a,b}}", "bad brace pattern '{a,b}}': '}' at position 5 has no matching '{'"),
    ],
)
def test_expand_braces_errors(pattern: str, message: str) -> None:
    with pytest.raises(VlmtileError, match=re.escape(message)):
        expand_braces(pattern)


# -- is_url -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pipe:cat a.tar", True),
        ("s3://bucket/a.tar", True),
        ("gs://bucket/a.tar", True),
        ("https://host/a.tar", True),
        ("memory://a.tar", True),
        ("file:///tmp/a.tar", True),
        ("hf+x.y-z://a", True),
        ("/tmp/a.tar", False),
        ("a.tar", False),
        ("dir/s3://x", False),
        (r"C:\data\a.tar", False),
        ("C:/data/a.tar", False),
        ("C://data/a.tar", False),
        ("data:image/png;base64,AAAA", False),
        ("pipe", False),
        ("://x", False),
    ],
)
def test_is_url(text: str, expected: bool) -> None:
    assert is_url(text) is expected


# -- open_stream --------------------------------------------------------------------------------------


def test_open_stream_local_path_and_file_url(tmp_path: Path) -> None:
    path = tmp_path / "dir with space" / "a.bin"
    path.parent.mkdir()
    path.write_bytes(b"local bytes")
    with open_stream(str(path)) as f:
        assert f.read() == b"local bytes"
    with open_stream(path.as_uri()) as f:  # file:///.../dir%20with%20space/a.bin
        assert "%20" in path.as_uri()
        assert f.read() == b"local bytes"
    with open_stream("file://localhost" + path.as_uri()[len("file://") :]) as f:
        assert f.read() == b"local bytes"
    assert f.closed


def test_open_stream_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.tar")
    with raises_exactly(VlmtileError, f"{missing}: not found"), open_stream(missing):
        pass
    with raises_exactly(VlmtileError, f"{tmp_path}: is a directory"), open_stream(str(tmp_path)):
        pass
    url = "file://otherhost/x.tar"
    message = f"{url}: file URL with a remote host 'otherhost' is not supported"
    with raises_exactly(VlmtileError, message), open_stream(url):
        pass


def test_open_stream_does_not_wrap_errors_of_the_reader(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"x")
    with pytest.raises(KeyError, match="from the body"), open_stream(str(path)):
        raise KeyError("from the body")


def test_open_stream_pipe_reads_command_output(tmp_path: Path) -> None:
    data = make_tar([("a.jpg", b"jpeg"), ("a.json", b"{}")])
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    with open_stream(f"pipe:cat '{path}'") as f:
        assert f.read() == data


def test_open_stream_pipe_tar_through_iter_tar_samples(tmp_path: Path) -> None:
    # 200 KiB of members, more than a pipe buffer: the reader and the command really run concurrently.
    members = [(f"k{i:03d}.bin", bytes([i]) * 2048) for i in range(100)]
    path = tmp_path / "s.tar.gz"
    path.write_bytes(make_tar(members, mode="w:gz"))
    with open_stream(f"pipe:cat '{path}'") as f:
        items = list(iter_tar_samples(f, "s.tar.gz"))
    assert items == [sample(name[:4], ("bin", data), source="s.tar.gz") for name, data in members]


def test_open_stream_pipe_failure_reports_status_and_last_stderr_line() -> None:
    url = "pipe:echo some output; echo first problem >&2; echo 'final reason ' >&2; echo >&2; exit 3"
    with pytest.raises(VlmtileError) as raised, open_stream(url) as f:
        assert f.read() == b"some output\n"
    assert str(raised.value) == f"{url}: command exited with status 3: final reason"


def test_open_stream_pipe_failure_without_stderr() -> None:
    with pytest.raises(VlmtileError) as raised, open_stream("pipe:exit 7") as f:
        assert f.read() == b""
    assert str(raised.value) == "pipe:exit 7: command exited with status 7"


def test_open_stream_pipe_killed_by_signal() -> None:
    with pytest.raises(VlmtileError) as raised, open_stream("pipe:kill -9 $$") as f:
        f.read()
    assert str(raised.value) == "pipe:kill -9 $$: command was killed by signal SIGKILL"


def test_open_stream_pipe_drains_a_large_stderr_and_keeps_its_tail() -> None:
    # 1 MB of stderr would fill the pipe and hang the command if nobody read it.
    url = "pipe:head -c 1000000 /dev/zero | tr '\\0' x >&2; echo >&2; echo the end >&2; exit 1"
    with pytest.raises(VlmtileError) as raised, open_stream(url) as f:
        assert f.read() == b""
    assert str(raised.value) == f"{url}: command exited with status 1: the end"


def test_open_stream_pipe_stopping_early_is_not_an_error() -> None:
    # `yes` never ends: closing the pipe kills it with SIGPIPE, which means "reader done", not failure.
    start = time.monotonic()
    with open_stream("pipe:yes") as f:
        assert f.read(6) == b"y\ny\ny\n"
    assert time.monotonic() - start < 10


def test_open_stream_pipe_reader_error_kills_the_command(tmp_path: Path) -> None:
    marker = tmp_path / "still-running"
    start = time.monotonic()
    # Two commands, so the shell cannot exec the last one: the sleep is the shell's child, not the shell.
    with pytest.raises(RuntimeError, match="reader failed"), open_stream(f"pipe:sleep 2; touch '{marker}'"):
        raise RuntimeError("reader failed")
    assert time.monotonic() - start < 0.9  # nothing is left holding stderr for the drain to wait on
    time.sleep(2.5)
    assert not marker.exists()


def test_open_stream_fsspec_memory(memfs: fsspec.AbstractFileSystem) -> None:
    data = make_tar([("a.jpg", b"jpeg"), ("b.jpg", b"jpeg2")])
    memfs.pipe("/shards/s-000.tar", data)
    with open_stream("memory://shards/s-000.tar") as f:
        assert list(iter_tar_samples(f, "s-000.tar")) == [
            sample("a", ("jpg", b"jpeg"), source="s-000.tar"),
            sample("b", ("jpg", b"jpeg2"), source="s-000.tar"),
        ]


def test_open_stream_fsspec_errors(memfs: fsspec.AbstractFileSystem) -> None:
    url = "memory://nowhere/x.tar"
    with raises_exactly(VlmtileError, f"{url}: not found"), open_stream(url):
        pass
    url = "nosuchscheme://x.tar"
    with raises_exactly(VlmtileError, f"{url}: Protocol not known: nosuchscheme"), open_stream(url):
        pass


def test_open_stream_without_fsspec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fsspec", None)
    message = (
        "reading s3://bucket/s-000.tar needs fsspec: pip install 'vlmtile[remote]' "
        "(plus s3fs / gcsfs for those schemes)"
    )
    with raises_exactly(VlmtileError, message), open_stream("s3://bucket/s-000.tar"):
        pass
    with raises_exactly(VlmtileError, message.replace("s-000.tar", "a.png")):
        read_bytes_url("s3://bucket/a.png")


# -- read_bytes_url -----------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n\x00\x01\xfe\xff\xfb"


def test_read_bytes_url_data_uris() -> None:
    encoded = base64.b64encode(PNG_SIGNATURE).decode()
    assert encoded == "iVBORw0KGgoAAf7/+w=="  # padding, "+" and "/": each form below changes something
    assert read_bytes_url(f"data:image/png;base64,{encoded}") == PNG_SIGNATURE
    assert read_bytes_url(f"DATA:image/png;BASE64,{encoded}") == PNG_SIGNATURE
    assert read_bytes_url(f"data:;base64,{encoded.rstrip('=')}") == PNG_SIGNATURE  # padding left out
    assert read_bytes_url(f"data:image/png;base64,{encoded[:8]}\n {encoded[8:]}") == PNG_SIGNATURE
    assert read_bytes_url(f"data:image/png;base64,{encoded.replace('+', '%2B')}") == PNG_SIGNATURE
    assert read_bytes_url("data:,Hello%2C%20World%21") == b"Hello, World!"
    assert read_bytes_url("data:text/plain;charset=utf-8,%E7%8C%AB") == "猫".encode()
    assert read_bytes_url("data:application/octet-stream,%89PNG%00") == b"\x89PNG\x00"
    assert read_bytes_url("data:,") == b""


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("data:image/png;base64", "malformed data URI: no ',' before the data"),
        ("data:image/png;base64,ab$d", "malformed data URI: invalid base64"),
        ("data:image/png;base64,abcde", "malformed data URI: invalid base64"),
    ],
)
def test_read_bytes_url_bad_data_uris(uri: str, message: str) -> None:
    with pytest.raises(ImageError, match=f"^{re.escape(message)}"):
        read_bytes_url(uri)


def test_read_bytes_url_files_and_urls(tmp_path: Path, memfs: fsspec.AbstractFileSystem) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG_SIGNATURE)
    assert read_bytes_url(str(path)) == PNG_SIGNATURE
    assert read_bytes_url(path.as_uri()) == PNG_SIGNATURE
    assert read_bytes_url(f"pipe:cat '{path}'") == PNG_SIGNATURE
    memfs.pipe("/images/b.png", PNG_SIGNATURE[::-1])
    assert read_bytes_url("memory://images/b.png") == PNG_SIGNATURE[::-1]


def test_read_bytes_url_failures_are_image_errors(tmp_path: Path, memfs: fsspec.AbstractFileSystem) -> None:
    with raises_exactly(ImageError, "not found"):
        read_bytes_url(str(tmp_path / "missing.png"))
    with raises_exactly(ImageError, "not found"):
        read_bytes_url((tmp_path / "missing.png").as_uri())
    with raises_exactly(ImageError, "not found"):
        read_bytes_url("memory://images/missing.png")
    with raises_exactly(ImageError, "is a directory"):
        read_bytes_url(str(tmp_path))
    with raises_exactly(ImageError, "command exited with status 1: no such image"):
        read_bytes_url("pipe:echo no such image >&2; exit 1")


# -- is_image_member ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ext", "expected"),
    [
        ("jpg", True),
        ("JPG", True),
        ("0.JPG", True),
        ("left.png", True),
        ("1.webp", True),
        ("tiff", True),
        ("jpeg", True),
        ("json", False),
        ("txt", False),
        ("cls", False),
        ("npy", False),
        ("jpg.json", False),
        ("", False),
        ("png.", False),
    ],
)
def test_is_image_member(ext: str, expected: bool) -> None:
    assert is_image_member(ext) is expected


def test_image_extensions() -> None:
    assert len(IMAGE_EXTENSIONS) == 20
    assert {"jpg", "png", "webp", "avif", "heic", "jp2", "tga"} <= IMAGE_EXTENSIONS
    assert all(ext == ext.lower() and "." not in ext for ext in IMAGE_EXTENSIONS)


# -- iter_tar_samples ---------------------------------------------------------------------------------


def test_consecutive_members_make_one_sample() -> None:
    data = make_tar(
        [
            ("a.jpg", b"A"),
            ("a.json", b'{"a": 1}'),
            ("a.txt", b"cap a"),
            ("b.png", b"B"),
            ("c.cls", b"3"),
            ("a.jpg", b"A again"),  # not consecutive: a new sample with the same key, as in WebDataset
        ]
    )
    assert read_all(data) == [
        sample("a", ("jpg", b"A"), ("json", b'{"a": 1}'), ("txt", b"cap a")),
        sample("b", ("png", b"B")),
        sample("c", ("cls", b"3")),
        sample("a", ("jpg", b"A again")),
    ]


def test_multi_image_sample_keeps_tar_order() -> None:
    data = make_tar(
        [("abc.1.jpg", b"one"), ("abc.0.jpg", b"zero"), ("abc.json", b"{}"), ("abc.left.PNG", b"L")]
    )
    [item] = read_all(data)
    assert item == sample("abc", ("1.jpg", b"one"), ("0.jpg", b"zero"), ("json", b"{}"), ("left.PNG", b"L"))
    assert isinstance(item, TarSample)
    assert [ext for ext, _ in item.members if is_image_member(ext)] == ["1.jpg", "0.jpg", "left.PNG"]


def test_dotted_and_directory_keys() -> None:
    directory = tarfile.TarInfo("img.v2")
    directory.type = tarfile.DIRTYPE
    data = make_tar(
        [
            directory,
            ("img.v2/abc.jpg", b"1"),
            ("img.v2/abc.x.y.json", b"2"),
            ("img.v2/sub/abc.jpg", b"3"),
            ("./top.jpg", b"4"),
            ("./top.txt", b"5"),
            ("dir/README", b"6"),
            ("dir/.hidden", b"7"),
        ]
    )
    assert read_all(data) == [
        sample("img.v2/abc", ("jpg", b"1"), ("x.y.json", b"2")),
        sample("img.v2/sub/abc", ("jpg", b"3")),
        sample("top", ("jpg", b"4"), ("txt", b"5")),
        sample("dir/README", ("", b"6")),
        sample("dir/", ("hidden", b"7")),
    ]


def test_gzip_tar(tmp_path: Path) -> None:
    path = tmp_path / "s.tar.gz"
    path.write_bytes(make_tar([("a.jpg", b"A" * 5000), ("a.json", b"{}"), ("b.jpg", b"B")], mode="w:gz"))
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    with open_stream(str(path)) as f:
        items = list(iter_tar_samples(f, "s.tar.gz"))
    assert items == [
        sample("a", ("jpg", b"A" * 5000), ("json", b"{}"), source="s.tar.gz"),
        sample("b", ("jpg", b"B"), source="s.tar.gz"),
    ]


def test_duplicate_extension_drops_the_sample() -> None:
    data = make_tar([("a.jpg", b"1"), ("a.jpg", b"2"), ("a.json", b"{}"), ("a.jpg", b"3"), ("b.jpg", b"B")])
    assert read_all(data) == [
        TarProblem("s.tar:a.jpg", "duplicate extension 'jpg' in sample 'a'", "a"),
        sample("b", ("jpg", b"B")),
    ]


def test_links_and_devices_are_problems_directories_are_skipped() -> None:
    folder = tarfile.TarInfo("folder")
    folder.type = tarfile.DIRTYPE
    data = make_tar(
        [
            ("a.jpg", b"A"),
            special("a.txt", tarfile.SYMTYPE, "a.jpg"),
            ("a.json", b"{}"),
            folder,
            ("b.jpg", b"B"),
            special("c.jpg", tarfile.LNKTYPE, "b.jpg"),
            special("d.jpg", tarfile.CHRTYPE),
            special("e.jpg", tarfile.FIFOTYPE),
            ("f.jpg", b"F"),
        ]
    )
    assert read_all(data) == [
        TarProblem("s.tar:a.txt", "a symbolic link, not a file", "a"),
        sample("b", ("jpg", b"B")),
        TarProblem("s.tar:c.jpg", "a hard link, not a file", "c"),
        TarProblem("s.tar:d.jpg", "a device, not a file", "d"),
        TarProblem("s.tar:e.jpg", "a FIFO, not a file", "e"),
        sample("f", ("jpg", b"F")),
    ]


def test_empty_tar_yields_nothing(tmp_path: Path) -> None:
    assert read_all(make_tar([])) == []
    assert read_all(make_tar([], mode="w:gz")) == []
    folder = tarfile.TarInfo("only-a-dir")
    folder.type = tarfile.DIRTYPE
    assert read_all(make_tar([folder])) == []


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "corrupt or truncated tar before the first member: empty file"),
        (b"\xff\xd8\xff\xe0 a jpeg, not a tar" * 40, "corrupt or truncated tar before the first member: "),
        (
            b"\x1f\x8b\x08\x00garbage after a gzip magic" * 40,
            "corrupt or truncated tar before the first member: ",
        ),
    ],
)
def test_not_a_tar_is_one_problem(data: bytes, reason: str) -> None:
    [problem] = read_all(data)
    assert isinstance(problem, TarProblem)
    assert (problem.source, problem.key) == ("s.tar", None)
    assert problem.reason.startswith(reason)
    assert len(problem.reason) > len("corrupt or truncated tar before the first member: ")


TRUNCATION_MEMBERS = [
    ("a.jpg", b"a" * 700),  # header at 0, data 512..1212, padded to 1536
    ("a.json", b"{}"),  # header at 1536, data at 2048
    ("b.jpg", b"b" * 512),  # header at 2560, data 3072..3584
    ("c.jpg", b"c" * 100),  # header at 3584, data 4096..4196; end-of-archive block at 4608
]


def truncation_cases() -> list[tuple[int, list[str], str]]:
    """(cut, keys of the samples that must come out, expected reason) for many cut points."""
    cases = [
        (0, [], "before the first member: empty file"),
        (100, [], "before the first member: truncated header"),
        (512, [], "in member a.jpg: unexpected end of data; sample 'a' may be incomplete and was skipped"),
        (1000, [], "in member a.jpg: unexpected end of data; sample 'a' may be incomplete and was skipped"),
        (1536, [], "after member a.jpg: the data ends without an end-of-archive block; sample 'a' may be"),
        (1700, [], "after member a.jpg: the data ends inside a member header; sample 'a' may be incomplete"),
        (2048, [], "in member a.json: unexpected end of data; sample 'a' may be incomplete and was skipped"),
        (2560, [], "after member a.json: the data ends without an end-of-archive block; sample 'a' may be"),
        (2600, [], "after member a.json: the data ends inside a member header; sample 'a' may be incomplete"),
        (
            3072,
            ["a"],
            "in member b.jpg: unexpected end of data; sample 'b' may be incomplete and was skipped",
        ),
        (3584, ["a"], "after member b.jpg: the data ends without an end-of-archive block; sample 'b' may be"),
        (
            4000,
            ["a"],
            "after member b.jpg: the data ends inside a member header; sample 'b' may be incomplete",
        ),
        (4150, ["a", "b"], "in member c.jpg: unexpected end of data; sample 'c' may be incomplete and was"),
        (
            4200,
            ["a", "b"],
            "after member c.jpg: unexpected end of data; sample 'c' may be incomplete and was",
        ),
        (4608, ["a", "b"], "after member c.jpg: the data ends without an end-of-archive block; sample 'c'"),
        (4700, ["a", "b"], "after member c.jpg: the data ends inside a member header; sample 'c' may be"),
    ]
    return cases


@pytest.mark.parametrize(("cut", "keys", "reason"), truncation_cases())
def test_truncated_tar_yields_complete_samples_then_one_problem(
    cut: int, keys: list[str], reason: str
) -> None:
    data = make_tar(TRUNCATION_MEMBERS)
    assert len(data) == 10240  # one record; the end-of-archive block starts at 4608
    items = read_all(data[:cut])
    *samples, problem = items
    expected = {"a": sample("a", ("jpg", b"a" * 700), ("json", b"{}")), "b": sample("b", ("jpg", b"b" * 512))}
    assert samples == [expected[key] for key in keys]
    assert isinstance(problem, TarProblem)
    assert (problem.source, problem.key) == ("s.tar", None)
    assert problem.reason.startswith("corrupt or truncated tar " + reason)


def test_tar_cut_after_its_end_of_archive_block_is_complete() -> None:
    data = make_tar(TRUNCATION_MEMBERS)
    complete = [
        sample("a", ("jpg", b"a" * 700), ("json", b"{}")),
        sample("b", ("jpg", b"b" * 512)),
        sample("c", ("jpg", b"c" * 100)),
    ]
    for cut in (4608 + 512, 4608 + 1024, 8000, len(data)):
        assert read_all(data[:cut]) == complete


def test_every_truncation_point_gives_a_prefix_then_exactly_one_problem() -> None:
    members = [(f"k{i}.{ext}", bytes([i]) * (37 * i + 1)) for i in range(6) for ext in ("jpg", "json")]
    data = make_tar(members)
    full = read_all(data)
    assert len(full) == 6 and all(isinstance(item, TarSample) for item in full)
    end_of_archive = 512 * sum(1 + (len(content) + 511) // 512 for _, content in members)
    assert data[end_of_archive : end_of_archive + 512] == bytes(512)
    for cut in [*range(0, end_of_archive, 61), end_of_archive]:
        items = read_all(data[:cut])
        assert [type(item) for item in items[-1:]] == [TarProblem], cut
        assert items[:-1] == full[: len(items) - 1], cut


def test_every_truncation_point_of_a_gzip_tar() -> None:
    members = [(f"k{i}.{ext}", bytes([i]) * (37 * i + 1)) for i in range(6) for ext in ("jpg", "json")]
    data = make_tar(members, mode="w:gz")
    full = read_all(data)
    assert len(full) == 6
    for cut in range(len(data)):
        items = read_all(data[:cut])
        if items == full:
            # The end of the deflate stream only holds the zero padding after the end-of-archive block
            # (and the gzip trailer): losing it loses nothing.
            assert cut >= len(data) - 24, cut
            continue
        assert [type(item) for item in items[-1:]] == [TarProblem], cut
        assert items[:-1] == full[: len(items) - 1], cut


@pytest.mark.parametrize(
    ("offset", "garbage", "detail"),
    [
        (2560, b"\x17" * 512, "invalid member header"),  # b.jpg's header is garbage
        (2560, b"x", "invalid member header (bad checksum)"),  # one byte of b.jpg's name changed
        (3584, b"\x17" * 512, "invalid member header"),  # c.jpg's header is garbage
    ],
)
def test_corrupt_header_in_the_middle(offset: int, garbage: bytes, detail: str) -> None:
    data = bytearray(make_tar(TRUNCATION_MEMBERS))
    data[offset : offset + len(garbage)] = garbage
    complete = [sample("a", ("jpg", b"a" * 700), ("json", b"{}")), sample("b", ("jpg", b"b" * 512))]
    done = {2560: ("a.json", "a"), 3584: ("b.jpg", "b")}[offset]
    assert read_all(bytes(data)) == [
        *complete[: len(complete) - 1 if offset == 3584 else 0],
        TarProblem(
            "s.tar",
            f"corrupt or truncated tar after member {done[0]}: {detail}; "
            f"sample {done[1]!r} may be incomplete and was skipped",
            None,
        ),
    ]


def test_corrupt_gzip_data() -> None:
    data = bytearray(make_tar([(f"k{i}.bin", bytes(range(256)) * 40) for i in range(20)], mode="w:gz"))
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    items = read_all(bytes(data))
    assert isinstance(items[-1], TarProblem)
    assert items[-1].reason.startswith("corrupt or truncated tar ")
    assert all(isinstance(item, TarSample) for item in items[:-1])
    assert len(items) < 21


def test_headers_of_read_members_are_not_kept() -> None:
    # tarfile appends every header to TarFile.members; over a shard of a million members that is a leak.
    data = make_tar([(f"k{i:04d}.txt", b"x") for i in range(2000)])
    items = iter_tar_samples(io.BytesIO(data), "s.tar")
    for _ in range(1999):
        next(items)
    # type(), not isinstance(): isinstance reads __class__, which wakes lazy module attributes (torch).
    live = sum(issubclass(type(obj), tarfile.TarInfo) for obj in gc.get_objects())
    assert live < 10
    assert list(items) == [sample("k1999", ("txt", b"x"))]
