"""Each distinct artifact is compiled once: targets that share it share the compile, and a setting one target
reads rebuilds only what it changes (its bundle, or its compile)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, has, needs_openvino, needs_torch, run_cli

pytestmark = [needs_torch, needs_openvino]
TFLITE = ["raspberry-pi-4:int8", "raspberry-pi-5:int8", "arm64-linux:int8"] if has("onnx2tf") else []
TARGETS = [*TFLITE, "jetson-orin-nano:int8", "jetson-xavier-nx:int8", "intel-cpu:int8", "intel-npu:int8"]


def _build(proj: Path) -> dict:
    res = run_cli("build", *[a for t in TARGETS for a in ("--target", t)], "--json", cwd=proj)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def _status(report: dict) -> dict[str, str]:
    return {f"{t['target']}-{t['precision']}": t["status"] for t in report["targets"]}


def _profile(proj: Path, name: str, old: str, new: str) -> None:
    """A project profile that overrides the built-in one with one setting changed."""
    (proj / "targets").mkdir(exist_ok=True)
    text = (ROOT / "targets" / f"{name}.toml").read_text()
    assert old in text
    (proj / "targets" / f"{name}.toml").write_text(text.replace(old, new))


def test_shared_artifacts_compile_once_and_a_setting_rebuilds_only_its_target(default_project, tmp_path):
    proj = tmp_path / "proj"
    for stage in ("calibration", "export"):  # the shared stages come from the cache
        shutil.copytree(default_project[0] / "build" / stage, proj / "build" / stage)
    first = _build(proj)
    distinct = 3 + bool(TFLITE)  # TFLite INT8 (3 ARM targets), TensorRT INT8 (2 Jetsons), OpenVINO CPU and NPU
    assert first["compiles"] == first["artifacts"] == distinct, first["stages"]
    assert set(_status(first).values()) == {"built"} and len(first["targets"]) == len(TARGETS)
    # measured once for both TensorRT profiles: percentile, and (the build has the embedded model's labelled scenes,
    # so it chooses between methods) max, which the percentile pass gives at no cost
    ranges = [s for s in first["stages"] if "ranges" in s["stage"]]
    assert [s["stage"].split("(")[1] for s in ranges] == ["percentile)", "max)"], ranges
    assert not any(s["cached"] for s in ranges)

    dist = proj / "dist"
    manifests = {p.parent.name: json.loads(p.read_text()) for p in dist.glob("*/manifest.json")}
    if TFLITE:
        arm = [manifests[t.replace(":", "-")] for t in TFLITE]
        assert len({m["provenance"]["artifact_key"] for m in arm}) == 1
        assert len({m["files"]["model_int8.tflite"] for m in arm}) == 1  # the same model, byte for byte
        assert {m["runtime"]["num_threads"] for m in arm} == {4}
    orin, xavier = manifests["jetson-orin-nano-int8"], manifests["jetson-xavier-nx-int8"]
    assert orin["provenance"]["artifact_key"] == xavier["provenance"]["artifact_key"]
    assert orin["files"]["model_qdq.onnx"] == xavier["files"]["model_qdq.onnx"]
    # each keeps what is its own: the calibration cache of its TensorRT version (8.x only), its runtime
    assert (dist / "jetson-xavier-nx-int8" / "calib.cache").read_text().startswith("TRT-8502-EntropyCalibration2")
    assert "calib.cache" not in orin["files"] and orin["runtime"]["tensorrt"] == "10.3.0"
    assert orin["provenance"]["int8_mode_default"] == "qdq" and xavier["provenance"]["int8_mode_default"] == "qdq"
    cpu, npu = manifests["intel-cpu-int8"], manifests["intel-npu-int8"]
    assert cpu["provenance"]["artifact_key"] != npu["provenance"]["artifact_key"]  # NNCF's target device differs

    assert _build(proj)["compiles"] == 0  # warm: nothing compiled, nothing rebuilt

    if TFLITE:  # a runtime setting of one target: its bundle only
        _profile(proj, "raspberry-pi-5", "num_threads = 4", "num_threads = 2")
        report = _build(proj)
        assert report["compiles"] == 0, report["stages"]
        changed = {k for k, v in _status(report).items() if v != "cached"}
        assert changed == {"raspberry-pi-5-int8"}, _status(report)
        assert json.loads((dist / "raspberry-pi-5-int8" / "manifest.json").read_text())["runtime"]["num_threads"] == 2

    # a setting one target's compile reads: that compile and that bundle only
    _profile(proj, "intel-cpu", 'performance_hint = "LATENCY"', 'performance_hint = "LATENCY"\nnncf_preset = "mixed"')
    report = _build(proj)
    assert report["compiles"] == 1, report["stages"]
    assert {k for k, v in _status(report).items() if v != "cached"} == {"intel-cpu-int8"}, _status(report)
    m = json.loads((dist / "intel-cpu-int8" / "manifest.json").read_text())
    assert m["provenance"]["quantization"]["preset"] == "mixed"


def _branchy_net(path, bias: float = 0.0, size: int = 16):
    """A small ONNX with every way a range is found: a convolution read by a Relu and a residual Add (exposed,
    the Relu derived from its read), a convolution read only by a Relu (takes the Relu's range), a Concat of
    a Relu output and that convolution (fed from their reads), and a graph output."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), \
                nn.Conv2d(16, 8, 3, padding=1)

        def forward(self, x):
            c1 = self.c1(x)
            r2 = torch.relu(self.c2(torch.relu(c1)))
            return self.c3(torch.cat([r2, c1], 1)) + c1

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.c1.bias += bias
    torch.onnx.export(net, (torch.zeros(1, 3, size, size),), str(path), input_names=["x"], dynamo=False)


@pytest.mark.parametrize("method", ["max", "percentile", "entropy", "mse"])
@pytest.mark.parametrize("bias", [0.0, -2.0])
def test_ranges_match_a_plain_reference(tmp_path, method, bias):
    """The one-pass collectors give what the definitions give, on a real ONNX with real frames: for a tensor
    read directly, a Relu output derived from its input's read (with ``bias`` -2 the input's negative side
    reaches further, so the Relu has its own histogram range), a Concat fed from its inputs' reads, and a
    convolution read only by a Relu (the Relu's values are its range's)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from edgeport.quantize.collectors import BINS, entropy_amax, mse_amax
    from edgeport.quantize.ranges import _float_tensors, _Instrumented, collect_ranges

    path = tmp_path / "net.onnx"
    _branchy_net(path, bias)
    rng = np.random.default_rng(0)
    data = rng.normal(size=(60, 3, 16, 16)).astype(np.float32)
    got = collect_ranges(path, data, method)
    model = onnx.load(str(path))
    by_op = {}
    for node in model.graph.node:
        by_op.setdefault(node.op_type, []).append(node)
    (r1, r2), (concat,) = by_op["Relu"], by_op["Concat"]
    inst = _Instrumented(path)
    assert inst.derived == {r1.output[0]: r1.input[0]} and inst.same == {r2.input[0]: r2.output[0]}
    assert inst.unions == {concat.output[0]: list(concat.input)}
    assert {r1.output[0], r2.output[0]} <= inst.nonnegative and r1.input[0] not in inst.nonnegative
    # the max pass pools the exposed Relu output in the graph; the signed convolution stays exposed
    assert list(inst.for_maxima().pooled.values()) == [r2.output[0]]
    names = _float_tensors(model)
    for n in names:
        if n not in {o.name for o in model.graph.output}:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    every = {n: [] for n in names}
    for i in range(len(data)):
        values = dict(zip(outs, sess.run(outs, {"x": data[i:i + 1]})))
        values["x"] = data[i:i + 1]
        for n in names:
            every[n].append(np.abs(values[inst.same.get(n, n)]).ravel())
    # both of the derived Relu's histogram paths: one range with its input's, or its own
    assert (float(np.concatenate(every[r1.output[0]]).max()) == float(np.concatenate(every[r1.input[0]]).max())) \
        == (bias == 0.0)
    for n in names:
        a = np.concatenate(every[n])
        if method == "max":
            want = float(a.max())
        elif method == "percentile":
            want = float(np.quantile(a, 0.9999, method="inverted_cdf"))
        elif method == "entropy":
            want = entropy_amax(np.histogram(a, bins=BINS, range=(0.0, float(a.max())))[0], float(a.max()))
        else:
            want = mse_amax(np.histogram(a, bins=BINS, range=(0.0, float(a.max())))[0], float(a.max()),
                            int(np.count_nonzero(a == 0)))
        assert got[n] == pytest.approx(want, rel=1e-6 if method in ("max", "percentile") else 2e-3), n


@pytest.mark.parametrize("bias", [0.0, -2.0])
def test_percentile_pass_gives_the_max_ranges_too(tmp_path, bias):
    """The largest of the values each percentile collector keeps is what the max pass (pooled in the graph
    where it can be) measures, for every way a range is found: one pass serves both; and the histogram
    methods given those max ranges skip their own first pass with the same result."""
    import numpy as np

    from edgeport.quantize.ranges import collect_ranges

    path = tmp_path / "net.onnx"
    _branchy_net(path, bias, size=24)
    data = np.random.default_rng(2).normal(size=(31, 3, 24, 24)).astype(np.float32)
    largest: dict[str, float] = {}
    collect_ranges(path, data, "percentile", largest=largest)
    assert largest == collect_ranges(path, data, "max")
    with pytest.raises(ValueError):
        collect_ranges(path, data, "entropy", largest={})
    for method in ("entropy", "mse"):  # their bins' ranges from those max ranges: the first pass spared
        assert collect_ranges(path, data, method, known=largest) == collect_ranges(path, data, method), method


def test_ranges_in_pieces_and_per_worker_are_the_same(tmp_path, monkeypatch):
    """Tensors read in small pieces (and percentile rows) by one forked session per worker give what one session
    reading whole tensors gives, to the bit, for every method, on every way a range is found."""
    import numpy as np

    from edgeport.quantize import collectors, ranges

    path = tmp_path / "net.onnx"
    _branchy_net(path, size=24)
    data = np.random.default_rng(1).normal(size=(23, 3, 24, 24)).astype(np.float32)
    monkeypatch.setattr(ranges, "_workers", lambda footprint=0: 3)  # more workers than cores, images unevenly

    class Whole(ranges._Instrumented):
        fork = None  # no forks: one session, one worker

    for method in ranges.METHODS:
        monkeypatch.setattr(collectors, "CHUNK", 1 << 16)
        monkeypatch.setattr(collectors, "ROW", 1 << 16)
        whole = ranges.measure(Whole(path), data, method, "whole")
        monkeypatch.setattr(collectors, "CHUNK", 700)  # 4,608 values per tensor: 7 pieces, the last short
        monkeypatch.setattr(collectors, "ROW", 500)
        pieces = ranges.collect_ranges(path, data, method)
        assert pieces == whole and len(pieces) == 8 and min(pieces.values()) > 0.0, method
