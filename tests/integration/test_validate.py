"""`edgeport validate`: passes on good bundles, fails on broken ones naming backend and output,
localizes a corrupted layer, honours per-output tolerances, and its JUnit counts match its table."""
from __future__ import annotations

import hashlib
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_build_and_validate_agree, has, needs_openvino, needs_torch, run_cli

pytestmark = [needs_torch, needs_openvino]
TARGETS = ["intel-cpu", "intel-igpu", "jetson-orin-nano"]


@pytest.fixture(scope="module")
def project(default_project, tmp_path_factory) -> Path:
    """A project with OpenVINO INT8 and FP16, TensorRT INT8 (emulated) and, when installed, TFLite INT8."""
    proj = tmp_path_factory.mktemp("validate")
    shutil.copytree(default_project[0] / "build", proj / "build")  # calibration + export come from the cache
    targets = TARGETS + (["raspberry-pi-5"] if has("onnx2tf") else [])
    res = run_cli("build", *[a for t in targets for a in ("--target", t)], cwd=proj)
    assert res.returncode == 0, res.stderr[-3000:]
    return proj


def _table(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("bundle "))
    rows = []
    for ln in lines[start + 2:]:
        if ln.startswith("reference:"):
            break
        rows.append(ln.split())
    return rows


def _junit(path: Path) -> tuple[ET.Element, list[ET.Element]]:
    root = ET.parse(path).getroot()
    return root, root.findall(".//testcase")


def _rehash(bundle: Path) -> None:
    """Make the manifest's hashes match the files again: the damage is in content, not in transit."""
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"] = {n: hashlib.sha256((bundle / n).read_bytes()).hexdigest() for n in m["files"]}
    (bundle / "manifest.json").write_text(json.dumps(m, indent=1))


def _edit_manifest(bundle: Path, **preprocess: object) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    m["preprocess"].update(preprocess)
    (bundle / "manifest.json").write_text(json.dumps(m, indent=1))


def _negate_openvino_weight(bundle: Path, index: int) -> None:
    """Negate the ``index``-th convolution weight constant of an IR (int8, f16 or f32) in model.bin."""
    root = ET.parse(bundle / "model.xml").getroot()
    types = {"i8": np.int8, "f16": np.float16, "f32": np.float32}
    consts = [ly.find("data").attrib for ly in root.iter("layer") if ly.get("type") == "Const"
              and ly.find("data").get("element_type") in types and ly.find("data").get("shape", "").count(",") >= 3]
    d = consts[index]
    off, size, dtype = int(d["offset"]), int(d["size"]), types[d["element_type"]]
    raw = bytearray((bundle / "model.bin").read_bytes())
    w = np.frombuffer(bytes(raw[off:off + size]), dtype)
    neg = np.clip(-w.astype(np.int16), -127, 127).astype(np.int8) if dtype is np.int8 else -w
    raw[off:off + size] = neg.tobytes()
    (bundle / "model.bin").write_bytes(bytes(raw))


def _scramble_bin(bundle: Path) -> None:
    """The middle third of model.bin replaced by random bytes (hashes left stale)."""
    raw = bytearray((bundle / "model.bin").read_bytes())
    n = len(raw) // 3
    raw[n:2 * n] = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
    (bundle / "model.bin").write_bytes(bytes(raw))


def _negate_onnx_weight(path: Path, name: str) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), name))
    onnx.save(model, str(path))


def _naive_qdq(bundle: Path) -> None:
    """The bundle's Q/DQ model replaced by a Q/DQ pair before every input of every node (scales from its own)."""
    import onnx
    from onnx import numpy_helper

    from edgeport.backends.tensorrt.qdq import naive_qdq
    from edgeport.quantize.ranges import _float_tensors

    qdq = onnx.load(str(bundle / "model_qdq.onnx"))
    scales = {i.name[:-len("_edgeport_scale")]: float(numpy_helper.to_array(i)) * 127.0
              for i in qdq.graph.initializer if i.name.endswith("_edgeport_scale")}
    names = _float_tensors(onnx.load(str(bundle / "model.onnx")))
    naive_qdq(bundle / "model.onnx", {n: scales.get(n, 4.0) for n in names}, bundle / "model_qdq.onnx")


def test_good_bundles_pass_and_junit_matches_the_table(project):
    res = run_cli("validate", "--report", "reports", "--bench", cwd=project)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    rows = _table(res.stdout)
    bundles = sorted(p.name for p in (project / "dist").iterdir() if (p / "manifest.json").is_file())
    # files + manifest + output + mIoU (synthetic scenes are the default model's labelled set) per bundle, and the
    # Q/DQ lint of each TensorRT INT8 bundle
    assert len(rows) == 4 * len(bundles) + sum(b.endswith("-int8") and b.startswith("jetson") for b in bundles)
    assert all(r[3] == "manifest" and r[-1] == "passed" for r in rows if r[3] == "manifest")
    assert any(r[0] == "jetson-orin-nano-int8" and r[4:6] == ["qdq", "lint"] and r[-1] == "passed" for r in rows), rows
    assert {r[0] for r in rows} == set(bundles) and all(r[-1] == "passed" for r in rows)
    assert "tensorrt (emulated)" in res.stdout
    root, cases = _junit(project / "reports" / "validate.junit.xml")
    assert int(root.get("tests")) == len(cases) == len(rows)
    assert int(root.get("failures")) == 0 and not [c for c in cases if c.find("failure") is not None]
    report = json.loads((project / "reports" / "validate.json").read_text())
    assert report["ok"] and report["reference_metrics"]["miou"] > 80
    for b in report["bundles"]:
        assert b["status"] == "validated" and b["latency"]["fps"] > 0 and b["size_mb"] > 0
        out = next(c for c in b["cases"] if c["check"] == "output")["metrics"]
        assert out["cosine"] > 0.98 and out["sqnr_db"] > 15 and out["mean_abs"] <= out["max_abs"]
    md = (project / "reports" / "validate.md").read_text()
    assert "| pytorch | fp32 | (reference) |" in md and "all checks passed" in md
    import cv2

    png = cv2.imread(str(project / "reports" / "benchmark.png"))
    assert png is not None and png.shape[0] > 100


def test_build_and_validate_agree_on_the_embedded_segmenter(project):
    """The default build gates on the embedded scenes' report half; validate scores the same frames there."""
    report = assert_build_and_validate_agree(project)
    assert report["ok"] and report["dataset"] == "synthetic://?n=32"


def test_broken_bundles_fail_naming_backend_and_output(project, tmp_path):
    dist = project / "dist"
    broken = tmp_path / "broken"
    broken.mkdir()
    cases = {
        "mean-std": ("intel-igpu-fp16", lambda b: _edit_manifest(b, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])),
        "bgr-rgb": ("intel-cpu-int8", lambda b: _edit_manifest(b, color="BGR")),
        "weight-ov": ("intel-cpu-int8", lambda b: (_negate_openvino_weight(b, 4), _rehash(b))),
        "weight-qdq": ("jetson-orin-nano-int8",
                       lambda b: (_negate_onnx_weight(b / "model_qdq.onnx", "enc2.0.0.0.weight"), _rehash(b))),
        "tampered": ("intel-igpu-fp16", lambda b: _negate_openvino_weight(b, 4)),  # hashes left stale
        "naive-qdq": ("jetson-orin-nano-int8", lambda b: (_naive_qdq(b), _rehash(b))),
        "garbage-bin": ("intel-igpu-fp16", _scramble_bin),  # NaN and inf outputs: failed, without numpy's warnings
    }
    for name, (src, damage) in cases.items():
        shutil.copytree(dist / src, broken / name)
        damage(broken / name)
    shutil.copytree(dist / "intel-cpu-int8", broken / "good")
    res = run_cli("validate", str(broken), "--localize", "--report", str(tmp_path / "r"), cwd=project)
    assert res.returncode == 3, res.stdout[-3000:] + res.stderr[-2000:]
    out = res.stdout
    for name, backend in (("mean-std", "openvino fp16"), ("bgr-rgb", "openvino int8"), ("weight-ov", "openvino int8"),
                          ("weight-qdq", "tensorrt (emulated) int8"), ("tampered", "openvino fp16")):
        assert f"{name}: {backend} output 'output':" in out, (name, out[-3000:])
    assert "color 'BGR' vs 'RGB'" in out and "mean [0.5, 0.5, 0.5] vs" in out
    assert "tampered: model.bin: sha256 mismatch" in out
    naive = next(ln for ln in out.splitlines() if ln.startswith("naive-qdq: model_qdq.onnx breaks"))
    assert "QDQ006" in naive or "QDQ007" in naive, naive
    # --localize names the layer whose weights were negated, and blames preprocessing for the swap
    assert "weight-qdq: first diverging layer: Conv '/enc2.0.0.0/Conv'" in out
    ov_line = next(ln for ln in out.splitlines() if ln.startswith("weight-ov: first diverging layer"))
    assert "Conv '" in ov_line and "--int8-ignore" in ov_line
    assert "bgr-rgb: the graph computes what the FP32 ONNX computes" in out
    rows = _table(out)
    status = {}
    for r in rows:
        status.setdefault(r[0], set()).add(r[-1])
    assert status["good"] == {"passed"} and all("failed" in status[n] for n in cases)
    root, junit_cases = _junit(tmp_path / "r" / "validate.junit.xml")
    failed = [c for c in junit_cases if c.find("failure") is not None]
    assert int(root.get("tests")) == len(rows) and int(root.get("failures")) == len(failed) == \
        sum(r[-1] == "failed" for r in rows)
    assert "error: " in res.stderr and "check(s) failed" in res.stderr
    assert "Warning" not in res.stderr and "warnings.warn" not in res.stderr, res.stderr[-2000:]


def test_a_manifest_edited_in_both_places_is_named_and_the_reference_stays_the_builds(project, tmp_path):
    """The mean shifted in both preprocess.mean and model.spec.mean: validate builds its PyTorch reference from the
    build's record, not from the edited manifest, and names both fields; with the build folder gone, the golden
    cases still show the manifest's preprocessing is not the build's."""
    bundle = tmp_path / "edited" / "intel-cpu-int8"
    shutil.copytree(project / "dist" / "intel-cpu-int8", bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    true_mean = m["model"]["spec"]["mean"]
    shifted = [round(v + 0.2, 3) for v in true_mean]
    m["preprocess"]["mean"] = m["model"]["spec"]["mean"] = shifted
    (bundle / "manifest.json").write_text(json.dumps(m, indent=1))
    res = run_cli("validate", str(bundle), "--report", str(tmp_path / "r"), cwd=tmp_path)
    assert res.returncode == 3, res.stdout[-3000:] + res.stderr[-2000:]
    assert "reference from intel-cpu-int8's build record" in res.stderr, res.stderr[-2000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("intel-cpu-int8: manifest.json was changed"))
    assert f"manifest.model.spec.mean is {json.dumps(shifted)}, the build recorded {json.dumps(true_mean)}" in line
    assert "manifest.preprocess.mean is" in line and "(tampered)" in line
    report = json.loads((tmp_path / "r" / "validate.json").read_text())
    assert abs(report["reference_metrics"]["miou"] - 89.75) < 0.05  # PyTorch with the build's mean
    # the build folder out of reach: the golden frames and inputs are the record
    m["provenance"]["build_dir"] = str(tmp_path / "gone")
    (bundle / "manifest.json").write_text(json.dumps(m, indent=1))
    res = run_cli("validate", str(bundle), cwd=tmp_path)
    assert res.returncode == 3, res.stdout[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("intel-cpu-int8: manifest.json was changed"))
    assert "manifest.preprocess turns golden/frame_0.png into an input" in line, line


def test_per_output_tolerance_from_edgeport_toml(project, tmp_path):
    (project / "edgeport.toml").write_text('[validation.tolerance."output@int8"]\nmin_cosine = 0.9999999\n')
    try:
        res = run_cli("validate", str(project / "dist" / "intel-cpu-int8"), str(project / "dist" / "intel-igpu-fp16"),
                      cwd=project)
        assert res.returncode == 3, res.stdout[-2000:]
        rows = {(r[0], r[3]): r[-1] for r in _table(res.stdout)}
        assert rows[("intel-cpu-int8", "output")] == "failed" and rows[("intel-igpu-fp16", "output")] == "passed"
        assert "cosine 0.99" in res.stdout and "< 0.9999999" in res.stdout
        (project / "edgeport.toml").write_text('[validation.tolerance.output]\nmin_cosin = 0.9\n')
        res = run_cli("validate", cwd=project)
        assert res.returncode == 2 and res.stderr.count("\n") == 1
        assert "unknown key 'validation.tolerance.output.min_cosin' (did you mean 'min_cosine'?)" in res.stderr
    finally:
        (project / "edgeport.toml").unlink()


def test_validate_errors_are_one_line(project, tmp_path):
    res = run_cli("validate", str(tmp_path / "nothing"), cwd=project)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no such bundle or dist folder" in res.stderr
    res = run_cli("validate", "--model", "torchvision:resnet18", "--input", "1x3x64x64", "--task", "classification",
                  cwd=project)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "holds model 'roadseg'" in res.stderr and "pass the project's --config" in res.stderr
