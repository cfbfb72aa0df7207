"""Reading TOML into typed dataclasses: values coerced to the declared types, unknown keys named with
the closest valid one, ``section.key=value`` overrides applied to the parsed tables, experiment files
read. Every problem is a :class:`ConfigError` with one line."""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from fedlora.core.errors import ConfigError


def help_field(text: str, default: Any) -> Any:
    """A dataclass field with a default and its help text (immutable defaults only)."""
    return dataclasses.field(default=default, metadata={"help": text})


def check(ok: bool, key: str, value: Any, expected: str) -> None:
    """ConfigError ``<key> = <value> is invalid: expected <expected>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid: expected {expected}")


def build(cls: type[Any], data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'experiment'} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(_unknown_key(prefix + key, list(fields)))
        kwargs[key] = coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def _unknown_key(key: str, valid: list[str]) -> str:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key '{key}'{hint}; valid keys here: {', '.join(valid)}"


def coerce(hint: Any, value: Any, key: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build(hint, value, prefix=key + ".")
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r} is invalid: expected a list")
        return [coerce(item, v, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r} is invalid: expected a table")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} is invalid: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r} is invalid: expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r} is invalid: expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r} is invalid: expected a string")
        return value
    if isinstance(hint, types.UnionType) or hint is Any:
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # programming error


NOT_BARE = frozenset("[]{},'\"")
"""Characters a ``--set`` value that is not valid TOML may not hold: it would be a list, a table or a
quoted string gone wrong, never meant as the literal text."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into a key path and a TOML-parsed value.

    A value that is not valid TOML is taken as a bare string (``data.partitioner=iid``) only when it holds
    no brackets, braces, commas or quotes; ``lora.targets=[query,value]`` is an error that shows the
    quoted form, never the one string ``'[query,value]'``.
    """
    if "=" not in text:
        raise ConfigError(f"override '{text}' is invalid: expected section.key=value, e.g. lora.rank=16")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' is invalid: expected section.key=value, e.g. lora.rank=16")
    value = _toml_value(raw)
    if value is None:
        if NOT_BARE.intersection(raw):
            raise ConfigError(f"--set {key}={raw}: the value is not valid TOML; {_toml_hint(key, raw)}")
        value = raw
    return key.split("."), value


def _toml_value(raw: str) -> Any:
    """``raw`` parsed as one TOML value, or None when it is not one."""
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return None
    return parsed["v"] if len(parsed) == 1 else None


def _toml_hint(key: str, raw: str) -> str:
    """How to write ``raw`` as TOML (a best guess): bare words quoted, a list kept a list."""
    if "{" in raw or "}" in raw:
        return f"write tables inline: --set '{key}={{ name = \"text\", number = 1 }}'"
    listed = raw.startswith("[") and raw.endswith("]")
    inner = raw[1:-1] if listed else raw
    items = [item.strip().strip("'\"").strip() for item in inner.split(",")]
    parts = [item if _toml_value(item) is not None else _toml_string(item) for item in items if item]
    value = "[" + ",".join(parts) + "]" if listed or len(parts) != 1 else parts[0]
    return f"quote strings: --set '{key}={value}'"


def _toml_string(text: str) -> str:
    """``text`` as a TOML basic string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to nested dicts (a new dict is returned)."""
    result = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}' is invalid: '{part}' is not a table")
            node = child
        node[path[-1]] = value
    return result


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def read_toml(path: Path) -> dict[str, Any]:
    """Read an experiment file, turning I/O and syntax problems into :class:`ConfigError`."""
    if not path.is_file():
        raise ConfigError(f"experiment file '{path}' not found; pass an existing .toml file (see sims/)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"experiment file '{path}' is not valid TOML: {exc}") from None
