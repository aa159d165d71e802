"""The coverage matrix's failure classes, one small model each (the full matrix is scripts/coverage_matrix.py).

* GELU (convnext, vit, swin, maxvit): ONNX Erf, which TFLite's builtins lack; onnx2tf must replace it, and
  its Python API only does so for the lower-case name.
* A dict output (torchvision's segmentation models return {"out": ...}): taken without a wrapper.
"""
from __future__ import annotations

import json
import re

import pytest

from tests.conftest import has, needs_torch, run_cli_offline

pytestmark = [needs_torch, pytest.mark.skipif(not (has("onnx2tf") and has("ai_edge_litert") and has("openvino")),
                                              reason="the tflite and openvino extras are not installed")]

MODELS = '''
import torch
from torch import nn


class Gelu(nn.Module):
    """A convnext-style block: depthwise conv, LayerNorm over channels, exact (Erf) GELU, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.dw = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.norm = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        x = x + self.mlp(self.norm(y)).permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class DictSeg(nn.Module):
    """Segmentation as torchvision writes it: {"out": logits at input size}."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = nn.functional.interpolate(self.head(self.body(x)), size=x.shape[-2:], mode="bilinear",
                                      align_corners=False)
        return {"out": y}


def gelu():
    torch.manual_seed(0)
    return Gelu()


def dict_seg():
    torch.manual_seed(0)
    return DictSeg()
'''


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    proj = tmp_path_factory.mktemp("coverage")
    (proj / "models.py").write_text(MODELS)
    return proj


def _manifest(proj, name):
    return json.loads((proj / "dist" / name / "manifest.json").read_text())


def test_gelu_goes_to_tflite_without_erf(models):
    """Exact GELU reaches TFLite as builtin elementwise ops at FP32 and INT8, within FP32 tolerance. Without the
    rewrite the converter stops at FlexErf (LiteRT cannot run it); with onnx2tf's pseudo-Erf instead, INT8 divides
    by |x| + 1e-11, a divisor quantized to zero (vit_b_16 aborted so)."""
    res = run_cli_offline("build", "--model", "models.py:gelu", "--input", "1x3x64x64", "--task", "classification",
                          "--calib", "synthetic://?n=50", "--target", "raspberry-pi-5:fp32", "--target",
                          "raspberry-pi-5:int8", "--target", "intel-cpu:fp32", "--no-accuracy-control", "-v",
                          cwd=models)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "1 exact GELU pattern(s) rewritten without Erf" in res.stderr
    counted = re.search(r"onnx2tf: converting ops: (\d+) of (\d+)", res.stderr)  # onnx2tf's op counter, read
    assert counted and counted.group(1) == counted.group(2) and int(counted.group(2)) > 5, res.stderr[-3000:]
    parity = _manifest(models, "raspberry-pi-5-fp32")["parity"]["artifact"]["output"]
    assert parity["max_rel"] < 1e-4, parity

    from ai_edge_litert.interpreter import Interpreter

    for bundle, name in (("raspberry-pi-5-fp32", "model_fp32.tflite"), ("raspberry-pi-5-int8", "model_int8.tflite")):
        folder = models / "dist" / bundle
        folder = folder if folder.is_dir() else models / "dist" / "failed" / bundle
        it = Interpreter(model_path=str(folder / name))
        ops = {d["op_name"] for d in it._get_ops_details()}  # noqa: SLF001
        assert "EXP" in ops and "ABS" in ops and not any(op.startswith("Flex") for op in ops), (bundle, ops)


def test_a_dict_output_is_taken_without_a_wrapper(models):
    """A torchvision-style {"out": ...} segmentation model builds for OpenVINO and TFLite, its output named out."""
    res = run_cli_offline("build", "--model", "models.py:dict_seg", "--input", "1x3x64x64", "--task", "segmentation",
                          "--calib", "synthetic://?n=16", "--target", "raspberry-pi-5:fp32", "--target",
                          "intel-cpu:fp32", cwd=models)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    for bundle in ("raspberry-pi-5-fp32", "intel-cpu-fp32"):
        m = _manifest(models, bundle)
        assert [o["name"] for o in m["outputs"]] == ["out"], m["outputs"]
        assert m["parity"]["artifact"]["out"]["max_rel"] < 1e-4
