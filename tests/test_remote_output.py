"""Output on object storage through fsspec: the same shards, records and manifest as on a local disk.

Two stand-ins for a bucket, neither of which renames or locks the way vlmtile's local code does (the
object-storage code path stages files locally, uploads them under their part names and names the shards
by copy + delete, under a lease instead of flock):

- `memory://`: fsspec's in-process store, for runs whose tasks run inline (`workers=1`);
- `local://`: fsspec's local file system through the same object-storage code path, which worker
  processes (and Ray workers, in test_ray.py) can reach as well.

No real S3 / GCS is reachable from the tests; what differs there (server-side copy, eventual listing of a
brand-new prefix) is fsspec's backend's business.
"""

from __future__ import annotations

import importlib.util
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
from click.testing import CliRunner
from e2e_helpers import MakeImage, assert_same_run_output, read_manifest
from test_resume import assert_exactly_once, make_folder

import vlmtile
from vlmtile import ledger
from vlmtile.cli import cli
from vlmtile.merge import merge_manifests
from vlmtile.verify import verify

STRATEGY = vlmtile.get_strategy("internvl", max_tiles=2)


def run(folder: Path, out: str | Path, **kwargs: Any) -> vlmtile.RunSummary:
    base: dict[str, Any] = {"strategy": STRATEGY, "shard_size": 2, "progress": False, "dtype": "uint8"}
    base.update(kwargs)
    return vlmtile.preprocess(vlmtile.RunConfig(inputs=(str(folder),), output=str(out), **base))


@pytest.fixture
def bucket() -> Iterator[str]:
    """A fresh memory:// "bucket", removed afterwards."""
    url = f"memory://tiles-{uuid.uuid4().hex[:8]}"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def download(url: str, to: Path) -> Path:
    fs, path = fsspec.core.url_to_fs(url)
    to.mkdir(parents=True)
    for remote in fs.find(path):
        relative = remote[len(path) :].lstrip("/")
        target = to / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(fs.cat_file(remote))
    return to


def listing(url: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(url)
    return sorted(p[len(path) :].lstrip("/") for p in fs.find(path))


def test_memory_bucket_holds_what_a_local_run_writes_and_resumes(
    tmp_path: Path, make_image: MakeImage, bucket: str
) -> None:
    folder = tmp_path / "in"
    inputs = make_folder(folder, make_image, 5)
    (folder / "bad.png").write_bytes(b"not an image")
    first = run(folder, bucket, workers=1)
    assert (first.records, first.failures, first.shards) == (5, 1, 3)
    report = verify(bucket)  # verify reads the bucket itself
    assert report.ok, report.problems
    assert not [name for name in listing(bucket) if ".part-" in name or name == "_lock"]
    local = tmp_path / "local"  # the same job on a local disk, alongside
    run(folder, local, workers=1)

    more = make_folder(folder, make_image, 2, start=5)  # the next cron run: two new files
    second = run(folder, bucket, workers=1)
    assert (second.records, second.shards) == (7, 4)
    run(folder, local, workers=1)
    copy = download(bucket, tmp_path / "copy")
    assert_same_run_output(local, copy)
    assert read_manifest(copy)["runs"] == 2
    assert_exactly_once(copy, [*inputs, *more, folder / "bad.png"])


def test_local_protocol_with_worker_processes(tmp_path: Path, make_image: MakeImage) -> None:
    folder = tmp_path / "in"
    make_folder(folder, make_image, 5)
    url = f"local://{tmp_path / 'bucket'}"
    summary = run(folder, url, workers=2)
    assert (summary.records, summary.output) == (5, url)
    assert verify(url).ok
    local = tmp_path / "local"
    run(folder, local, workers=2)
    assert_same_run_output(local, tmp_path / "bucket")
    cli_verify = CliRunner().invoke(cli, ["verify", url, "--quick"])
    assert cli_verify.exit_code == 0 and "OK: 3 shards, 5 records" in cli_verify.output


def test_a_stopped_run_leaves_no_trusted_file_and_the_rerun_finishes(
    tmp_path: Path, make_image: MakeImage, bucket: str
) -> None:
    folder = tmp_path / "in"
    inputs = make_folder(folder, make_image, 4)
    (folder / "img000.png").write_bytes(b"broken")  # task 0 fails first: --max-errors 0 stops the run
    with pytest.raises(vlmtile.RunStopped):
        run(folder, bucket, workers=1, max_errors=0)
    assert not verify(bucket).ok
    fs, path = fsspec.core.url_to_fs(bucket)
    fs.pipe_file(f"{path}/.part-000001-0000.parquet", b"half an upload")  # what a killed attempt left
    done = run(folder, bucket, workers=1)
    assert (done.records, done.failures, done.complete) == (3, 1, True)
    assert ".part-000001-0000.parquet" not in listing(bucket)
    assert_exactly_once(download(bucket, tmp_path / "copy"), inputs)


def _lease(url: str, renewed: float) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    holder = {"pid": 4242, "host": "elsewhere", "started": "t0", "token": "x", "renewed": renewed}
    fs.pipe_file(f"{path}/_lock", json.dumps(holder).encode())


def test_lease_refuses_a_live_run_and_takes_over_a_killed_one(
    tmp_path: Path, make_image: MakeImage, bucket: str
) -> None:
    folder = tmp_path / "in"
    make_folder(folder, make_image, 2)
    _lease(bucket, time.time())  # renewed just now: a live run
    args = ["preprocess", str(folder), "-o", bucket, "-s", "internvl", "--workers", "1", "-q"]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 1
    assert f"another vlmtile run holds {bucket}/_lock (pid 4242 on elsewhere, since t0)" in refused.output

    _lease(bucket, time.time() - ledger.LEASE_SECONDS - 1)  # not renewed for too long: a killed run
    taken = CliRunner().invoke(cli, args)
    assert taken.exit_code == 0, taken.output
    assert "an earlier run (pid 4242 on elsewhere, started t0) was killed" in taken.output
    assert "_lock" not in listing(bucket)  # released at the end


def test_object_storage_refusals(tmp_path: Path, make_image: MakeImage, bucket: str) -> None:
    folder = tmp_path / "in"
    make_folder(folder, make_image, 1)
    with pytest.raises(vlmtile.VlmtileError, match=r"--rank needs a shared lock, which object storage"):
        run(folder, bucket, rank=0, world_size=2)
    if importlib.util.find_spec("s3fs") is None:  # not a test dependency: the message for a missing backend
        args = ["preprocess", str(folder), "-o", "s3://bucket/x", "-s", "internvl"]
        missing = CliRunner().invoke(cli, args)
        assert missing.exit_code == 1
        assert missing.output == "Error: s3://bucket/x: Install s3fs to access S3\n"
        assert not Path("s3:").exists()  # and no local folder named s3: either
    with pytest.raises(vlmtile.VlmtileError, match=r"merge-manifests works on local or mounted"):
        merge_manifests([str(tmp_path)], bucket)
    with pytest.raises(vlmtile.VlmtileError, match=r"reading an output on object storage is not supported"):
        vlmtile.open_dataset(bucket)
