"""Detection end to end: the embedded detector (edgeport:roaddet) built for OpenVINO, TFLite and TensorRT at INT8
with no other flag than its validation scenes, every INT8 artifact within 1.0 mAP point of FP32 on scenes it
never saw, `edgeport validate` passing, and the runner drawing boxes and writing detections on a real video, in
venvs holding only numpy, OpenCV and one runtime, selftests included."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_build_and_validate_agree, device_env, has, run_cli

pytestmark = pytest.mark.skipif(not (has("openvino") and has("onnx2tf") and has("pycocotools")),
                                reason="needs the openvino, tflite and detection extras")
TARGETS = ("intel-cpu:int8", "raspberry-pi-5:int8", "jetson-orin-nano:int8")
VAL = "synthetic://?objects=1&n=200"


@pytest.fixture(scope="module")
def roaddet(tmp_path_factory):
    proj = tmp_path_factory.mktemp("roaddet")
    args = ["build", "--model", "edgeport:roaddet"]  # its own validation scenes, VAL, without a flag
    for t in TARGETS:
        args += ["--target", t]
    res = run_cli(*args, cwd=proj, timeout=1500)
    assert res.returncode == 0, res.stdout + res.stderr
    return proj, res


@pytest.fixture(scope="module")
def scene_video(tmp_path_factory):
    """An MJPG .avi of 40 road scenes with pedestrians and signs (320x240)."""
    import cv2

    from edgeport.zoo.scene import render_scene_boxes

    path = tmp_path_factory.mktemp("video") / "scenes.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (320, 240))
    for i in range(40):
        writer.write(render_scene_boxes(7_000_000 + i, 240, 320)[0])
    writer.release()
    return path


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_every_int8_artifact_keeps_its_map(roaddet):
    proj, res = roaddet
    assert "mAP" in res.stdout
    for t in TARGETS:
        m = _manifest(proj / "dist" / t.replace(":", "-"))
        assert m["model"]["task"] == "detection"
        assert m["preprocess"]["task_options"]["decoder"] == "boxes"
        assert [o["name"] for o in m["outputs"]] == ["boxes", "scores"]
        acc = m["parity"]["accuracy"]
        assert acc["metric"] == "map" and acc["count"] == 100  # the report half of 200 scenes
        assert acc["reference"]["map"] > 30.0, acc  # the detector works on scenes it never saw
        assert acc["drop"] <= 1.0, (t, acc)
        assert acc["agreement"] > 0.5, (t, acc)  # detections repeated at IoU >= 0.9 with the same class


def test_validate_passes_on_the_detection_bundles(roaddet):
    """What the build passed, validate passes, with the same figures: both score the report half of VAL."""
    proj, res = roaddet
    assert f"validation: {VAL} (the embedded model's own labelled scenes)" in res.stderr
    report = assert_build_and_validate_agree(proj)
    assert report["ok"] and report["dataset"] == VAL


@pytest.mark.parametrize("target,venv", [("intel-cpu-int8", "openvino_venv"), ("raspberry-pi-5-int8", "tflite_venv")])
def test_runner_draws_boxes_and_writes_detections_with_only_its_runtime(roaddet, scene_video, target, venv, request,
                                                                       tmp_path):
    import cv2

    proj, _ = roaddet
    python = request.getfixturevalue(venv)
    bundle = tmp_path / target
    shutil.copytree(proj / "dist" / target, bundle)
    st = subprocess.run([str(python), "runner.py", "--selftest"], cwd=bundle, capture_output=True, text=True,
                        env=device_env(), timeout=300)
    assert st.returncode == 0 and "selftest: PASS" in st.stdout, st.stdout + st.stderr
    assert "detections vs pytorch" in st.stdout and "detections vs build host" in st.stdout
    res = subprocess.run([str(python), "runner.py", str(scene_video), "--headless", "--jsonl", "out.jsonl",
                          "--save", "out.avi"], cwd=bundle, capture_output=True, text=True, env=device_env(),
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [json.loads(ln) for ln in (bundle / "out.jsonl").read_text().splitlines()]
    assert len(lines) == 40
    dets = [d for ln in lines for d in ln["detections"]]
    assert len(dets) >= 40  # cars, people and signs in 40 busy scenes
    for d in dets:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 240 and d["label"] in ("car", "pedestrian", "sign")
        assert 0.25 <= d["score"] <= 1.0
    assert sum(sum(ln["counts"].values()) for ln in lines) == len(dets)
    video = cv2.VideoCapture(str(bundle / "out.avi"))
    ok, frame = video.read()
    assert ok and frame.shape == (240, 320, 3)
    raw = cv2.VideoCapture(str(scene_video))
    _, src = raw.read()
    assert np.abs(frame.astype(int) - src.astype(int)).max() > 100  # boxes and labels drawn over the frame


def test_deepstack_endpoint_refuses_a_decompression_bomb(roaddet, openvino_venv, tmp_path):
    """DeepStack's endpoint of a detection bundle reads the pixels from the header too: 413 before decoding."""
    from tests.runner.test_serve import Served, png_bomb

    bundle = tmp_path / "intel-cpu-int8"
    shutil.copytree(roaddet[0] / "dist" / "intel-cpu-int8", bundle)
    svc = Served(openvino_venv, bundle, "--no-source")
    try:
        boundary = "b0undary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode()
        form = head + png_bomb(20000, 20000) + f"\r\n--{boundary}--\r\n".encode()
        code, _, body = svc.request("POST", "/v1/vision/detection", form,
                                    {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert code == 413 and "20000x20000 (400 MP)" in json.loads(body)["error"], (code, body)
    finally:
        code, err = svc.stop()
    assert code == 0, err


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def camvid_det(tmp_path_factory, camvid):
    """The CamVid detector recipe built for OpenVINO and TFLite INT8, scored on CamVid val's derived boxes."""
    if not (ROOT / "models" / "camvid-det.pt").is_file():
        pytest.fail("models/camvid-det.pt is missing; run scripts/train_camvid_det.py")
    boxes = tmp_path_factory.mktemp("camvid-boxes")
    made = subprocess.run([sys.executable, str(ROOT / "scripts" / "camvid_boxes.py"), "--camvid", str(camvid),
                           "--out", str(boxes)], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    proj = tmp_path_factory.mktemp("camvid-det")
    res = run_cli("build", "--config", str(ROOT / "examples" / "camvid-det" / "edgeport.toml"),
                  "--val-labels", str(boxes / "val"), "--target", "intel-cpu:int8", "--target", "raspberry-pi-5:int8",
                  "--out", str(proj / "dist"), "--build-dir", str(proj / "build"), cwd=proj, timeout=1500)
    assert res.returncode == 0, res.stdout + res.stderr
    return proj


def test_camvid_detector_int8_keeps_its_map_and_runs_on_a_camvid_video(camvid_det, camvid_video, openvino_venv,
                                                                       tmp_path):
    for name in ("intel-cpu-int8", "raspberry-pi-5-int8"):
        acc = _manifest(camvid_det / "dist" / name)["parity"]["accuracy"]
        assert acc["metric"] == "map" and acc["count"] == 50 and acc["drop"] <= 1.0, (name, acc)
    bundle = tmp_path / "intel-cpu-int8"
    shutil.copytree(camvid_det / "dist" / "intel-cpu-int8", bundle)
    st = subprocess.run([str(openvino_venv), "runner.py", "--selftest"], cwd=bundle, capture_output=True, text=True,
                        env=device_env(), timeout=300)
    assert st.returncode == 0 and "selftest: PASS" in st.stdout, st.stdout + st.stderr
    res = subprocess.run([str(openvino_venv), "runner.py", str(camvid_video), "--headless", "--jsonl", "out.jsonl",
                          "--max-frames", "60"], cwd=bundle, capture_output=True, text=True, env=device_env(),
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [json.loads(ln) for ln in (bundle / "out.jsonl").read_text().splitlines()]
    dets = [d for ln in lines for d in ln["detections"]]
    assert len(lines) == 60 and len(dets) >= 30, len(dets)
    assert {d["label"] for d in dets} <= {"car", "pedestrian", "bicyclist"}
    assert all(0 <= d["box"][0] < d["box"][2] <= 480 and 0 <= d["box"][1] < d["box"][3] <= 360 for d in dets)


SSDLITE = f"""[model]
source = "{ROOT / 'scripts' / 'coverage_zoo.py'}:ssdlite320_mobilenet_v3_large"
[input]
name = "image"
shape = [1, 3, 320, 320]
[preprocess]
mean = [0.5, 0.5, 0.5]
std = [0.5, 0.5, 0.5]
[task]
type = "detection"
decoder = "anchors"
score_threshold = 0.05
[calibration]
source = "synthetic://?objects=1"
"""


def test_torchvision_ssdlite_exports_backbone_and_head_with_its_anchors_in_the_manifest(tmp_path):
    """torchvision's SSDlite (seeded He-normal weights, no download): backbone + head to OpenVINO, TFLite and
    TensorRT; the anchors its own generator makes go into the manifest and the runner decodes against them."""
    (tmp_path / "edgeport.toml").write_text(SSDLITE)
    res = run_cli("build", "--target", "intel-cpu:fp32", "--target", "raspberry-pi-5:fp32", "--target",
                  "jetson-orin-nano:int8", cwd=tmp_path, timeout=1500)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("intel-cpu-fp32", "raspberry-pi-5-fp32", "jetson-orin-nano-int8"):
        m = _manifest(tmp_path / "dist" / name)
        opts = m["preprocess"]["task_options"]
        assert opts["decoder"] == "anchors" and len(opts["anchors"]) == 3234 == m["outputs"][0]["shape"][1]
        assert opts["box_coder_weights"] == [10.0, 10.0, 5.0, 5.0] and opts["score_activation"] == "softmax"
        assert opts["background"] == 0
        if name.endswith("fp32"):
            assert all(p["agreement"] >= 0.99 for p in m["parity"]["artifact"].values()), (name, m["parity"])
    st = subprocess.run([sys.executable, "runner.py", "--selftest"], cwd=tmp_path / "dist" / "intel-cpu-fp32",
                        capture_output=True, text=True, timeout=300)
    assert st.returncode == 0, st.stdout + st.stderr
    found = [ln for ln in st.stdout.splitlines() if ln.startswith("detections vs pytorch")]
    assert found and " 0 reference detection" not in found[0], st.stdout  # there were detections to compare


CENTERNET = f"""[model]
source = "{ROOT / 'tests' / 'models' / 'centernet.py'}:roaddet_centernet"
[input]
name = "image"
shape = [1, 3, 128, 160]
[task]
type = "detection"
labels = ["car", "pedestrian", "sign"]
decoder = "centernet"
[calibration]
source = "synthetic://?objects=1"
[validation]
images = "{VAL}"
"""


def test_centernet_heads_decode_on_every_backend_and_keep_their_map_in_int8(tmp_path, tflite_venv):
    """A trained detector with CenterNet's outputs (heatmap, sizes, offsets; tests/models/centernet.py) built for
    OpenVINO, TFLite and TensorRT at INT8: the same decoder on the host and in the runner, the TFLite bundle's NHWC
    grids included, each artifact within 1.0 mAP point of FP32, and the TFLite runner's selftest passing."""
    (tmp_path / "edgeport.toml").write_text(CENTERNET)
    res = run_cli("build", *[a for t in TARGETS for a in ("--target", t)], cwd=tmp_path, timeout=1500)
    assert res.returncode == 0, res.stdout + res.stderr
    for t in TARGETS:
        m = _manifest(tmp_path / "dist" / t.replace(":", "-"))
        assert m["preprocess"]["task_options"]["decoder"] == "centernet"
        assert sorted(o["name"] for o in m["outputs"]) == ["hm", "reg", "wh"]
        acc = m["parity"]["accuracy"]
        assert acc["reference"]["map"] > 30.0 and acc["drop"] <= 1.0, (t, acc)
    bundle = tmp_path / "dist" / "raspberry-pi-5-int8"
    layouts = {o["name"]: (o["layout"], o["shape"]) for o in _manifest(bundle)["outputs"]}
    assert layouts["hm"] == ("NHWC", [1, 32, 40, 3]), layouts  # the convolution's grid; onnx2tf may keep the others
    st = subprocess.run([str(tflite_venv), "runner.py", "--selftest"], cwd=bundle, capture_output=True, text=True,
                        env=device_env(), timeout=300)
    assert st.returncode == 0 and "selftest: PASS" in st.stdout, st.stdout + st.stderr
    found = [ln for ln in st.stdout.splitlines() if ln.startswith("detections vs build host")]
    assert found and " 0 reference detection" not in found[0], st.stdout


def test_deepstack_detection_endpoint_answers_like_the_runner(roaddet, openvino_venv, tmp_path):
    """POST /v1/vision/detection (DeepStack's form upload with min_confidence, as Frigate and Home Assistant send
    it) on a --no-source service: the runner's own detections, in whole pixels, above the threshold."""
    import cv2

    from edgeport.zoo.scene import render_scene_boxes
    from tests.runner.test_serve import Served, multipart

    proj, _ = roaddet
    bundle = tmp_path / "intel-cpu-int8"
    shutil.copytree(proj / "dist" / "intel-cpu-int8", bundle)
    png = cv2.imencode(".png", render_scene_boxes(7_000_003, 240, 320)[0])[1].tobytes()
    svc = Served(openvino_venv, bundle, "--no-source")
    try:
        code, _, body = svc.request("POST", "/infer", png, {"Content-Type": "image/png"})
        dets = json.loads(body)["detections"]
        assert code == 200 and dets
        form, ctype = multipart("image", png, {"min_confidence": "0.5"})
        code, _, body = svc.request("POST", "/v1/vision/detection", form, {"Content-Type": ctype})
        got = json.loads(body)
    finally:
        svc.stop()
    assert code == 200 and got["success"] is True and got["duration"] > 0
    want = [d for d in dets if d["score"] >= 0.5]
    assert len(got["predictions"]) == len(want) > 0
    for p, d in zip(got["predictions"], want):
        assert p["label"] == d["label"] and p["confidence"] == d["score"]
        assert [p["x_min"], p["y_min"], p["x_max"], p["y_max"]] == [int(round(v)) for v in d["box"]]
