"""The `vlmtile` command: a thin click layer over the library. The only module that imports click.

Strategy options (`--max-tiles`, `--max-pixels`, ...) are generated from the registered strategies'
parameter definitions, so a new strategy parameter is a CLI option without touching this file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click
from tqdm import tqdm

from .decode import DEFAULT_MAX_IMAGE_PIXELS, load_image
from .dtypes import STORAGE_DTYPES
from .errors import ImageError, RunStopped, VlmtileError
from .ledger import CHANGED, ERRORS
from .merge import merge_manifests
from .pack import PackConfig, open_source, pack
from .packing import DEFAULT_BUFFER, DEFAULT_BUFFER_BYTES, FITS
from .runner import (
    DEFAULT_PREFIX,
    DEFAULT_SHARD_BYTES,
    DEFAULT_SHARD_SIZE,
    DEFAULT_TASK_TIMEOUT,
    EXECUTORS,
    RunConfig,
    available_cpus,
    preprocess,
)
from .samples import SourceOptions
from .sinks import PACKED_SINKS, SINKS
from .sources import make_key
from .stats import (
    Column,
    compute_stats,
    format_table,
    is_output_dir,
    plot_histograms,
    stats_from_output,
    write_lengths,
)
from .strategies import describe, get_preset, get_strategy, list_strategies
from .strategies.base import tunable_fields
from .streams import is_url, local_path
from .verify import verify
from .visualize import inspect_image
from .work import Budget

EXIT_FATAL = 1
EXIT_FAILURES = 3
"""Exit status when the run finished but some inputs are in the error record."""

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _strategy_params() -> dict[str, tuple[dataclasses.Field[Any], list[str]]]:
    """Every tunable parameter of every registered strategy: name -> (field, strategies using it)."""
    params: dict[str, tuple[dataclasses.Field[Any], list[str]]] = {}
    for name in list_strategies():
        for f in tunable_fields(get_preset(name).cls):
            if f.name in params:
                known = params[f.name][0]
                if known.type != f.type or known.metadata.get("choices") != f.metadata.get("choices"):
                    raise RuntimeError(f"strategy parameter {f.name!r} is declared differently by {name!r}")
                params[f.name][1].append(name)
            else:
                params[f.name] = (f, [name])
    return params


def _number_list(kind: type[int] | type[float]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """Option callback: a comma-separated list of numbers (`224,256,384`) for tuple-valued parameters."""

    def convert(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return parse_number_list(str(value), kind)
        except ValueError:
            raise click.BadParameter(
                f"{value!r} is not a comma-separated list of {kind.__name__}s", ctx, param
            ) from None

    return convert


def parse_number_list(text: str, kind: type[int] | type[float]) -> tuple[Any, ...]:
    """`"224, 256"` -> (224, 256); an empty string is the empty tuple."""
    return tuple(kind(part) for part in (p.strip() for p in text.split(",")) if part)


def _field_kind(f: dataclasses.Field[Any]) -> str:
    """A parameter's declared type as one word: bool, int, float, str, ints or floats (tuples)."""
    declared = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return {"tuple[int, ...]": "ints", "tuple[float, ...]": "floats"}.get(declared, declared)


def strategy_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add one option per strategy parameter; unset options stay None and leave the preset's default."""
    for name, (f, users) in sorted(_strategy_params().items(), reverse=True):
        flag = "--" + name.replace("_", "-")
        scope = "all strategies" if len(users) == len(list_strategies()) else ", ".join(users)
        defaults = sorted({_show(getattr(get_strategy(u), name)) for u in users})
        help_text = f"{f.metadata['help']} [{scope}; default {' / '.join(defaults)}]"
        kind = _field_kind(f)
        if kind == "bool":
            option = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
        elif f.metadata.get("choices"):
            option = click.option(flag, name, type=click.Choice(f.metadata["choices"]), help=help_text)
        elif kind in ("ints", "floats"):
            number: type[int] | type[float] = int if kind == "ints" else float
            metavar = f"{number.__name__.upper()}[,...]"
            option = click.option(flag, name, callback=_number_list(number), metavar=metavar, help=help_text)
        else:
            option = click.option(flag, name, type=float if kind == "float" else int, help=help_text)
        command = option(command)
    return command


def _field_names(strategy: Any) -> set[str]:
    """Every parameter a strategy has (`params()` leaves some out at their defaults)."""
    return {f.name for f in dataclasses.fields(strategy)}


def _show(value: Any) -> str:
    """A default as a user would type it: lists comma-separated, an empty list as `none`."""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def build_strategy(name: str, options: dict[str, Any]) -> Any:
    """Strategy from --strategy plus whichever strategy options were given."""
    given = {k: v for k, v in options.items() if k in _strategy_params() and v is not None}
    try:
        return get_strategy(name, **given)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="vlmtile")
def cli() -> None:
    """Pre-tile images offline exactly as vision-language models preprocess them."""


def source_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """How to read manifests and Parquet inputs (shared by preprocess and stats)."""
    for option in reversed(
        [
            click.option(
                "--image-field",
                "--image-column",
                "image_field",
                default=None,
                help="Manifest field / Parquet column with the image(s) [default: images, then image; "
                "for Parquet also the first binary or {bytes, path} column].",
            ),
            click.option(
                "--key-field",
                default="id",
                show_default=True,
                help="Manifest field / Parquet column used as the sample key (else the line / row number).",
            ),
            click.option(
                "--image-root",
                type=click.Path(file_okay=False),
                default=None,
                help="Folder that relative image paths are relative to [default: the manifest's folder].",
            ),
            click.option(
                "--max-tiles-per-sample",
                type=click.IntRange(min=1),
                default=None,
                help="Per-sample tile budget shared over a sample's images (strategies with max_tiles).",
            ),
            click.option(
                "--max-tokens-per-sample",
                type=click.IntRange(min=1),
                default=None,
                help="Per-sample visual-token budget shared over a sample's images.",
            ),
        ]
    ):
        command = option(command)
    return command


def _error_limit(ctx: click.Context, param: click.Parameter, value: str | None) -> int | tuple[float] | None:
    """`--max-errors`: a count (`50`) or a rate of the inputs processed (`2%`, returned as `(0.02,)`)."""
    if value is None:
        return None
    text = value.strip()
    try:
        if text.endswith("%"):
            rate = float(text[:-1]) / 100
            if 0 <= rate < 1:
                return (rate,)
        elif int(text) >= 0:
            return int(text)
    except ValueError:
        pass
    raise click.BadParameter(f"{value!r} is not a count (e.g. 50) or a percentage below 100 (e.g. 2%)")


def _check_inputs(inputs: tuple[str, ...]) -> None:
    """A local input that does not exist is a usage error (exit 2), like any bad argument."""
    for raw in inputs:
        if is_url(raw) or "{" in raw:
            continue  # remote, pipe: and brace patterns are checked when they are read
        if not os.path.lexists(raw):
            raise click.BadParameter(f"{raw!r} does not exist", param_hint="INPUTS")


def _sources(options: dict[str, Any]) -> SourceOptions:
    return SourceOptions(
        image_field=options.pop("image_field"),
        key_field=options.pop("key_field"),
        image_root=options.pop("image_root"),
    )


def _budget(options: dict[str, Any]) -> Budget:
    return Budget(
        max_tiles=options.pop("max_tiles_per_sample"), max_tokens=options.pop("max_tokens_per_sample")
    )


@cli.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("-s", "--strategy", "strategy_name", required=True, help="Strategy (see `vlmtile strategies`).")
@click.option("--format", "fmt", type=click.Choice(sorted(SINKS)), default="parquet", show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(STORAGE_DTYPES),
    default="float16",
    show_default=True,
    help="Stored pixel dtype; uint8 keeps resized pixels before normalization (read back bit-exact).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes, or Ray tasks at once [default: all cores / all the Ray cluster's CPUs].",
)
@click.option(
    "--executor",
    type=click.Choice(EXECUTORS),
    default="local",
    show_default=True,
    help="local: processes on this machine; ray: one Ray task per shard task, local or on a cluster "
    "(pip install 'vlmtile[ray]'). The output is the same.",
)
@click.option(
    "--ray-address",
    default=None,
    metavar="ADDRESS",
    help="Ray cluster to run on (host:port, ray://host:10001, auto) [default: $RAY_ADDRESS, else a new "
    "local Ray for the run].",
)
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=DEFAULT_SHARD_SIZE,
    show_default=True,
    help="Samples per task (image files, manifests); each tar shard / Parquet file is one task.",
)
@click.option(
    "--shard-bytes",
    type=click.IntRange(min=1),
    default=DEFAULT_SHARD_BYTES,
    show_default=True,
    help="Largest output shard in bytes; a task's output continues in a new shard past it.",
)
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="Shard names: PREFIX-000000.ext.")
@click.option(
    "--no-pixels",
    is_flag=True,
    help="Metadata only: plans, token counts, grids and sample fields; no arrays.",
)
@click.option(
    "--fast",
    is_flag=True,
    help="NOT bit-exact: shrink each image cheaply (JPEG DCT scaling, box reduction) before the "
    "model's resizes; same plans and token counts, pixels within ~40 dB PSNR (docs/performance.md).",
)
@source_options
@click.option(
    "--overwrite", is_flag=True, help="Start again: remove vlmtile output already in the output directory."
)
@click.option("--retry-failed", is_flag=True, help="Process the inputs in _errors.jsonl again.")
@click.option(
    "--max-errors",
    callback=_error_limit,
    default=None,
    metavar="N|P%",
    help="Stop the run once more than N inputs, or more than P% of its inputs (judged from 100 inputs "
    "on), have failed; what is done is kept.",
)
@click.option(
    "--max-image-pixels",
    type=click.IntRange(min=0),
    default=DEFAULT_MAX_IMAGE_PIXELS,
    show_default=True,
    help="Refuse images with more pixels (decompression bombs) before decoding them; 0: no limit.",
)
@click.option(
    "--rank", type=click.IntRange(min=0), default=0, show_default=True, help="This machine's share (0-based)."
)
@click.option(
    "--world-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Machines sharing the output directory; each runs the tasks with index % world-size == rank.",
)
@click.option(
    "--task-timeout",
    type=click.FloatRange(min=1),
    default=DEFAULT_TASK_TIMEOUT,
    show_default=True,
    help="Seconds a worker may go without finishing an input before its task is killed and retried.",
)
@click.option(
    "-q", "--quiet", is_flag=True, help="No progress bar and no summary unless inputs failed (for cron)."
)
@strategy_options
def preprocess_cmd(
    inputs: tuple[str, ...],
    output: str,
    strategy_name: str,
    fmt: str,
    dtype: str,
    workers: int | None,
    executor: str,
    ray_address: str | None,
    shard_size: int,
    shard_bytes: int,
    prefix: str,
    no_pixels: bool,
    fast: bool,
    overwrite: bool,
    retry_failed: bool,
    max_errors: int | tuple[float] | None,
    max_image_pixels: int,
    rank: int,
    world_size: int,
    task_timeout: float,
    quiet: bool,
    **options: Any,
) -> None:
    """Tile INPUTS into Parquet or WebDataset shards.

    Running the same command again on the same OUTPUT resumes an interrupted run and processes only
    inputs that are new, or failed and changed since (size or mtime), the cron use case; different
    settings are refused. `vlmtile verify OUTPUT` checks the result.

    Exit status: 0 done; 3 done, but some inputs failed (see OUTPUT/_errors.jsonl); 1 fatal error or
    stopped early (interrupted, disk full, --max-errors; run again to continue); 2 bad command line.

    INPUTS are image files and folders (walked recursively), WebDataset tar shards (local, folders of
    them, brace patterns, pipe: commands, s3:// gs:// https:// ... with vlmtile[remote]), LLaVA / ms-swift
    JSON or JSONL manifests, and Parquet files with an image column.

    \b
    Examples:
      vlmtile preprocess sample_data/ -o out/ --strategy internvl --max-tiles 6
      vlmtile preprocess 'shards-{000000..000099}.tar' -o out/ -s qwen2.5-vl --format webdataset
      vlmtile preprocess train.jsonl --image-root images/ -o out/ -s internvl --max-tiles-per-sample 12
    """
    _check_inputs(inputs)
    sources = _sources(options)
    budget = _budget(options)
    strategy = build_strategy(strategy_name, options)
    try:
        config = RunConfig(
            inputs=inputs,
            output=output,
            strategy=strategy,
            format=fmt,
            dtype=dtype,
            workers=workers,
            executor=executor,
            ray_address=ray_address,
            shard_size=shard_size,
            shard_bytes=shard_bytes,
            prefix=prefix,
            pixels=not no_pixels,
            fast=fast,
            budget=budget,
            sources=sources,
            overwrite=overwrite,
            progress=not quiet,
            retry_failed=retry_failed,
            max_errors=max_errors if isinstance(max_errors, int) else None,
            max_error_rate=max_errors[0] if isinstance(max_errors, tuple) else None,
            max_image_pixels=max_image_pixels or None,
            rank=rank,
            world_size=world_size,
            task_timeout=task_timeout,
        )
    except VlmtileError as e:  # settings that do not go together: a usage error (exit 2)
        raise click.UsageError(str(e)) from None
    try:
        summary = preprocess(config)
    except RunStopped as e:
        click.echo(f"vlmtile: {e}", err=True)
        click.echo("vlmtile: run the same command again to continue", err=True)
        sys.exit(EXIT_FATAL)
    except VlmtileError as e:
        raise click.ClickException(str(e)) from None
    if not quiet:
        click.echo(summary.line())
    if summary.took_over is not None:  # rare and worth knowing, even under --quiet
        holder = summary.took_over
        click.echo(
            f"vlmtile: warning: an earlier run (pid {holder.get('pid')} on {holder.get('host')}, started "
            f"{holder.get('started')}) was killed; this run finished its work",
            err=True,
        )
    if summary.changed and (not quiet or summary.changed > summary.changed_before):
        where = os.path.join(output, CHANGED)
        click.echo(
            f"vlmtile: warning: {summary.changed:,} input{'s' if summary.changed != 1 else ''} changed after "
            f"they were processed and keep their old records (listed in {where}; --overwrite rebuilds "
            "the directory)",
            err=True,
        )
    if summary.failures:
        # Loud even with --quiet: cron mails stderr, and exit status 3 means "finished, with failures".
        if quiet:
            click.echo(summary.line(), err=True)
        where = os.path.join(output, ERRORS)
        click.echo(f"vlmtile: {summary.failures:,} inputs failed; see {where}", err=True)
        sys.exit(EXIT_FAILURES)


preprocess_cmd.name = "preprocess"


@cli.command("pack", context_settings=CONTEXT)
@click.argument("input_dir", metavar="IN_DIR", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option(
    "--max-seq-len",
    required=True,
    type=click.IntRange(min=1),
    help="Tokens (patch rows) per packed sequence; every sequence has exactly this many.",
)
@click.option(
    "--max-images",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Most images (segments) per sequence, e.g. for per-image pooling slots; 0: no cap.",
)
@click.option(
    "--fit",
    type=click.Choice(FITS),
    default="first",
    show_default=True,
    help="first: first-fit decreasing; best: best-fit decreasing.",
)
@click.option(
    "--split-long",
    is_flag=True,
    help="Cut an image longer than --max-seq-len over several sequences (navit) instead of refusing it.",
)
@click.option(
    "--buffer",
    type=click.IntRange(min=1),
    default=DEFAULT_BUFFER,
    show_default=True,
    help="Images packed together at most (whole input shards); more: less padding, more memory.",
)
@click.option(
    "--buffer-bytes",
    type=click.IntRange(min=1),
    default=DEFAULT_BUFFER_BYTES,
    show_default=True,
    help="Stored bytes packed together at most (what each worker holds in memory).",
)
@click.option(
    "--format", "fmt", type=click.Choice(sorted(PACKED_SINKS)), default="parquet", show_default=True
)
@click.option(
    "--shard-bytes",
    type=click.IntRange(min=1),
    default=DEFAULT_SHARD_BYTES,
    show_default=True,
    help="Largest output shard in bytes.",
)
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="Shard names: PREFIX-000000.ext.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes, one buffer each (memory: workers x --buffer-bytes).",
)
@click.option(
    "--overwrite", is_flag=True, help="Start again: remove vlmtile output already in the output directory."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary unless images failed.")
def pack_cmd(
    input_dir: str,
    output: str,
    max_seq_len: int,
    max_images: int,
    fit: str,
    split_long: bool,
    buffer: int,
    buffer_bytes: int,
    fmt: str,
    shard_bytes: int,
    prefix: str,
    workers: int,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Pack the patch sequences of IN_DIR (a `preprocess` output made with navit or a Qwen-family
    strategy) into sequences of exactly --max-seq-len tokens, NaViT's Patch n' Pack: segment ids, positions
    and cu_seqlens per sequence. Rerunning resumes, and packs input shards added since.

    Exit status: 0 done; 3 done, but some images are in OUTPUT/_errors.jsonl (longer than --max-seq-len);
    1 fatal error or stopped early; 2 bad command line or an input that cannot be packed.

    \b
    Examples:
      vlmtile preprocess photos/ -o tiles/ -s navit --max-patches 256
      vlmtile pack tiles/ -o packed/ --max-seq-len 4096
    """
    try:
        config = PackConfig(
            input=input_dir,
            output=output,
            max_seq_len=max_seq_len,
            max_images=max_images,
            fit=fit,
            split_long=split_long,
            buffer=buffer,
            buffer_bytes=buffer_bytes,
            format=fmt,
            shard_bytes=shard_bytes,
            prefix=prefix,
            workers=workers,
            overwrite=overwrite,
            progress=not quiet,
        )
        open_source(config)
    except VlmtileError as e:  # an input that cannot be packed this way: a usage error (exit 2)
        raise click.UsageError(str(e)) from None
    try:
        summary = pack(config)
    except RunStopped as e:
        click.echo(f"vlmtile: {e}", err=True)
        click.echo("vlmtile: run the same command again to continue", err=True)
        sys.exit(EXIT_FATAL)
    except VlmtileError as e:
        raise click.ClickException(str(e)) from None
    if not quiet:
        click.echo(summary.line())
    if summary.failures:
        if quiet:
            click.echo(summary.line(), err=True)
        where = os.path.join(output, ERRORS)
        click.echo(f"vlmtile: {summary.failures:,} images were not packed; see {where}", err=True)
        sys.exit(EXIT_FAILURES)


@cli.command("verify", context_settings=CONTEXT)
@click.argument("output")
@click.option("--quick", is_flag=True, help="Skip the checksums (sizes, record counts and accounting only).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing when everything is in order.")
def verify_cmd(output: str, quick: bool, quiet: bool) -> None:
    """Check that OUTPUT is complete and intact: every shard in the manifest is there, has its recorded
    size, checksum and record count, and records + error lines = inputs. Exit status 1 on any problem.

    \b
    Example (after the cron job):
      vlmtile preprocess /data/incoming -o /data/tiles -s internvl -q && vlmtile verify /data/tiles --quick -q
    """
    output = local_path(output)
    if not is_url(output) and not os.path.isdir(output):
        raise click.BadParameter(f"{output!r} is not a directory", param_hint="OUTPUT")
    report = verify(output, checksums=not quick)
    for problem in report.problems:
        click.echo(f"vlmtile verify: {problem}", err=True)
    if not quiet or not report.ok:
        for warning in report.warnings:
            click.echo(f"vlmtile verify: warning: {warning}", err=True)
        click.echo(report.line(), err=not report.ok)
    if not report.ok:
        sys.exit(EXIT_FATAL)


@cli.command("merge-manifests", context_settings=CONTEXT)
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory to merge into (created, or extended) [default: the one DIR given].",
)
@click.option("-q", "--quiet", is_flag=True, help="Print nothing unless tasks are missing or inputs failed.")
def merge_cmd(dirs: tuple[str, ...], output: str | None, quiet: bool) -> None:
    """Finish a --rank / --world-size job: one complete output directory, named as a single run would.

    One DIR (the ranks shared it): re-finalize it and check that every planned task is done. Several
    DIRs and -o OUT (each rank wrote its own): bring every finished task's files and records into OUT,
    then name the shards in plan order. Other settings, or ranks that listed other inputs, are refused.
    Exit status: 0 complete; 3 complete, some inputs failed; 1 tasks still missing, or refused.

    \b
    Examples:
      vlmtile merge-manifests /shared/tiles
      vlmtile merge-manifests host-a/tiles host-b/tiles host-c/tiles -o /data/tiles
    """
    try:
        result = merge_manifests(dirs, output)
    except VlmtileError as e:
        raise click.ClickException(str(e)) from None
    summary = result.summary
    if result.pending:
        shown = ", ".join(f"{index} ({inputs[0] if inputs else '-'})" for index, inputs in result.pending[:5])
        more = f" and {len(result.pending) - 5:,} more" if len(result.pending) > 5 else ""
        click.echo(
            f"vlmtile: {len(result.pending):,} planned tasks are in none of the directories: {shown}{more}; "
            "run their ranks again (task i belongs to rank i % world size), then merge",
            err=True,
        )
        click.echo(summary.line(), err=True)
        sys.exit(EXIT_FATAL)
    if not quiet or summary.failures:
        click.echo(summary.line(), err=bool(summary.failures))
    if summary.failures:
        where = os.path.join(summary.output, ERRORS)
        click.echo(f"vlmtile: {summary.failures:,} inputs failed; see {where}", err=True)
        sys.exit(EXIT_FAILURES)


def _convert(value: str, f: dataclasses.Field[Any]) -> Any:
    kind = _field_kind(f)
    if kind == "bool":
        lowered = value.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise click.UsageError(f"{f.name} takes true or false, got {value!r}")
        return lowered in ("true", "1", "yes", "on")
    numbers: dict[str, tuple[Callable[[str], Any], str]] = {
        "int": (int, "an integer"),
        "float": (float, "a number"),
        "ints": (lambda v: parse_number_list(v, int), "integers separated by commas"),
        "floats": (lambda v: parse_number_list(v, float), "numbers separated by commas"),
    }
    if kind in numbers:
        parse, what = numbers[kind]
        try:
            return parse(value)
        except ValueError:
            raise click.UsageError(f"{f.name} takes {what}, got {value!r}") from None
    return value.strip()


def _spec_pairs(rest: str) -> list[str]:
    """`key=value` pieces of a SPEC; a piece without `=` continues the previous value, so that list
    values keep their commas: `navit:sizes=224,256,384,seed=1` -> `sizes=224,256,384`, `seed=1`."""
    pairs: list[str] = []
    for piece in (p.strip() for p in rest.split(",")):
        if not piece:
            continue
        if "=" not in piece and pairs:
            pairs[-1] += "," + piece
        else:
            pairs.append(piece)
    return pairs


def parse_column(spec: str, options: dict[str, Any]) -> Column:
    """`NAME` or `NAME:key=value,key=value` plus the generated options that apply -> a report column."""
    name, _, rest = spec.partition(":")
    try:
        preset = get_preset(name.strip())
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    fields = {f.name: f for f in tunable_fields(preset.cls)}
    params = {k: v for k, v in options.items() if k in fields and v is not None}
    for pair in _spec_pairs(rest):
        key, eq, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in fields:
            raise click.UsageError(
                f"bad strategy parameter {pair!r} in {spec!r}; {preset.name} takes key=value with key "
                f"one of: {', '.join(sorted(fields))}"
            )
        params[key] = _convert(value, fields[key])
    try:
        strategy = get_strategy(preset.name, **params)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    return Column(describe(strategy), strategy)


@cli.command("stats", context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "-s",
    "--strategy",
    "specs",
    multiple=True,
    help="NAME or NAME:key=value,... (repeat to compare side by side), e.g. internvl:max_tiles=6.",
)
@click.option("--budget", type=click.IntRange(min=0), help="Also count images above this many tokens.")
@click.option(
    "--pack-len",
    type=click.IntRange(min=1),
    help="Also estimate `vlmtile pack --max-seq-len N`: padding fraction and images per sequence (navit, "
    "Qwen).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (schema: docs/stats.md).")
@click.option(
    "--plot", type=click.Path(dir_okay=False), help="Write token histograms to this PNG (needs matplotlib)."
)
@click.option(
    "--emit-lengths",
    type=click.Path(dir_okay=False),
    help="Write one JSON line per image (per sample for manifests, tars, Parquet): source, key, sizes, "
    "num_tokens per strategy.",
)
@click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Processes [default: usable cores]."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@source_options
@strategy_options
def stats_cmd(
    inputs: tuple[str, ...],
    specs: tuple[str, ...],
    budget: int | None,
    pack_len: int | None,
    as_json: bool,
    plot: str | None,
    emit_lengths: str | None,
    workers: int | None,
    quiet: bool,
    **options: Any,
) -> None:
    """Visual-token statistics per strategy from image headers only (no decoding), or from a finished
    `preprocess` output directory's metadata.

    \b
    Examples:
      vlmtile stats sample_data/ -s internvl:max_tiles=6 -s internvl -s qwen2.5-vl:max_pixels=1003520
      vlmtile stats out/ --json
    """
    _check_inputs(inputs)
    sources = _sources(options)
    sample_budget = _budget(options)
    outputs = [p for p in inputs if os.path.isdir(p) and is_output_dir(p)]
    try:
        if outputs:
            if len(inputs) != 1 or specs:
                raise click.UsageError(
                    "an output directory is reported alone and with its own strategy: "
                    "give just `vlmtile stats OUT_DIR`"
                )
            result = stats_from_output(
                outputs[0], budget=budget, emit_lengths=bool(emit_lengths), pack_len=pack_len
            )
            _check_pack_len(pack_len, result.columns)
        else:
            if not specs:
                raise click.UsageError("give at least one --strategy (see `vlmtile strategies`)")
            columns = [parse_column(spec, options) for spec in specs]
            labels = [c.label for c in columns]
            repeated = sorted({label for label in labels if labels.count(label) > 1})
            if repeated:
                raise click.UsageError(
                    f"--strategy values {', '.join(repeated)} repeat one configuration; give each once"
                )
            unused = [
                k
                for k, v in options.items()
                if v is not None and not any(k in _field_names(c.strategy) for c in columns)
            ]
            if unused:
                raise click.UsageError(
                    f"--{unused[0].replace('_', '-')} applies to none of the chosen strategies"
                )
            _check_pack_len(pack_len, columns)
            show = not quiet and not as_json and sys.stderr.isatty()
            with tqdm(unit="img", disable=not show, leave=False, dynamic_ncols=True) as bar:
                result = compute_stats(
                    inputs,
                    columns,
                    budget=budget,
                    workers=workers or available_cpus(),
                    emit_lengths=bool(emit_lengths),
                    on_progress=lambda images, tokens: bar.update(images),
                    sources=sources,
                    sample_budget=sample_budget,
                    pack_len=pack_len,
                )
        if emit_lengths:
            write_lengths(emit_lengths, result.lengths)
        if plot:
            plot_histograms(plot, result)
    except VlmtileError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, sort_keys=True))
    else:
        click.echo(format_table(result))


def _check_pack_len(pack_len: int | None, columns: Sequence[Column]) -> None:
    """--pack-len must be a length `pack` accepts for every packable column (whole Qwen merge windows)."""
    for column in columns:
        unit = column.strategy.sequence_unit()
        if pack_len is not None and unit and pack_len % unit:
            raise click.UsageError(
                f"--pack-len must be a multiple of {unit} for {column.label} (one merge window); "
                f"got {pack_len}"
            )


@cli.command("inspect", context_settings=CONTEXT)
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("-s", "--strategy", "strategy_name", required=True, help="Strategy (see `vlmtile strategies`).")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="PNG to write [default: inspect-IMAGE-STRATEGY.png in the current directory].",
)
@strategy_options
def inspect_cmd(image: str, strategy_name: str, output: str | None, **options: Any) -> None:
    """Draw what a strategy does to IMAGE: canvas, tile grid and indices, padding, thumbnail, tokens.

    \b
    Example:
      vlmtile inspect sample_data/coffee_600x400.jpg -s internvl --max-tiles 6 -o coffee.png
    """
    # The file's own key, as `preprocess IMAGE` would give it: per-image draws (navit) match that run.
    strategy = build_strategy(strategy_name, options).for_image(make_key(os.path.basename(image)), 0)
    try:
        picture = inspect_image(load_image(image), strategy)
    except ImageError as e:
        raise click.ClickException(f"{image}: {e}") from None
    except ValueError as e:
        raise click.ClickException(f"{image}: refused by {strategy.name}: {e}") from None
    if output is None:
        stem = os.path.splitext(os.path.basename(image))[0]
        output = f"inspect-{stem}-{strategy.name}.png"
    picture.save(output)
    click.echo(f"{output}: {picture.width}x{picture.height}")


@cli.command(context_settings=CONTEXT)
def strategies() -> None:
    """List the registered strategies with their parameters and defaults."""
    for name in list_strategies():
        preset = get_preset(name)
        click.echo(f"{name}: {preset.description}")
        default = get_strategy(name)
        for f in tunable_fields(preset.cls):
            flag = f"--{f.name.replace('_', '-')}"
            click.echo(f"    {flag} (default {_show(getattr(default, f.name))}): {f.metadata['help']}")


def main() -> None:
    """Console-script entry point."""
    cli()
