"""Forward passes before export leave the model as the user gave it: a module that caches tensors on its first
forward (as Ultralytics' Detect head caches its anchors and strides) still exports, and an export failure in
the user's code names the file, the line and the module."""
from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from edgeport.errors import ConversionError  # noqa: E402
from edgeport.export import export_onnx  # noqa: E402
from edgeport.model import first_forward  # noqa: E402
from edgeport.optimize import optimize  # noqa: E402


class CachingHead(torch.nn.Module):
    """Makes a grid on its first forward and keeps it, as a detection head keeps its anchors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.grid: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.grid is None or self.grid.shape != y.shape[2:]:
            self.grid = torch.arange(y.shape[-1], dtype=y.dtype).expand(*y.shape[2:]).clone()
        return y * self.grid


class FailsWhenTraced(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            raise RuntimeError("this head cannot be traced")
        return self.conv(x)


def test_a_head_that_caches_tensors_on_its_first_forward_exports(tmp_path: Path) -> None:
    model = CachingHead().eval()
    x = torch.rand(1, 3, 16, 16)
    first_forward(model, x)
    assert model.grid is not None and not model.grid.is_inference()
    model, _ = optimize(model, x, fold=True)
    names = export_onnx(model, x, tmp_path / "m.onnx", opset=17, input_name="input")
    assert names and (tmp_path / "m.onnx").stat().st_size > 0


def test_the_same_head_after_an_inference_mode_pass_is_what_failed(tmp_path: Path) -> None:
    """The case itself: a pass under torch.inference_mode() leaves an inference tensor the trace cannot save."""
    model = CachingHead().eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        model(x)
    assert model.grid is not None and model.grid.is_inference()
    with pytest.raises(ConversionError, match="Inference tensors"):
        export_onnx(model, x, tmp_path / "m.onnx", opset=17, input_name="input")


def test_an_export_failure_names_the_users_line_and_module(tmp_path: Path) -> None:
    model = FailsWhenTraced().eval()
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ConversionError) as e:
        export_onnx(model, x, tmp_path / "m.onnx", opset=17, input_name="input")
    text = str(e.value)
    assert f"{Path(__file__).name}:" in text and "FailsWhenTraced.forward" in text
    assert "this head cannot be traced" in text and "replace it in the model" not in text
