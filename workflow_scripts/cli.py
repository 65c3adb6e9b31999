"""Command-line plumbing shared by the stage modules and the rules.

Stage parameters are dataclasses; each field becomes a `--flag` so that a rule
and a person at a shell call a stage the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import shlex
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIGURE_FILES_HELP = "the figure's files, each in the format its suffix names (.png, .svg)"


def _parse_optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "null", "learned") else float(text)


def _argument_type(field: dataclasses.Field):
    default_type = type(field.default)
    if default_type is bool:
        return lambda text: text.lower() in ("1", "true", "yes")
    if field.type in ("float | None", "Optional[float]"):
        return _parse_optional_float
    if field.type in ("str | None", "Optional[str]"):
        return lambda text: None if text.lower() in ("none", "null") else text
    return default_type


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    for field in dataclasses.fields(cls):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=_argument_type(field),
            default=field.default,
            help=f"(default: {field.default})",
        )


def dataclass_from_args(cls: type[T], args: argparse.Namespace | Mapping[str, Any]) -> T:
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in values.items() if name in names})


def to_cli_flags(values: Mapping[str, Any]) -> str:
    """Render a mapping as shell-quoted `--flag value` pairs (None renders as 'none'), in name order.

    Name order makes the flags independent of the order of the config's keys (rules record them as params).
    """
    parts = []
    for name, value in sorted(values.items()):
        text = "none" if value is None else str(value)
        parts.append(f"--{name.replace('_', '-')} {shlex.quote(text)}")
    return " ".join(parts)


def keyed_files(items: list[str], flag: str, *, repeatable: bool = False) -> dict[str, Any]:
    """Parse `KEY=FILE` arguments of a repeatable `--flag` into {key: file} (or {key: [files]} if `repeatable`).

    Rules hand scripts every file by name this way (`keyed_flags` in rules/common.smk), rather than a folder to
    build names in.
    """
    files: dict[str, Any] = {}
    for item in items:
        key, sep, file = item.partition("=")
        if not sep or not key or not file:
            raise SystemExit(f"--{flag} {item!r}: expected KEY=FILE")
        if repeatable:
            files.setdefault(key, []).append(file)
        elif key in files:
            raise SystemExit(f"--{flag}: key {key!r} given twice")
        else:
            files[key] = file
    return files


def add_keyed_file_arguments(parser: argparse.ArgumentParser, helps: Mapping[str, str], metavar: str) -> None:
    """A required, repeatable `--NAME KEY=FILE` argument per name in `helps` (name -> help text)."""
    for name, help_text in helps.items():
        parser.add_argument(f"--{name}", action="append", required=True, metavar=metavar, help=help_text)


def parsed_keyed_files(args: argparse.Namespace, flag: str, *, repeatable: bool = False) -> dict[str, Any]:
    """`keyed_files` of the values parsed for `--flag` (an argument `add_keyed_file_arguments` added)."""
    return keyed_files(getattr(args, flag.replace("-", "_")), flag, repeatable=repeatable)


def add_figure_outputs(parser: argparse.ArgumentParser, *flags: str) -> None:
    """A required `--FLAG FILE [FILE ...]` argument per flag: one figure, saved in each file's format."""
    for flag in flags:
        parser.add_argument(f"--{flag}", nargs="+", required=True, metavar="FILE", help=FIGURE_FILES_HELP)


def run_stage(parser: argparse.ArgumentParser, argv: list[str] | None, stage: Callable, **dests: str) -> None:
    """Parse `argv`, log at INFO and call `stage` with the parsed arguments, matched to its parameters by name.

    `dests` names the argparse dest of each parameter whose name differs from its flag's (model_path="model").
    Passing by name keeps a new flag from silently shifting the ones after it, as positional calls would.
    """
    values = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    stage(**{name: values[dests.get(name, name)] for name in inspect.signature(stage).parameters})
