"""Every --model form, --weights checkpoints, and the errors for each bad input."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from edgeport.errors import ModelError  # noqa: E402
from edgeport.model import load_model  # noqa: E402

FACTORY = '''
import torch
from torch import nn

def make(num_classes=3):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

NOT_CALLABLE = 3
'''


@pytest.fixture()
def factory_file(tmp_path):
    p = tmp_path / "mynet.py"
    p.write_text(FACTORY)
    return p


def test_torchvision_with_kwargs():
    m = load_model("torchvision:resnet18?num_classes=10")
    assert m.fc.out_features == 10 and not m.training


def test_torchvision_refuses_downloads_and_unknown_names():
    with pytest.raises(ModelError, match="never downloads"):
        load_model("torchvision:resnet18?weights='DEFAULT'")
    with pytest.raises(ModelError, match="did you mean 'resnet18'"):
        load_model("torchvision:resnet81")


def test_file_and_module_factories(factory_file, tmp_path, monkeypatch):
    m = load_model(f"{factory_file}:make")
    assert isinstance(m, nn.Sequential) and not m.training
    monkeypatch.syspath_prepend(str(tmp_path))
    m2 = load_model("mynet:make", root=tmp_path)
    assert m2[-1].out_features == 3


def test_torchscript_and_export(factory_file, tmp_path):
    m = load_model(f"{factory_file}:make")
    x = torch.randn(1, 3, 16, 16)
    ts = tmp_path / "m.pt"
    torch.jit.trace(m, x).save(str(ts))
    assert torch.allclose(load_model(str(ts))(x), m(x), atol=1e-6)
    pt2 = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(m, (x,)), str(pt2))
    exported = load_model(str(pt2))
    assert torch.allclose(exported(x), m(x), atol=1e-6)
    pytest.importorskip("onnx")
    from edgeport.export import export_onnx  # the exporter sets the module's mode, which torch.export's refuses

    export_onnx(exported, x, tmp_path / "m.onnx", opset=17, input_name="input", simplify=False)
    assert (tmp_path / "m.onnx").stat().st_size > 0


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model_state_dict", "model", "dataparallel"])
def test_weights_from_checkpoints(factory_file, tmp_path, wrap):
    src = load_model(f"{factory_file}:make")
    sd = src.state_dict()
    if wrap == "dataparallel":
        obj = {f"module.{k}": v for k, v in sd.items()}
    elif wrap == "plain":
        obj = sd
    else:
        obj = {wrap: sd, "epoch": 3, "optimizer": {}}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    m = load_model(f"{factory_file}:make", weights=str(path))
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(m(x), src.eval()(x))


def test_weights_mismatch_names_keys_and_shapes(factory_file, tmp_path):
    sd = load_model(f"{factory_file}:make").state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["0.bias"]
    sd["5.weight"] = torch.zeros(7, 8)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ModelError) as e:
        load_model(f"{factory_file}:make", weights=str(tmp_path / "bad.pth"))
    msg = str(e.value)
    assert "missing 1: 0.bias" in msg and "unexpected 1: extra.weight" in msg
    assert "5.weight (7, 8) vs model (3, 8)" in msg


@pytest.mark.parametrize("source,match", [
    ("nope/missing.py:make", "does not exist"),
    ("missing.pt", "does not exist"),
    ("{f}:mkae", "has no 'mkae'.*did you mean 'make'"),
    ("{f}:NOT_CALLABLE", "not callable"),
    ("no_such_pkg_xyz.mod:make", "cannot import module"),
    ("not a model", "expected torchvision"),
])
def test_bad_model_sources(source, match, factory_file):
    with pytest.raises(ModelError, match=match):
        load_model(source.format(f=factory_file))


class _DictSeg(nn.Module):
    """A segmentation model as torchvision writes them: a dict of outputs, the main one first."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head, self.aux = nn.Conv2d(8, 5, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        f = self.body(x)
        return {"out": self.head(f), "aux": self.aux(f)}


def test_dict_outputs_are_taken_without_a_wrapper(tmp_path):
    """A model returning {"out": ..., "aux": ...} exports with those output names, its BN folds, and the
    PyTorch reference is read per key (this crashed with "'dict' object has no attribute 'float'")."""
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnxruntime as ort

    from edgeport.export import export_onnx, torch_outputs
    from edgeport.optimize import fold_bn

    torch.manual_seed(0)
    model = _DictSeg().eval()
    example = torch.randn(1, 3, 16, 16)
    folded, n, err = fold_bn(model, example)
    assert n == 1 and err < 1e-5
    names = export_onnx(folded, example, tmp_path / "m.onnx", opset=17, input_name="x")
    assert names == ["out", "aux"]
    x = np.random.default_rng(0).normal(size=(3, 3, 16, 16)).astype(np.float32)
    ref = torch_outputs(model, x, names)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["out", "aux"]
    for i in range(len(x)):
        got = dict(zip(names, sess.run(names, {"x": x[i:i + 1]})))
        for name in names:
            np.testing.assert_allclose(got[name][0], ref[name][i], atol=1e-4)


def test_torchvision_detectors_load_without_downloads_as_backbone_and_head():
    """torchvision:ssdlite... never asks for ImageNet backbone weights, and comes wrapped: raw head outputs, the
    anchors for the input size carried for the manifest."""
    import torch

    from edgeport.errors import ModelError
    from edgeport.model import load_model
    from edgeport.zoo.tvdet import HeadExport

    model = load_model("torchvision:ssdlite320_mobilenet_v3_large?num_classes=4")
    assert isinstance(model, HeadExport)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 320, 320))
    assert list(out) == ["boxes", "scores"] and out["boxes"].shape == (1, 3234, 4) and out["scores"].shape[-1] == 4
    opts = model.edgeport_task_options
    assert opts["decoder"] == "anchors" and len(opts["anchors"]) == 3234 and opts["background"] == 0
    with pytest.raises(ModelError, match="never downloads weights; drop 'weights_backbone='"):
        load_model("torchvision:ssdlite320_mobilenet_v3_large?weights_backbone=DEFAULT")
