"""Every option declared once (edgeport.options): each flag of build, export and validate is one config field of the
same name (or, for the preprocessing flags, the input spec's field), one keyword of the api function, one
edgeport.toml key, and the INT8 checks and the backends' cache keys come from the same declarations."""
from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest

from edgeport import api, cli, options
from edgeport.config import SECTIONS, load_config, read_by
from edgeport.preprocess import InputSpec

# Flags of the commands that are not settings of a build: how it reports, what validate adds.
NOT_SETTINGS = {"help", "verbose", "report", "json", "localize", "bench", "paths", "target", "out", "emulate",
                "frames"}


def _flags(command: str) -> dict[str, argparse.Action]:
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices[command]._actions if a.option_strings or a.dest == "paths"}


@pytest.mark.parametrize("command", [options.BUILD, options.EXPORT, options.VALIDATE])
def test_every_flag_is_one_declared_option_and_one_api_keyword(command):
    flags = _flags(command)
    declared = {o.name: o for o in options.options(command)}
    extra = set(flags) - set(declared)
    assert extra <= NOT_SETTINGS | ({"target", "out"} if command == options.EXPORT else set()), extra
    if command == options.BUILD:
        assert {"target", "out"} <= set(declared)  # build's are settings; export's --target/--out are its own
    assert set(declared) <= set(flags)
    for name, o in declared.items():
        assert flags[name].option_strings[0] == o.dashed  # (and --no-accuracy-control beside its flag)
    params = inspect.signature(getattr(api, command)).parameters
    assert set(declared) <= set(params), set(declared) - set(params)
    for name in declared:
        assert params[name].default is None or name == "model"


def test_a_setting_has_its_flags_name_everywhere():
    spec_fields = {f.name for f in dataclasses.fields(InputSpec)}
    for o in options.options():
        if o.section == "input":
            assert o.field in spec_fields, o  # the manifest's contract names the spec's fields
        elif o.section:
            fields = {f.name for f in dataclasses.fields(SECTIONS[o.section])}
            assert o.field == o.name and o.name in fields, o
    names = [o.name for o in options.options()]
    assert len(names) == len(set(names))  # one option, one name


def test_an_option_reads_from_edgeport_toml_under_its_flags_name_and_its_earlier_one(tmp_path):
    values = {"model": "torchvision:resnet18", "calib": "imgs", "int8_ignore": ["head"], "calib_method": "max",
              "int8_subset": 64, "int8_preset": "mixed", "val_images": "val", "target": ["intel-cpu:int8"],
              "max_drop": 0.5}
    for key in ("flag", "alias"):
        lines = {}
        for name, value in values.items():
            o = options.option(name)
            toml_key = o.name if key == "flag" else (o.flag.aliases or (o.name,))[0]
            lines.setdefault(o.section, []).append(f"{toml_key} = {value!r}".replace("'", '"'))
        (tmp_path / "edgeport.toml").write_text("".join(f"[{s}]\n" + "\n".join(v) + "\n" for s, v in lines.items()))
        cfg = load_config(tmp_path / "edgeport.toml")
        for name, value in values.items():
            assert getattr(getattr(cfg, options.option(name).section), name) == value, (key, name)


def test_int8_readers_come_from_the_declarations():
    from edgeport.backends import get_backend

    for backend in ("openvino", "tflite", "tensorrt"):
        reads = get_backend(backend).int8_settings
        assert reads == read_by(backend) and {"int8_subset", "max_drop", "int8_ignore"} <= reads
    assert "calib_method" not in read_by("openvino") and "int8_preset" not in read_by("tflite")


def test_a_keyword_the_api_does_not_take_is_refused_with_a_close_match():
    with pytest.raises(TypeError, match="unexpected keyword argument 'int8_ingore'.*did you mean 'int8_ignore'"):
        api.build(int8_ingore=["x"])
