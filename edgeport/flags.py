"""How a build option is declared: a ``Flag`` in the metadata of a config dataclass field (``opt``).

edgeport.config declares its fields with these; edgeport.options turns the declarations into argparse flags, api
keywords and the INT8 checks. This module imports nothing of edgeport's, so that both can import it.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

BUILD, EXPORT, VALIDATE = "build", "export", "validate"
MODEL_GROUP = "model and input"
OPTIMISE_GROUP = "optimise and export"
OUTPUT_GROUP = "targets and output"
INT8_GROUP = "INT8 and validation"
DATA_GROUP = "data and checks"
VALIDATE_MODEL_GROUP = ("the reference model (default: --config, ./edgeport.toml, else what the bundles' builds "
                        "recorded)")


@dataclass(frozen=True)
class Flag:
    """How one option appears on the command line and in the api."""

    help: str
    group: str
    commands: tuple[str, ...] = (BUILD,)
    type: Any = None  # argparse's type: a callable from the text
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    nargs: int | str | None = None
    action: str | None = None  # "append" | "store_true" | "bool" (--x / --no-x)
    readers: tuple[str, ...] = ()  # the backends whose INT8 compile reads it: a flag no selected one reads is refused
    int8: bool = False  # it acts on INT8 compiles only: given with no INT8 target, it is refused
    every_target: bool = False  # it must take effect on every selected INT8 target (layers kept in float)
    path: bool = False  # a path: relative to the current folder when given as a flag (to the file's in a config)
    extend: bool = False  # a list the flag adds to (the config's entries stay), instead of replacing
    aliases: tuple[str, ...] = ()  # the edgeport.toml keys it had before; still read

    @property
    def python_type(self) -> str:
        """The keyword's annotation in the api's signature."""
        if self.action in ("store_true", "bool"):
            return "bool | None"
        if self.action == "append" or self.nargs is not None:
            return "list[Any] | None"
        return "Any"


def dashed(name: str) -> str:
    """An option's flag from its field name, for messages: 'max_drop' -> '--max-drop'."""
    return "--" + name.replace("_", "-")


def _field(default: Any, factory: Any, metadata: dict[str, Any]) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def opt(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, flag: Flag) -> Any:
    """A config dataclass field declared with its flag (whose help documents it)."""
    return _field(default, factory, {"flag": flag})


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = dataclasses.MISSING,
            **metadata: Any) -> Any:
    """A config dataclass field with no flag, declared with what it does (``doc``: the configuration reference
    is generated from it) and any other metadata (``readers``, ``aliases``...)."""
    return _field(default, factory, {"doc": doc, **metadata})


def describe(f: dataclasses.Field) -> str:
    """What a config field does: its flag's help, or its declared doc."""
    flag = f.metadata.get("flag")
    return flag.help if flag is not None else f.metadata.get("doc", "")


def positive(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value


def ratio_or_auto(text: str) -> float | str:
    """--prune's value: a number, or auto."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a ratio (e.g. 0.3) nor auto") from None


ALL = (BUILD, EXPORT, VALIDATE)
