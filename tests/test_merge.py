"""`vlmtile merge-manifests`: --rank / --world-size runs in separate directories (no shared file system)
or in one shared directory end as the directory a single run writes: same shard names and bytes, same
records, same error record and manifest (but its date). Mismatched settings and plans are refused, a
missing rank is named, and merging again after an incremental round only adds the new tasks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from e2e_helpers import MakeImage, assert_same_run_output, read_errors, read_manifest
from test_resume import make_folder

from vlmtile.cli import cli
from vlmtile.verify import verify

ARGS = ["-s", "internvl", "--max-tiles", "2", "--shard-size", "2", "--dtype", "uint8", "-q", "--workers", "1"]


def preprocess(inputs: list[Path], out: Path, *extra: str) -> int:
    result = CliRunner().invoke(cli, ["preprocess", *map(str, inputs), "-o", str(out), *ARGS, *extra])
    assert result.exit_code in (0, 3), result.output
    return result.exit_code


def merge(*args: Any) -> Any:
    return CliRunner().invoke(cli, ["merge-manifests", *map(str, args)])


def assert_same_as_single(merged: Path, single: Path) -> None:
    assert_same_run_output(single, merged)
    report = verify(str(merged))
    assert report.ok, report.problems


def inputs_with_a_bad_file_and_a_bad_manifest_line(folder: Path, make_image: MakeImage) -> list[Path]:
    make_folder(folder, make_image, 7)
    (folder / "broken.png").write_bytes(b"not an image")
    manifest = folder.parent / "extra.jsonl"  # one good line, one that fails while listing
    manifest.write_text(
        json.dumps({"id": "a", "images": ["in/img000.png"]}) + "\nnot json\n", encoding="utf-8"
    )
    return [folder, manifest]


def test_ranks_in_separate_directories_merge_into_what_one_run_writes(
    tmp_path: Path, make_image: MakeImage
) -> None:
    inputs = inputs_with_a_bad_file_and_a_bad_manifest_line(tmp_path / "in", make_image)
    ranks = [tmp_path / f"rank{r}" for r in range(3)]
    for r, out in enumerate(ranks):
        preprocess(inputs, out, "--rank", str(r), "--world-size", "3")
    merged = tmp_path / "merged"

    partial = merge(ranks[0], ranks[2], "-o", merged)  # rank 1's tasks are missing
    assert partial.exit_code == 1
    assert "planned tasks are in none of the directories: 1 (" in partial.output
    assert "task i belongs to rank i % world size" in partial.output
    assert not verify(str(merged)).ok

    complete = merge(*ranks, "-o", merged)
    assert complete.exit_code == 3, complete.output  # complete, with failed inputs (as the single run)
    assert "inputs failed; see" in complete.output
    single = tmp_path / "single"
    assert preprocess(inputs, single) == 3
    assert_same_as_single(merged, single)
    assert sorted(e["stage"] for e in read_errors(merged)) == ["decode", "list"]
    again = merge(*ranks, "-o", merged)  # nothing new: nothing brought, the same result
    assert again.exit_code == 3
    assert_same_as_single(merged, single)


def test_merge_into_a_rank_directory_then_incrementally(tmp_path: Path, make_image: MakeImage) -> None:
    folder = tmp_path / "in"
    make_folder(folder, make_image, 5)
    ranks = [tmp_path / f"rank{r}" for r in range(2)]
    single = tmp_path / "single"
    for round_ in range(2):
        if round_:  # an hour later: new files, every rank runs again, the merge adds them
            make_folder(folder, make_image, 3, start=5)
        for r, out in enumerate(ranks):
            preprocess([folder], out, "--rank", str(r), "--world-size", "2")
        result = merge(*ranks, "-o", ranks[0])
        assert result.exit_code == 0, result.output
        preprocess([folder], single)
        assert_same_as_single(ranks[0], single)
    assert read_manifest(ranks[0])["totals"]["records"] == 8


def test_fast_ranks_merge_like_a_fast_single_run(tmp_path: Path, make_image: MakeImage) -> None:
    """Every setting of the directories carries over into the merged manifest, `--fast` included."""
    folder = tmp_path / "in"
    make_folder(folder, make_image, 5)
    ranks = [tmp_path / f"rank{r}" for r in range(2)]
    for r, out in enumerate(ranks):
        preprocess([folder], out, "--fast", "--rank", str(r), "--world-size", "2")
    merged = tmp_path / "merged"
    result = merge(*ranks, "-o", merged)
    assert result.exit_code == 0, result.output
    single = tmp_path / "single"
    preprocess([folder], single, "--fast")
    assert read_manifest(merged)["fast"] is True
    assert_same_as_single(merged, single)


def test_shared_directory_is_checked_and_finalized(tmp_path: Path, make_image: MakeImage) -> None:
    folder = tmp_path / "in"
    make_folder(folder, make_image, 5)
    shared = tmp_path / "shared"
    preprocess([folder], shared, "--rank", "1", "--world-size", "2")
    missing = merge(shared)
    assert missing.exit_code == 1 and "2 planned tasks are in none of the directories: 0 (" in missing.output
    preprocess([folder], shared, "--rank", "0", "--world-size", "2")
    done = merge(shared)
    assert done.exit_code == 0, done.output
    assert "5 images, 0 failures" in done.output
    single = tmp_path / "single"
    preprocess([folder], single)
    assert_same_as_single(shared, single)


def test_other_settings_and_other_plans_are_refused(tmp_path: Path, make_image: MakeImage) -> None:
    folder = tmp_path / "in"
    make_folder(folder, make_image, 4)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    preprocess([folder], a, "--rank", "0", "--world-size", "2")
    preprocess([folder], b, "--rank", "1", "--world-size", "2", "--max-tiles", "3")
    other = merge(a, b, "-o", tmp_path / "m1")
    assert other.exit_code == 1
    assert "made with other settings" in other.output
    assert "strategy.params.max_tiles: was 2, now 3" in other.output

    fewer = tmp_path / "fewer"
    make_folder(fewer, make_image, 3, start=1)  # img001.. : task 0 holds other inputs than a's
    preprocess([fewer], c, "--rank", "1", "--world-size", "2")
    plans = merge(a, c, "-o", tmp_path / "m2")
    assert plans.exit_code == 1 and "planned different inputs for task 0" in plans.output

    several = merge(a, c)
    assert several.exit_code == 1 and "needs -o OUT" in several.output
    nothing = merge(folder)
    assert nothing.exit_code == 1 and "is not a vlmtile output directory" in nothing.output


def test_a_missing_file_is_reported_not_merged(tmp_path: Path, make_image: MakeImage) -> None:
    folder = tmp_path / "in"
    make_folder(folder, make_image, 4)
    ranks = [tmp_path / f"rank{r}" for r in range(2)]
    for r, out in enumerate(ranks):
        preprocess([folder], out, "--rank", str(r), "--world-size", "2")
    (part,) = ranks[1].glob(".part-000001-*")
    part.unlink()
    result = merge(*ranks, "-o", tmp_path / "merged")
    assert result.exit_code == 1
    assert f"task 1's file {part.name} is missing" in result.output


@pytest.mark.parametrize("fmt", ["webdataset"])
def test_webdataset_merge_writes_the_wids_index(tmp_path: Path, make_image: MakeImage, fmt: str) -> None:
    folder = tmp_path / "in"
    make_folder(folder, make_image, 3)
    ranks = [tmp_path / f"rank{r}" for r in range(2)]
    for r, out in enumerate(ranks):
        preprocess([folder], out, "--rank", str(r), "--world-size", "2", "--format", fmt)
    merged = tmp_path / "merged"
    assert merge(*ranks, "-o", merged).exit_code == 0
    single = tmp_path / "single"
    preprocess([folder], single, "--format", fmt)
    assert_same_as_single(merged, single)
    assert (merged / "_index.wids.json").read_bytes() == (single / "_index.wids.json").read_bytes()
