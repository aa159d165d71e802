"""Every option of `edgeport build`, `export` and `validate`, declared once.

A build option is a field of a config dataclass (edgeport.config) whose metadata is a ``Flag``: its help, group,
type, choices, the commands that take it and, for INT8 settings, the backends that read it. From those
declarations come the argparse flags (``add_flags``), the keywords of ``edgeport.api.build``/``export``/
``validate`` (``signature``, ``given``), how a flag's value lands in the config (``configure``), and which INT8
flags a backend honours (``readers``). The flag ``--int8-ignore`` is the field ``int8_ignore`` is the keyword
``int8_ignore`` is the edgeport.toml key ``[quantize] int8_ignore``: one name. A field may list the TOML keys it
had before (``aliases``); they are still read.

The preprocessing flags (``--input``, ``--task``, ``--mean`` ...) set fields of the input spec, whose names are
the manifest's contract (edgeport.preprocess.InputSpec): they are declared here, in ``SPEC``, with the spec field
each one sets.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeport.config import SECTIONS, ProjectConfig, load_config, make_spec, parse_shape, read_labels
from edgeport.errors import ConfigError, close_match
from edgeport.flags import (  # noqa: F401 (the commands and groups, for cli and api)
    ALL,
    BUILD,
    DATA_GROUP,
    EXPORT,
    INT8_GROUP,
    MODEL_GROUP,
    OUTPUT_GROUP,
    VALIDATE,
    VALIDATE_MODEL_GROUP,
    Flag,
)


@dataclass(frozen=True)
class Option:
    """One declared option: its name (flag without dashes, '-' as '_'), where it lands, and its flag."""

    name: str
    section: str  # a ProjectConfig section, "input" (the spec) or "" (not a setting: --config)
    field: str  # the field it sets (the name itself, except for the spec's)
    flag: Flag

    @property
    def dashed(self) -> str:
        """'--int8-ignore'."""
        return "--" + self.name.replace("_", "-")


# The preprocessing flags: option name -> (the InputSpec field it sets, its flag).
SPEC: dict[str, tuple[str, Flag]] = {
    "input": ("shape", Flag("input shape, e.g. 1x3x224x224", MODEL_GROUP, ALL, metavar="SHAPE")),
    "task": ("task", Flag("what the model does", MODEL_GROUP, ALL, choices=None)),  # choices: the tasks (below)
    "class_names": ("labels", Flag("class names, one per line (as many as the model has classes)", MODEL_GROUP, ALL,
                                   metavar="FILE", path=True)),
    "resize": ("resize", Flag("how a frame becomes the input size", MODEL_GROUP, ALL,
                              choices=("stretch", "letterbox", "shorter-crop"))),
    "color": ("color", Flag("channel order the model was trained on", MODEL_GROUP, ALL, choices=("RGB", "BGR"))),
    "mean": ("mean", Flag("per-channel mean, in the 0..1 scale", MODEL_GROUP, ALL, type=float, nargs=3)),
    "std": ("std", Flag("per-channel standard deviation, in the 0..1 scale", MODEL_GROUP, ALL, type=float, nargs=3)),
}
CONFIG = Option("config", "", "", Flag("project config (default: ./edgeport.toml if present)", MODEL_GROUP, ALL))


def options(command: str | None = None) -> list[Option]:
    """Every declared option (of ``command``), in the order the help lists them."""
    from edgeport.tasks import NAMES

    found = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if "flag" in f.metadata:
                found.append(Option(f.name, section, f.name, f.metadata["flag"]))
        if section == "model":  # the model, then how its input is made
            for name, (spec_field, flag) in SPEC.items():
                if name == "task":
                    flag = dataclasses.replace(flag, choices=tuple(NAMES))
                found.append(Option(name, "input", spec_field, flag))
    found.append(CONFIG)
    return [o for o in found if command is None or command in o.flag.commands]


def option(name: str) -> Option:
    """The declared option ``name``."""
    for o in options():
        if o.name == name:
            return o
    raise KeyError(name)


def add_flags(parser: argparse.ArgumentParser, command: str, groups: dict[str, Any] | None = None) -> dict[str, Any]:
    """The declared options of ``command`` as argparse flags, in their groups (made as needed, or taken from
    ``groups``); returns the groups by title."""
    groups = dict(groups or {})
    for o in options(command):
        f = o.flag
        title = f.group
        if command == VALIDATE:  # the same flags read as the reference's and the gate's there
            title = {INT8_GROUP: DATA_GROUP, MODEL_GROUP: VALIDATE_MODEL_GROUP}.get(title, title)
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        kw: dict[str, Any] = {"help": f.help}
        if f.action == "bool":
            kw.update(action=argparse.BooleanOptionalAction, default=None)
        elif f.action == "store_true":
            kw.update(action="store_true", default=None)
        else:
            if f.action:
                kw["action"] = f.action
            for key in ("type", "choices", "metavar", "nargs"):
                if getattr(f, key) is not None:
                    kw[key] = getattr(f, key)
        groups[title].add_argument(o.dashed, dest=o.name, **kw)
    return groups


def signature(command: str, first: list[inspect.Parameter], last: list[inspect.Parameter]) -> inspect.Signature:
    """The api function's signature: ``first``, then every declared option of ``command`` as a keyword (None:
    not given), then ``last``."""
    taken = {p.name for p in first + last}
    params = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=o.flag.python_type)
              for o in options(command) if o.name not in taken]
    return inspect.Signature(first + params + last)


def given(command: str, values: dict[str, Any]) -> dict[str, Any]:
    """The options of ``command`` that ``values`` sets (not None); TypeError for a keyword it does not take, as
    Python says it for any function."""
    known = {o.name for o in options(command)}
    for key in values:
        if key not in known:
            raise TypeError(f"{command}() got an unexpected keyword argument '{key}'{close_match(key, known)}")
    return {k: v for k, v in values.items() if v is not None}


def _here(path: str) -> str:
    """A path given as a flag is relative to the current folder (a config file's paths to its own folder)."""
    return str(Path(path).expanduser().absolute())


def configure(command: str, values: dict[str, Any], cfg: ProjectConfig | None = None) -> ProjectConfig:
    """edgeport.toml (``values["config"]``, else ./edgeport.toml), or ``cfg``, with the options given in ``values``
    applied: the flags win. ConfigError for a value no setting accepts."""
    from edgeport.intake import carried_spec
    from edgeport.preprocess import InputSpec
    from edgeport.zoo import embedded_name, embedded_spec

    values = given(command, values)
    config = values.pop("config", None)
    cfg = cfg or load_config(Path(config) if config else None)
    model = values.pop("model", None)
    if model and model != cfg.model.model:
        cfg.model = dataclasses.replace(cfg.model, model=model, weights=None, name=None)
        if cfg.input == ProjectConfig().input:  # the default model's spec does not carry over
            embedded = embedded_name(model)
            carried = None if embedded else carried_spec(model, cfg.root)
            cfg.input = embedded_spec(embedded) if embedded else carried or make_spec({"name": "input"})
    spec: dict[str, Any] = {}
    touched: set[str] = set()
    for o in options(command):
        if o.name not in values:
            continue
        value = values[o.name]
        if o.flag.path and isinstance(value, str) and "://" not in value:
            value = _here(value)
        if o.section == "input":
            if o.name == "input":
                value = parse_shape(value)
            elif o.name == "class_names":
                value = read_labels(Path(value))
            spec[o.field] = value
            continue
        section = getattr(cfg, o.section)
        if o.flag.extend:
            value = [*getattr(section, o.field), *value]
        setattr(section, o.field, value)
        touched.add(o.section)
    embedded = embedded_name(cfg.model.model)
    own = embedded_spec(embedded) if embedded else carried_spec(cfg.model.model, cfg.root)
    if "task" in spec and own is not None and spec["task"] != own.task:
        raise ConfigError(f"--task {spec['task']}: {cfg.model.model} is a {own.task} model, "
                          "trained so; drop --task (the model brings its own task)")
    if spec:
        cfg.input = make_spec(spec, base=cfg.input, where="flags")
    assert isinstance(cfg.input, InputSpec)
    for name in sorted(touched):
        check = getattr(getattr(cfg, name), "validate", None)
        if check is not None:
            check("flags")
    return cfg
