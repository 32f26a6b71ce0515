"""The `vlmtile` command: a thin click layer over the library. The only module that imports click.

Strategy options (`--max-tiles`, `--max-pixels`, ...) are generated from the registered strategies'
parameter definitions, so a new strategy parameter is a CLI option without touching this file.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from .dtypes import STORAGE_DTYPES
from .errors import VlmtileError
from .runner import DEFAULT_SHARD_SIZE, ERRORS, RunConfig, available_cpus, preprocess
from .sinks import SINKS
from .strategies import get_preset, get_strategy, list_strategies
from .strategies.base import tunable_fields

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


def strategy_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add one option per strategy parameter; unset options stay None and leave the preset's default."""
    for name, (f, users) in sorted(_strategy_params().items(), reverse=True):
        flag = "--" + name.replace("_", "-")
        scope = "all strategies" if len(users) == len(list_strategies()) else ", ".join(users)
        defaults = sorted({str(get_strategy(u).params()[name]) for u in users})
        help_text = f"{f.metadata['help']} [{scope}; default {' / '.join(defaults)}]"
        if f.type in (bool, "bool"):
            option = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
        elif f.metadata.get("choices"):
            option = click.option(flag, name, type=click.Choice(f.metadata["choices"]), help=help_text)
        else:
            option = click.option(flag, name, type=int, help=help_text)
        command = option(command)
    return command


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


@cli.command(context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
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
    "--workers", type=click.IntRange(min=1), default=None, help="Worker processes [default: all cores]."
)
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=DEFAULT_SHARD_SIZE,
    show_default=True,
    help="Images per output shard.",
)
@click.option("--overwrite", is_flag=True, help="Replace vlmtile output already in the output directory.")
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
    shard_size: int,
    overwrite: bool,
    quiet: bool,
    **options: Any,
) -> None:
    """Tile INPUTS (image files and folders, walked recursively) into Parquet or WebDataset shards.

    \b
    Example:
      vlmtile preprocess sample_data/ -o out/ --strategy internvl --max-tiles 6
    """
    strategy = build_strategy(strategy_name, options)
    config = RunConfig(
        inputs=inputs,
        output=output,
        strategy=strategy,
        format=fmt,
        dtype=dtype,
        workers=workers or available_cpus(),
        shard_size=shard_size,
        overwrite=overwrite,
        progress=not quiet,
    )
    try:
        summary = preprocess(config)
    except VlmtileError as e:
        raise click.ClickException(str(e)) from None
    if not quiet:
        click.echo(summary.line())
    if summary.failures:
        # Loud even with --quiet: cron mails stderr, and exit status 3 means "finished, with failures".
        if quiet:
            click.echo(summary.line(), err=True)
        where = os.path.join(output, ERRORS)
        click.echo(f"vlmtile: {summary.failures:,} inputs failed; see {where}", err=True)
        sys.exit(EXIT_FAILURES)


preprocess_cmd.name = "preprocess"


@cli.command(context_settings=CONTEXT)
def strategies() -> None:
    """List the registered strategies with their parameters and defaults."""
    for name in list_strategies():
        preset = get_preset(name)
        click.echo(f"{name}: {preset.description}")
        params = get_strategy(name).params()
        for f in tunable_fields(preset.cls):
            click.echo(f"    --{f.name.replace('_', '-')} (default {params[f.name]}): {f.metadata['help']}")


def main() -> None:
    """Console-script entry point."""
    cli()
