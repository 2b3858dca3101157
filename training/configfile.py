"""TOML tables → frozen dataclasses, checked key by key.

Shared by the node's `config.toml` and training's `train.toml`, so both refuse unknown
keys and wrong types the same way, naming the key (`node.port`, `optimizer.lr`). A value
type that checks itself (an enum, a `str` subclass, a dataclass whose constructor raises
ValueError) is built here, once, where the value is parsed; nothing downstream checks it
again.
"""

from __future__ import annotations

import dataclasses
import enum
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from training.errors import ConfigError

__all__ = ["read_toml", "section_from_table", "anchor_paths"]


def _convert(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against the field's type and convert paths, tuples and value types."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value == "" and Path in options:
            return None  # an empty path means "not set"
        return _convert(key, value, options[0])
    if annotation is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a path string, got {value!r}")
        return Path(value).expanduser()
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_type, _ellipsis) = typing.get_args(annotation)
        return tuple(_convert(f"{key}[{i}]", v, item_type) for i, v in enumerate(value))
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return annotation(value)
        except ValueError:
            choices = ", ".join(str(member.value) for member in annotation)
            raise ConfigError(f"{key} must be one of {choices}, got {value!r}") from None
    if isinstance(annotation, type) and issubclass(annotation, str):  # a string that checks itself
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        try:
            return annotation(value)
        except ValueError as exc:  # its message reads "must be …, got …"
            raise ConfigError(f"{key} {exc}") from None
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return section_from_table(annotation, key, value)
    raise ConfigError(f"{key}: unsupported setting type {annotation!r}")  # a bug, not a user error


def section_from_table(cls: type, key: str, table: Any) -> Any:
    """A frozen dataclass from one TOML table; unknown keys, bad types and values the
    dataclass refuses (ValueError from its constructor) all name the key."""
    if not isinstance(table, dict):
        raise ConfigError(f"[{key}] must be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {key}.{unknown[0]}; known keys of [{key}]: {', '.join(sorted(known))}"
        )
    values = {name: _convert(f"{key}.{name}", v, hints[name]) for name, v in table.items()}
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in table
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ConfigError(f"[{key}] is missing keys: {', '.join(missing)}")
    try:
        return cls(**values)
    except ValueError as exc:  # the dataclass checks its own values and names the field
        raise ConfigError(f"{key}.{exc}") from None


def anchor_paths(section: Any, base: Path) -> Any:
    """Relative paths of a section → paths inside the config file's folder."""
    changes = {
        f.name: base / value
        for f in dataclasses.fields(section)
        if isinstance(value := getattr(section, f.name), Path) and not value.is_absolute()
    }
    return dataclasses.replace(section, **changes) if changes else section


def read_toml(path: Path, hint: str = "") -> dict[str, Any]:
    """A TOML file as a dict; ConfigError naming the file when it cannot be read."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found{hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc

