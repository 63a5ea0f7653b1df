"""Command-line flags generated from the library's option dataclasses (lmforge/options.py).

Each field becomes `--name-with-dashes` (with a prefix for nested groups, e.g. `--lora-r`), typed from its
annotation, with the field's help and default shown. Flags default to "not given": values come from the
flags given, then from a `--config` file, then from the dataclass itself, so no default is restated here.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.options import Spec, check_value, from_mapping, read_config_file, specs, split_mapping

_BOOL_WORDS = {"true": True, "false": False}


def _parser_for(spec: Spec, flag: str):
    """argparse `type=`: parse one command-line word and check it like a config-file value."""
    kind = spec.item if spec.kind is tuple else spec.kind

    def parse(word: str) -> Any:
        if spec.choices is not None and any(isinstance(c, bool) for c in spec.choices):
            value: Any = _BOOL_WORDS.get(word.lower(), word)
        elif kind is int:
            try:
                value = int(word)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{flag} takes an integer, got {word!r}") from None
        elif kind is float:
            try:
                value = float(word)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{flag} takes a number, got {word!r}") from None
        else:
            value = word  # strings and paths; check_value turns a path option's word into a Path
        return value

    return parse


def _help(spec: Spec) -> str:
    default = spec.default
    if isinstance(default, tuple):
        default = ",".join(map(str, default)) if spec.split else " ".join(map(repr, default))
    shown = "" if default in (None, "", ()) else f" (default: {default})"
    return (spec.help + shown).replace("%", "%%")


def add_options(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    *,
    prefix: str = "",
    exclude: Iterable[str] = (),
    title: str | None = None,
) -> None:
    """One flag per option of dataclass `cls` (all of them but `exclude`), in an argument group."""
    group = parser.add_argument_group(title) if title else parser
    skip = set(exclude)
    for spec in specs(cls):
        if spec.name in skip:
            continue
        dest = prefix + spec.name
        flag = "--" + dest.replace("_", "-")
        common: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": _help(spec)}
        if spec.kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
            continue
        choices = None
        if spec.choices is not None and spec.kind is not tuple and not any(isinstance(c, bool) for c in spec.choices):
            choices = spec.choices
        if spec.kind is tuple:
            # comma-separated (q,k,v) or, for values that may contain commas (stop strings), one per flag
            action = "store" if spec.split else "append"
            group.add_argument(flag, type=str if spec.split else _parser_for(spec, flag), action=action, **common)
        else:
            group.add_argument(flag, type=_parser_for(spec, flag), choices=choices, metavar=None, **common)


def given(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """The options of `cls` given on the command line, keyed with `prefix`."""
    names = {prefix + s.name for s in specs(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


class Options:
    """The values of one command: flags given, over a `--config` file's, over the dataclasses' defaults."""

    def __init__(self, args: argparse.Namespace, config_file: str | None = None) -> None:
        self.args = args
        self.file = read_config_file(config_file) if config_file else {}
        self.where = f"{config_file}: " if config_file else ""
        self._used: set[str] = set()
        self._known: set[str] = set()  # every option name the command asked for, for suggestions

    def build(self, cls: type, prefix: str = "") -> Any:
        """An instance of `cls` from the file's entries for it, overridden by the flags given."""
        from_file, _ = split_mapping(self.file, cls, prefix)
        flags = given(self.args, cls, prefix)
        self._used |= set(from_file) | set(flags)
        spec_by_key = {prefix + s.name: s for s in specs(cls)}
        self._known |= set(spec_by_key)
        checked = {k: check_value(spec_by_key[k], v, k, self.where) for k, v in from_file.items()}
        checked.update({k: check_value(spec_by_key[k], v, "--" + k.replace("_", "-")) for k, v in flags.items()})
        return from_mapping(cls, checked, prefix=prefix)

    def given_keys(self, cls: type, prefix: str = "") -> set[str]:
        """The options of `cls` set by a flag or in the config file."""
        return set(given(self.args, cls, prefix)) | set(split_mapping(self.file, cls, prefix)[0])

    def value(self, name: str, default: Any = None) -> Any:
        """A command's own argument (--model, --data, ...): the flag, else the file's entry."""
        self._used.add(name)
        self._known.add(name)
        flag = getattr(self.args, name, None)
        return flag if flag is not None else self.file.get(name, default)

    def require(self, *names: str) -> list[Any]:
        values = [self.value(n) for n in names]
        missing = [n for n, v in zip(names, values, strict=True) if v in (None, "")]
        if missing:
            flags = ", ".join("--" + m.replace("_", "-") for m in missing)
            raise LmforgeError(f"missing {flags} (give {'it' if len(missing) == 1 else 'them'} or set in --config).")
        return values

    def check_file_used(self) -> None:
        """Refuse config-file keys that no part of the command took (a typo would otherwise be ignored)."""
        unknown = sorted(set(self.file) - self._used)
        if unknown:
            from lmforge.errors import suggest

            hints = "".join(suggest(k, self._known) for k in unknown)
            raise LmforgeError(f"{self.where}unknown options {unknown}.{hints}")
