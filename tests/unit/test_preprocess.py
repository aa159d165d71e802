"""The package's preprocessing and the runner.py embedded in a bundle give identical arrays."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeport.bundle import assemble_runner
from edgeport.preprocess import InputSpec, default_spec

OV_PART = Path(__file__).resolve().parents[2] / "edgeport" / "backends" / "openvino" / "runner.py"


@pytest.fixture(scope="module")
def runner_module(tmp_path_factory):
    path = tmp_path_factory.mktemp("runner") / "runner.py"
    path.write_text(assemble_runner(OV_PART))
    spec = importlib.util.spec_from_file_location("bundle_runner", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SPECS = [
    InputSpec(shape=(1, 3, 224, 224), resize="shorter-crop"),
    InputSpec(shape=(1, 3, 192, 256), resize="letterbox", pad_value=0, color="BGR", mean=(0, 0, 0), std=(1, 1, 1)),
    InputSpec(shape=(1, 120, 160, 3), layout="NHWC", resize="stretch", interpolation="area"),
    default_spec(),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.resize}-{s.layout}-{s.color}")
def test_runner_and_package_identical_on_camvid(spec, runner_module, camvid):
    files = sorted((camvid / "val").glob("*.png"))[::25]
    assert len(files) >= 4
    for f in files:
        frame = cv2.imread(str(f))
        ours = spec.apply(frame)
        theirs, geom = runner_module.preprocess(frame, spec.to_dict())
        assert ours.shape == spec.shape
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, theirs)
        assert geom["src_hw"] == [360, 480]


def test_normalisation_arithmetic():
    spec = InputSpec(shape=(1, 3, 2, 2), mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    frame = np.zeros((2, 2, 3), np.uint8)
    frame[..., 0] = 255  # blue in BGR
    x = spec.apply(frame)
    # RGB order: channel 2 is blue: (1 - 0.5) / 1.0; red and green: (0 - 0.5) / std
    assert np.allclose(x[0, 2], 0.5) and np.allclose(x[0, 0], -2.0) and np.allclose(x[0, 1], -1.0)


def test_letterbox_geometry_maps_back():
    spec = InputSpec(shape=(1, 3, 100, 100), resize="letterbox")
    frame = np.full((50, 100, 3), 200, np.uint8)
    from edgeport.runner.preprocess import preprocess

    x, geom = preprocess(frame, spec.to_dict())
    assert geom["box"] == [0, 25, 100, 75]
    assert x.shape == (1, 3, 100, 100)


def test_bad_spec_values_are_config_errors():
    from edgeport.errors import ConfigError

    with pytest.raises(ConfigError, match="resize"):
        InputSpec(resize="squash")
    with pytest.raises(ConfigError, match="channels"):
        InputSpec(shape=(1, 1, 32, 32))
