"""Options declared once: a dataclass field holds an option's type, default and help.

    @dataclass(frozen=True)
    class DistillConfig:
        temperature: float = option(2.0, "softmax temperature of the soft targets")

Config files (JSON or TOML) are read into these dataclasses by `from_mapping`, which checks every value
against the field's type (so `steps = "three"` is refused with the key's name instead of failing later),
and the command line's flags are generated from the same fields (lmforge/commands/flags.py). Nothing else
restates a default: a value that is not given is the dataclass's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError, suggest

T = typing.TypeVar("T")


def option(default: Any, help: str, *, choices: Sequence[Any] | None = None, split: bool = True) -> Any:
    """A dataclass field with its help text (and allowed values). `split`: a tuple option given on the command
    line as one comma-separated value (q,k,v) rather than one value per repeated flag (stop strings)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "split": split}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One option as the generators see it: its name, type, default and help."""

    name: str
    kind: type  # int, float, str, Path, bool or tuple (of `item`)
    item: type | None  # element type of a tuple option
    optional: bool  # None is an allowed value
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    split: bool


def _unwrap(annotation: Any) -> tuple[type, type | None, bool]:
    """(kind, item type, optional) of a field annotation such as `int`, `float | None`, `tuple[str, ...]`."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if len(rest) == 1:
            kind, item, _ = _unwrap(rest[0])
            return kind, item, optional
        if set(rest) == {bool, str}:  # early_stopping: True, False or "never"
            return str, None, optional
        raise TypeError(f"unsupported option type {annotation!r}")
    if origin is tuple:
        return tuple, args[0], False
    if annotation in (int, float, str, bool):
        return annotation, None, False
    if annotation is Path:
        return Path, None, False
    raise TypeError(f"unsupported option type {annotation!r}")


def specs(cls: type) -> list[Spec]:
    """The options of dataclass `cls` (its fields declared with `option`), in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or "help" not in f.metadata:
            continue
        kind, item, optional = _unwrap(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append(
            Spec(
                f.name,
                kind,
                item,
                optional,
                default,
                f.metadata.get("help", ""),
                f.metadata.get("choices"),
                f.metadata.get("split", True),
            )
        )
    return out


def _type_name(kind: type) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", Path: "a path"}
    return names.get(kind, kind.__name__)


def _check_scalar(kind: type, value: Any, key: str, where: str) -> Any:
    """`value` as `kind`, or an error naming the key: bools are not numbers, integers have no fraction."""
    ok = False
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:  # numpy integers count (numbers.Integral); bools never do
        ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
        value = int(value) if ok else value
    elif kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
        if ok:
            value = float(value)
            if math.isnan(value):
                raise LmforgeError(f"{where}{key} must be a number, got NaN.")
    elif kind is str:
        ok = isinstance(value, str)
    elif kind is Path:
        ok = isinstance(value, (str, Path))
        value = Path(value) if ok else value
    if not ok:
        raise LmforgeError(f"{where}{key} must be {_type_name(kind)}, got {value!r}.")
    return value


def _from_word(kind: type, word: str, key: str, where: str) -> Any:
    """One item of a comma-separated list, as its type (e.g. the ids in "--eos-token-id 1,2")."""
    if kind in (int, float):
        try:
            return kind(word)
        except ValueError:
            raise LmforgeError(f"{where}{key} must be a list of {kind.__name__}s, got {word!r}.") from None
    return word


def check_value(spec: Spec, value: Any, key: str | None = None, where: str = "") -> Any:
    """A config-file value checked against (and normalised to) the option's type."""
    key = key or spec.name
    if value is None:
        if spec.optional:
            return None
        raise LmforgeError(f"{where}{key} cannot be null; leave it out to use the default ({spec.default!r}).")
    if spec.kind is tuple:
        assert spec.item is not None
        if isinstance(value, str) and spec.split:
            value = [_from_word(spec.item, v.strip(), key, where) for v in value.split(",") if v.strip()]
        elif isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise LmforgeError(f"{where}{key} must be a list of {spec.item.__name__}s, got {value!r}.")
        value = tuple(_check_scalar(spec.item, v, key, where) for v in value)
    elif spec.choices is not None and value in spec.choices:
        pass  # e.g. early_stopping's True / False / "never"
    else:
        value = _check_scalar(spec.kind, value, key, where)
    if spec.choices is not None:
        values = value if isinstance(value, tuple) else (value,)
        bad = [v for v in values if v not in spec.choices]
        if bad:
            allowed = [str(c) for c in spec.choices]
            raise LmforgeError(
                f"{where}{key} must be one of {', '.join(allowed)}, got {bad[0]!r}." + suggest(str(bad[0]), allowed)
            )
    return value


def from_mapping(cls: type[T], values: Mapping[str, Any], where: str = "", prefix: str = "") -> T:
    """Build `cls` from a mapping of option names (with `prefix`, e.g. "lora_") to values; every value is type
    checked, unknown names are refused with a suggestion."""
    by_key = {prefix + s.name: s for s in specs(cls)}
    unknown = sorted(set(values) - set(by_key))
    if unknown:
        hints = "".join(suggest(k, by_key) for k in unknown)
        raise LmforgeError(f"{where}unknown options {unknown}.{hints}")
    kwargs = {by_key[k].name: check_value(by_key[k], v, k, where) for k, v in values.items()}
    return cls(**kwargs)


def validate(obj: Any) -> None:
    """Check every option of a (frozen) dataclass instance against its type, normalising in place (an int
    given for a float, a list for a tuple); call it first in __post_init__."""
    where = f"{type(obj).__name__}: "
    for spec in specs(type(obj)):
        value = check_value(spec, getattr(obj, spec.name), where=where)
        object.__setattr__(obj, spec.name, value)


def split_mapping(values: Mapping[str, Any], cls: type, prefix: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """(the entries that are options of `cls`, the rest)."""
    names = {prefix + s.name for s in specs(cls)}
    return {k: v for k, v in values.items() if k in names}, {k: v for k, v in values.items() if k not in names}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options in a JSON or TOML file: one object (table) of option names to values."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"config file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise LmforgeError(f"cannot parse {path} ({e}); write it as JSON or TOML.") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path} must hold one object of option names and values, got {type(data).__name__}.")
    return data


def to_mapping(obj: Any) -> dict[str, Any]:
    """The options of a dataclass instance as plain JSON-able values (tuples as lists)."""
    out = {}
    for s in specs(type(obj)):
        v = getattr(obj, s.name)
        out[s.name] = list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v
    return out
