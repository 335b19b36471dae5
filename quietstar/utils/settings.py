"""Typed dataclasses as the one source of command-line flags, YAML settings and ``--help``.

Every command describes its settings as a dataclass whose fields carry a type, a default and a
docstring (the string literal under the field). From it this module makes

* the argparse flags (``--field-name``), with the docstring and default as help, choices from a
  ``Literal``, ``--flag/--no-flag`` for a ``bool``, "none" for an optional value and a
  comma-separated list for a ``tuple[str, ...]``, ``tuple[float, ...]`` or ``tuple[int, ...]`` (``option`` adds what
  the help shows as the default, where the real default is decided later, and the value's name);
* the settings actually given on the command line, as a dict (flags that were not given are
  absent, so a YAML file or a saved run can supply them);
* YAML files of the same names, read and merged.

A nested dataclass field (``TrainConfig.quietstar``) gets its own argument group with flags of
its own field names and lands under its field's name in the dict (and the YAML file).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import math
import os
import textwrap
import types
import typing
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from quietstar.utils.errors import QuietStarInputError


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    docs = {}
    for node, following in itertools.pairwise(tree.body[0].body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


SHOWN_DEFAULT = "shown_default"
METAVAR = "metavar"
OUTPUT = "output"


def option(default: Any = dataclasses.MISSING, *, shown_default: str | None = None,
           metavar: str | None = None, output: Literal["file", "folder"] | None = None) -> Any:
    """A dataclass field with command-line details: ``shown_default`` is what the help gives as
    the default (e.g. "the model's sampled_thought_tokens" for a None that the model resolves),
    ``metavar`` names the value in the usage line, ``output`` marks a path the command writes
    (a file or a folder), which the commands check before any work."""
    metadata: dict[str, Any] = {}
    if shown_default is not None:
        metadata[SHOWN_DEFAULT] = shown_default
    if metavar is not None:
        metadata[METAVAR] = metavar
    if output is not None:
        metadata[OUTPUT] = output
    return dataclasses.field(default=default, metadata=metadata)


def _show(default: Any) -> str:
    """A default as the help shows it (a tuple as its comma-separated items)."""
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return f"{default}"


def _comma_separated(optional: bool, item_type: type = str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        return tuple(item_type(item.strip()) for item in text.split(",") if item.strip())

    convert.__name__ = "comma-separated list"
    return convert


def _converter(hint: Any) -> tuple[Callable[[str], Any] | None, tuple | None, bool]:
    """(string -> value, choices, is_bool) for a field's type hint."""
    optional = False
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if hint is bool:
        return None, None, True
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[1:] == (Ellipsis,):
        item_type = typing.get_args(hint)[0]
        if item_type not in (str, float, int):
            raise TypeError(f"only tuple[str, ...], tuple[float, ...] and tuple[int, ...] are supported as list "
                            f"flags, got {hint}")
        return _comma_separated(optional, item_type), None, False
    choices = None
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        hint = type(choices[0])
    base = {int: int, float: float, str: str}[hint]

    def convert(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        return base(text)

    convert.__name__ = hint.__name__  # argparse names the type in its error messages
    return convert, choices, False


def _nested(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, defaults: Any = None,
                            prefix: str = "", title: str | None = None,
                            exclude: Collection[str] = (), notes: Mapping[str, str] | None = None) -> None:
    """Adds a flag for every field of dataclass ``cls``, in an argument group ``title`` if given
    (nested dataclass fields: a group each), except the fields named in ``exclude`` (whose flags
    the caller adds by hand, e.g. two opposite flags for one bool).

    ``defaults`` (an instance) supplies the defaults shown in the help; fields without a default
    become required flags. ``notes`` (dotted field name -> text, "quietstar.ahead_tokens") adds a
    remark after a field's default, e.g. where that default comes from. Flags not given stay out of the parsed namespace (argparse.SUPPRESS),
    so ``given_settings`` can tell a given value from a default.
    """
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title) if title else parser
    nested = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in exclude:
            continue
        if _nested(hints[f.name]):
            nested.append(f)
            continue
        convert, choices, is_bool = _converter(hints[f.name])
        has_default = defaults is not None or f.default is not dataclasses.MISSING \
            or f.default_factory is not dataclasses.MISSING
        default = (getattr(defaults, f.name) if defaults is not None
                   else f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        doc = docs.get(f.name, "")
        shown = f.metadata.get(SHOWN_DEFAULT, _show(default))
        if (notes or {}).get(prefix + f.name):
            shown = f"{shown}, {notes[prefix + f.name]}"
        help_text = (f"{doc} (default: {shown})" if has_default else doc).replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": prefix + f.name, "default": argparse.SUPPRESS,
                                  "help": help_text, "required": not has_default}
        if is_bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            metavar = f.metadata.get(METAVAR, None if choices else f.name.upper())
            group.add_argument(flag, type=convert, choices=choices, metavar=metavar, **kwargs)
    for f in nested:
        hint = hints[f.name]
        add_dataclass_arguments(parser, hint, getattr(defaults, f.name) if defaults is not None
                                else hint(), prefix=f"{prefix}{f.name}.",
                                title=f"{hint.__name__} (under '{f.name}:' in YAML)", notes=notes)


def given_settings(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The settings of dataclass ``cls`` given on the command line, nested like the YAML file."""
    given: dict[str, Any] = {}
    for key, value in vars(args).items():
        *path, name = key.split(".")
        target, owner = given, cls
        for part in path:
            hints = typing.get_type_hints(owner)
            if part not in hints:
                break
            owner = hints[part]
            target = target.setdefault(part, {})
        else:
            if name in {f.name for f in dataclasses.fields(owner)}:
                target[name] = value
    return given


def parse_dataclass(cls: type, args: argparse.Namespace):
    """An instance of ``cls`` from the flags given (the rest: the dataclass defaults)."""
    return cls(**given_settings(args, cls))


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(f"{key!r} at lines {first} and {second}")
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, where PyYAML silently keeps
    the last value (keys that a merge key ``<<`` brings in may still be overridden)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], line)
                    seen[key] = line
                except TypeError:  # an unhashable key: the constructor below says so
                    continue
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file of settings as a dict; clear errors for a missing, invalid or non-mapping file,
    or one that gives a setting twice."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise QuietStarInputError(f"config file {path} is a folder; give a YAML file") from None
    except UnicodeDecodeError:
        raise QuietStarInputError(f"config file {path} is not UTF-8 text; give a YAML file") from None
    except _DuplicateKey as e:
        raise QuietStarInputError(f"config file {path} gives {e.key!r} twice, at lines {e.first} and {e.second} (YAML "
                                  "would keep the last silently); keep one of them") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise QuietStarInputError(f"config file {path} is not valid YAML: {what}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise QuietStarInputError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``update``, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# ------------------------------------------------------------------------------ typed values
BOOL_SPELLINGS = "true or false (YAML's booleans, unquoted)"


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _typed(hint: Any, value: Any, name: str, finite: bool) -> Any:
    """``value`` as a value of type ``hint`` (converted where that is unambiguous), or a
    ValueError naming the field ``name``, the value and what it accepts."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return None
        if len(args) != 1:
            raise TypeError(f"unsupported type {hint} of {name}")
        hint = args[0]
    if value is None:
        raise QuietStarInputError(f"{name} must be {_type_name(hint)}, not null")
    if _nested(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise QuietStarInputError(f"{name} must be a mapping of {hint.__name__} settings (a section "
                                      f"'{name}:' with settings under it), got {value!r}")
        return value  # check_field_types builds it (its own errors name its class)
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if not any(type(value) is type(c) and value == c for c in choices):  # True is not 1
            raise QuietStarInputError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise QuietStarInputError(f"{name} must be {BOOL_SPELLINGS}, got {value!r}"
                                      + (" (a string: write it unquoted as true or false)"
                                if isinstance(value, str) else ""))
        return value
    if hint in (int, float):
        number = value
        if isinstance(value, str):  # PyYAML reads 3e-5 (no dot) as the string "3e-5"
            try:
                number = float(value.strip())
            except ValueError:
                raise QuietStarInputError(f"{name} must be a number ({hint.__name__}), got {value!r}") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise QuietStarInputError(f"{name} must be a number ({hint.__name__}), got {value!r}")
        if math.isnan(number):
            raise QuietStarInputError(f"{name} must be a number, got NaN")
        if hint is int:
            if isinstance(number, float) and not (math.isfinite(number) and number.is_integer()):
                raise QuietStarInputError(f"{name} must be a whole number (int), got {value!r}")
            return int(number)
        if finite and not math.isfinite(number):
            raise QuietStarInputError(f"{name} must be a finite number, got {value!r}")
        return float(number)
    if hint is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise QuietStarInputError(f"{name} must be a string, got {value!r} ({type(value).__name__}); "
                                      "quote it in YAML")
        return value
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[1:] == (Ellipsis,):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise QuietStarInputError(f"{name} must be a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_typed(item, v, f"{name}[{i}]", finite) for i, v in enumerate(value))
    return value


def check_field_types(obj: Any, infinite_ok: Collection[str] = ()) -> None:
    """Checks every field of the dataclass instance ``obj`` against its type, in place: a number
    given as a string ("3e-5") or an int for a float field becomes a float, an integral float
    for an int field an int, a mapping for a nested dataclass field its instance; anything else
    that does not fit (a string for a bool, 2.5 for an int, a value not among a Literal's
    choices, a scalar where a section belongs) is a ValueError "<Class>: <field> must be ...".
    NaN is refused for every number; inf too, except for the fields named in ``infinite_ok``."""
    hints = typing.get_type_hints(type(obj))
    label = type(obj).__name__
    for f in dataclasses.fields(obj):
        try:
            value = _typed(hints[f.name], getattr(obj, f.name), f.name, finite=f.name not in infinite_ok)
        except ValueError as e:
            raise QuietStarInputError(f"{label}: {e}") from None
        hint = hints[f.name]
        if _nested(hint) and isinstance(value, dict):
            value = hint.from_dict(value) if hasattr(hint, "from_dict") else hint(**value)
        setattr(obj, f.name, value)
