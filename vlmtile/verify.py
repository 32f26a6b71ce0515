"""`vlmtile verify OUT`: is this output directory complete and intact?

Meant to run after every cron job: it reads the manifest and checks each shard against it (present, same
size and checksum, opens, same record count), that every input is accounted for exactly once (records +
error lines == inputs) and that no stray shard-like file is lying around. It never trusts a file's name:
only what the manifest recorded when the shard was committed.
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .ledger import ERRORS, MANIFEST, read_json


@dataclass
class VerifyReport:
    """What `verify` found: the problems (empty when all is well) and a few numbers for the summary."""

    path: str
    problems: list[str] = field(default_factory=list)
    shards: int = 0
    records: int = 0
    failures: int = 0
    inputs: int = 0
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)
    packed_images: int | None = None
    """A `pack` output: the images its sequences hold (its records are sequences, its inputs images)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        state = "OK" if self.ok else f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        if self.packed_images is not None:
            packed = self.packed_images
            accounted = (
                f"{self.records:,} sequences holding {packed:,} images + {self.failures:,} errors = "
                f"{packed + self.failures:,} of {self.inputs:,} images"
            )
        else:
            accounted = (
                f"{self.records:,} records + {self.failures:,} errors = {self.records + self.failures:,} of "
                f"{self.inputs:,} inputs"
            )
        size = f"{self.bytes / 1e6:,.1f} MB"
        return f"vlmtile verify: {state}: {self.shards} shards, {accounted}, {size} in {self.path}"


def verify(path: str, *, checksums: bool = True) -> VerifyReport:
    """Check an output directory against its manifest; `checksums=False` skips reading whole shards."""
    report = VerifyReport(path)
    manifest_path = storage.join(path, MANIFEST)
    try:
        manifest: dict[str, Any] = read_json(manifest_path)
    except FileNotFoundError:
        report.problems.append(f"no {MANIFEST}: not a vlmtile output directory, or no run has finished yet")
        return report
    except ValueError as e:
        report.problems.append(f"{MANIFEST} is not valid JSON: {e}")
        return report
    if not manifest.get("complete", True):
        report.problems.append(
            f"incomplete: {manifest.get('pending_tasks', '?')} planned tasks have not finished "
            "(an interrupted run, or other ranks still working): run the same command again"
        )
    fmt = manifest.get("format")
    listed = set()
    for shard in manifest.get("shards", []):
        listed.add(shard["name"])
        report.shards += 1
        _check_shard(path, shard, fmt, checksums, report)
    totals = manifest.get("totals", {})
    report.inputs = int(totals.get("inputs", 0))
    report.records = sum(int(s["records"]) for s in manifest.get("shards", []))
    report.bytes = sum(int(s["bytes"]) for s in manifest.get("shards", []))
    errors = _error_lines(path, report)
    report.failures = len(errors)
    if report.records != totals.get("records"):
        report.problems.append(
            f"shards hold {report.records} records, the totals say {totals.get('records')}"
        )
    if report.failures != totals.get("failures"):
        report.problems.append(
            f"{ERRORS} has {report.failures} lines, the totals say {totals.get('failures')}"
        )
    if manifest.get("layout") == "packed":  # records are sequences; every image read is packed or an error
        report.packed_images = int(totals.get("images", 0))
        if report.packed_images + report.failures != report.inputs:
            report.problems.append(
                f"images packed + errors = {report.packed_images + report.failures}, but {report.inputs} "
                "images were read"
            )
    elif report.records + report.failures != report.inputs:
        report.problems.append(
            f"records + errors = {report.records + report.failures}, but there were {report.inputs} inputs"
        )
    sources = [e.get("source") for e in errors]
    if len(set(sources)) != len(sources):
        report.problems.append(f"{ERRORS} lists some inputs more than once")
    prefix = re.escape(str(manifest.get("prefix", "shard")))
    pattern = re.compile(rf"^{prefix}-\d{{6}}\.(parquet|tar)$")
    for name in sorted(storage.listdir(path)):
        if pattern.match(name) and name not in listed:
            report.problems.append(f"{name} looks like a shard but is not in the manifest")
        elif name.startswith((".part-", "..part-")) or ".tmp-" in name:
            report.warnings.append(f"{name}: left by an unfinished write (removed by the next run)")
    return report


def _check_shard(
    path: str, shard: dict[str, Any], fmt: str | None, checksums: bool, report: VerifyReport
) -> None:
    name = shard["name"]
    file = storage.join(path, name)
    try:
        size = storage.getsize(file)
    except FileNotFoundError:
        report.problems.append(f"{name}: missing")
        return
    if size != shard["bytes"]:
        report.problems.append(f"{name}: {size} bytes, the manifest says {shard['bytes']}")
        return
    if checksums and storage.sha256(file) != shard["sha256"]:
        report.problems.append(f"{name}: checksum differs from the manifest (the file was changed)")
        return
    try:
        count = _parquet_rows(file) if fmt == "parquet" else _tar_samples(file)
    except (OSError, pa.ArrowException, tarfile.TarError) as e:
        report.problems.append(f"{name}: does not open: {e}")
        return
    if count != shard["records"]:
        report.problems.append(f"{name}: holds {count} records, the manifest says {shard['records']}")


def _parquet_rows(file: str) -> int:
    with storage.open_read(file) as f:
        return int(pq.ParquetFile(f).metadata.num_rows)


def _tar_samples(file: str) -> int:
    """Distinct sample keys, reading member headers only (tarfile seeks past the data)."""
    keys = set()
    with storage.open_read(file) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            keys.add(member.name.split(".", 1)[0])
    return len(keys)


def _error_lines(path: str, report: VerifyReport) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    try:
        text = storage.read_bytes(storage.join(path, ERRORS)).decode("utf-8")
    except FileNotFoundError:
        report.problems.append(f"{ERRORS} is missing")
        return errors
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            errors.append(json.loads(line))
        except ValueError:
            report.problems.append(f"{ERRORS} line {number} is not valid JSON")
    return errors
