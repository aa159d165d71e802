"""Config files and device profiles: unknown keys and bad values name key, file and a close match."""
from __future__ import annotations

import pytest

from edgeport.config import load_config
from edgeport.errors import ConfigError
from edgeport.target import all_targets, get_target, parse_target

REQUIRED = {"jetson-nano", "jetson-xavier-nx", "jetson-orin-nano", "jetson-agx-orin", "intel-cpu", "intel-igpu",
            "intel-npu", "raspberry-pi-5", "raspberry-pi-4", "android-arm64"}


def test_every_profile_loads_with_the_right_runtime():
    targets = all_targets()
    assert REQUIRED <= set(targets)
    assert targets["jetson-nano"].runtime["tensorrt"].startswith("8.2")
    assert targets["jetson-nano"].runtime["python"] == "3.6"
    assert targets["jetson-nano"].opset_max == 13
    assert targets["jetson-xavier-nx"].runtime["tensorrt"].startswith("8.5")
    assert targets["jetson-orin-nano"].runtime["tensorrt"].startswith("10.3")
    assert {t.backend for t in targets.values()} == {"tensorrt", "openvino", "tflite"}
    for t in targets.values():
        assert t.default_precision in t.precisions
        assert t.tolerances(t.default_precision)


def test_unknown_target_suggests(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'intel-cpu'"):
        get_target("intel-cpus", tmp_path)


def test_project_profile_added_and_checked(tmp_path):
    (tmp_path / "targets").mkdir()
    src = get_target("intel-cpu").path
    text = open(src).read()
    (tmp_path / "targets" / "my-nuc.toml").write_text(text)
    assert "my-nuc" in all_targets(tmp_path)
    (tmp_path / "targets" / "bad.toml").write_text(text.replace("opset_max", "opset_maxx"))
    with pytest.raises(ConfigError, match="unknown key 'opset_maxx'.*did you mean 'opset_max'"):
        parse_target(tmp_path / "targets" / "bad.toml")


def test_unknown_config_key_names_file_and_match(tmp_path):
    cfg = tmp_path / "edgeport.toml"
    cfg.write_text('[model]\nsource = "torchvision:resnet18"\n\n[export]\nopest = 13\n')
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    msg = str(e.value)
    assert str(cfg) in msg and "export.opest" in msg and "did you mean 'opset'" in msg


def test_bad_config_value_named(tmp_path):
    cfg = tmp_path / "edgeport.toml"
    cfg.write_text('[export]\nopset = "thirteen"\n')
    with pytest.raises(ConfigError, match="export.opset"):
        load_config(cfg)
    cfg.write_text('[preprocess]\nresize = "squash"\n')
    with pytest.raises(ConfigError, match="resize"):
        load_config(cfg)
    cfg.write_text('[bulid]\ntargets = []\n')
    with pytest.raises(ConfigError, match="did you mean 'build'"):
        load_config(cfg)


def test_full_config_round_trip(tmp_path):
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    cfg = tmp_path / "edgeport.toml"
    cfg.write_text('[model]\nsource = "torchvision:resnet18?num_classes=2"\n[input]\nshape = [1, 3, 64, 64]\n'
                   '[preprocess]\nresize = "letterbox"\npad_value = 0\n[task]\ntype = "classification"\n'
                   'labels_file = "labels.txt"\n[calibration]\nsource = "imgs"\n[build]\n'
                   'targets = ["intel-cpu:fp32"]\n')
    c = load_config(cfg)  # the keys' earlier names (source, targets) are still read
    assert c.input.shape == (1, 3, 64, 64) and c.input.resize == "letterbox" and c.input.labels == ["cat", "dog"]
    assert c.build.target == ["intel-cpu:fp32"] and c.resolve(c.calibration.calib) == tmp_path / "imgs"
    assert c.model.model == "torchvision:resnet18?num_classes=2"
    cfg.write_text('[model]\nmodel = "torchvision:resnet18"\n[calibration]\ncalib = "imgs"\n[build]\n'
                   'target = ["intel-cpu:int8"]\n[quantize]\nint8_ignore = ["head"]\ncalib_method = "max"\n'
                   'int8_subset = 64\nint8_preset = "mixed"\n[validation]\nval_images = "val"\n')
    c = load_config(cfg)  # the flags' names
    assert c.model.model == "torchvision:resnet18" and c.build.target == ["intel-cpu:int8"]
    q = c.quantize
    assert (q.int8_ignore, q.calib_method, q.int8_subset, q.int8_preset) == (["head"], "max", 64, "mixed")
    assert c.validation.val_images == "val"
    cfg.write_text('[quantize]\nint8_ignore = ["a"]\nignored_patterns = ["b"]\n')
    with pytest.raises(ConfigError, match="'quantize.int8_ignore' is set twice \\(also as 'ignored_patterns'"):
        load_config(cfg)
