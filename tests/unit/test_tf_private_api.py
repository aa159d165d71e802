"""The TensorFlow internals TFLite selective quantization stands on are still there, in the form we call them.

edgeport's TFLite float fallback and --int8-ignore use the converter's ``_experimental_calibrate_only``
and ``tensorflow.lite.python.convert.mlir_quantize(..., denylisted_nodes=...)``, the private API TensorFlow's
own quantization debugger uses. A TensorFlow upgrade that renames them fails here, by name, before any
conversion does.
"""
from __future__ import annotations

import inspect

import pytest

from tests.conftest import has

pytestmark = pytest.mark.skipif(not has("tensorflow"), reason="tensorflow not installed")


def test_mlir_quantize_takes_what_edgeport_passes():
    from tensorflow.lite.python import convert

    params = inspect.signature(convert.mlir_quantize).parameters
    assert list(params)[:2] == ["input_data_str", "disable_per_channel"]
    assert {"input_data_type", "output_data_type", "denylisted_nodes"} <= set(params)


def test_the_converter_can_stop_after_calibration():
    from tensorflow.lite.python import lite

    source = inspect.getsource(lite)
    assert "self._experimental_calibrate_only = False" in source  # the attribute exists
    assert "if self._experimental_calibrate_only:" in source and "return calibrated" in source  # and is honoured
