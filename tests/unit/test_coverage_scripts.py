"""scripts/coverage_zoo.py and scripts/coverage_matrix.py: every factory resolves, a re-initialised model is well
conditioned and depends on its input, and the matrix formats cells and errors."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name: str):
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


def test_every_model_has_a_factory():
    zoo = _load("coverage_zoo")
    assert len(zoo.MODELS) == 20
    for name in zoo.MODELS:
        assert callable(getattr(zoo, name)), name
    with pytest.raises(AttributeError):
        zoo.not_a_model  # noqa: B018


def test_a_reinitialised_model_depends_on_its_input_and_is_well_conditioned():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from edgeport.optimize import float32_error

    zoo = _load("coverage_zoo")
    model = zoo.squeezenet1_1()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x)
    assert float((y[0] - y[1]).abs().max()) > 1e-3 * float(y.abs().max())
    assert float32_error(model, x[:1]) < 1e-5


def test_matrix_cells_and_markdown():
    matrix = _load("coverage_matrix")
    report = {"targets": [{"target": "intel-cpu", "precision": "fp32", "status": "built", "verdict": "passed",
                           "parity": {"output": {"max_rel": 3e-7, "agreement": 1.0}}},
                          {"target": "intel-cpu", "precision": "int8", "status": "failed", "verdict": "failed",
                           "parity": {"output": {"max_rel": 0.1, "agreement": 0.62}}}],
              "stages": [{"stage": "compile openvino fp32", "seconds": 1.2}], "export_parity": {}}
    rows = matrix.cells("m", report, ["openvino"], ["fp32", "int8"])
    assert matrix.cell_text(rows[0]) == "3.0e-07, 1 s" and matrix.cell_text(rows[1]) == "62 % agree"
    broken = matrix.cells("m", {"error": "error: x | y"}, ["openvino"], ["fp32"])
    assert matrix.cell_text(broken[0]) == "FAILED: error: x / y"
    table = matrix.markdown(rows, ["openvino"], ["fp32", "int8"])
    assert table.splitlines()[0] == "| model | openvino fp32 | openvino int8 |" and "| m | 3.0e-07, 1 s |" in table
