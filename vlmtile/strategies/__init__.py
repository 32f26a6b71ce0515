"""The strategy registry: preset name -> (strategy class, preset params). Presets are data.

Every strategy module is imported explicitly below and lists its presets in `PRESETS`; a duplicate name
or alias is an error at import time, never a silent overwrite.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import deepseek, internvl, llava, navit, qwen, xcomposer
from .base import Plan, Preset, Result, Strategy, tunable_fields

__all__ = [
    "Plan",
    "Preset",
    "Result",
    "Strategy",
    "describe",
    "get_preset",
    "get_strategy",
    "list_strategies",
    "register_preset",
]


_PRESETS: dict[str, Preset] = {}
_ALIASES: dict[str, str] = {}


def _alias_key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def register_preset(preset: Preset) -> None:
    """Add a preset; its name, its aliases and their dash-less spellings must all be new."""
    if preset.name in _PRESETS:
        raise ValueError(f"strategy {preset.name!r} is already registered")
    field_names = {f.name for f in dataclasses.fields(preset.cls)}
    unknown = set(preset.params) - field_names
    if unknown:
        raise ValueError(f"preset {preset.name!r} sets unknown fields {sorted(unknown)}")
    keys = {_alias_key(preset.name)} | {_alias_key(a) for a in preset.aliases}
    for key in keys:
        if key in _ALIASES:
            raise ValueError(f"alias {key!r} of {preset.name!r} already names {_ALIASES[key]!r}")
    _PRESETS[preset.name] = preset
    for key in keys:
        _ALIASES[key] = preset.name


def list_strategies() -> list[str]:
    """Canonical names of every registered strategy, sorted."""
    return sorted(_PRESETS)


def get_preset(name: str) -> Preset:
    """Look a preset up by canonical name or alias (case, '-' and '_' do not matter)."""
    canonical = _ALIASES.get(_alias_key(name))
    if canonical is None:
        raise ValueError(f"unknown strategy {name!r}; valid strategies: {', '.join(list_strategies())}")
    return _PRESETS[canonical]


def get_strategy(name: str, **params: Any) -> Strategy:
    """Build a strategy from a preset plus user parameters (`max_tiles=6`, `max_pixels=1003520`, ...).

    Only tunable parameters are accepted: fixed ones (patch size, mean/std) define the model, so changing
    them is a new preset, not a knob.
    """
    preset = get_preset(name)
    tunable = {f.name for f in tunable_fields(preset.cls)}
    unknown = sorted(set(params) - tunable)
    if unknown:
        raise ValueError(
            f"strategy {preset.name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"valid parameters: {', '.join(sorted(tunable))}"
        )
    return preset.cls(**{**preset.params, **params, "name": preset.name})


def describe(strategy: Strategy) -> str:
    """`name`, or `name[key=value,...]` listing the tunable parameters that differ from the preset.

    One label per configuration, used by `stats` columns, `--emit-lengths` keys and `inspect` captions.
    """
    preset = get_preset(strategy.name)
    default = get_strategy(preset.name)
    changed = [
        f"{f.name}={_label(getattr(strategy, f.name))}"
        for f in tunable_fields(preset.cls)
        if getattr(strategy, f.name) != getattr(default, f.name)
    ]
    return f"{preset.name}[{','.join(changed)}]" if changed else preset.name


def _label(value: Any) -> Any:
    """A parameter as `params()` records it (tuples as lists), so labels read as they always have."""
    return list(value) if isinstance(value, tuple) else value


for _module in (internvl, qwen, llava, deepseek, xcomposer, navit):
    for _preset in _module.PRESETS:
        register_preset(_preset)
