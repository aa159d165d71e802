"""Every bad input gets one actionable error line, a non-zero exit, no traceback, and nothing in dist/.

One parametrized case per input, grouped by category (model, input, config, targets, calibration,
flags, folders, validate, inspect, export, flash, runner). Each runs the real command in a fresh
project folder as a user would. Inputs are checked before the expensive stages: where a case could
only be found after them, the test also asserts that the calibration or export did not run.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import CAMVID, has, needs_openvino, needs_torch, run_cli

pytestmark = [needs_torch, needs_openvino]

NET = textwrap.dedent('''
    import torch
    from torch import nn

    def make():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def raises():
        raise RuntimeError("the factory wants a GPU")

    def number():
        return 42

    class Boom(nn.Module):
        def forward(self, x):
            raise ValueError("this model only takes 3x64x64 inputs")

    def boom():
        return Boom()

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.conv(x).mean((2, 3)) * 0.0 + torch.tensor([[1.0, 2.0]])

    def flat():
        return Flat()

    class FFT(nn.Module):
        def forward(self, x):
            return torch.fft.rfft2(x).abs().mean((2, 3))

    def fft():
        return FFT()
''')
BASE = ["--input", "1x3x32x32", "--task", "classification", "--target", "intel-cpu:fp32"]


def _write_images(folder: Path, n: int, corrupt: bool = False) -> Path:
    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    frames = sorted((CAMVID / "val").glob("*.png"))
    for i in range(n):
        if corrupt:
            (folder / f"{i:03d}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        else:
            img = cv2.imread(str(frames[i % len(frames)]))
            cv2.imwrite(str(folder / f"{i:03d}.jpg"), cv2.resize(img, (64, 48)) + np.uint8(i % 7))
    return folder


def _truncated_video(path: Path) -> Path:
    import cv2

    frames = sorted((CAMVID / "val").glob("*.png"))[:60]
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (96, 72))
    for f in frames:
        w.write(cv2.resize(cv2.imread(str(f)), (96, 72)))
    w.release()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _setup(p: Path, what: str) -> None:
    """Files a case needs, made in the project folder ``p``."""
    import torch

    if what == "garbage-weights":
        (p / "w.pth").write_bytes(bytes(range(256)) * 20)
    elif what == "text-weights":
        (p / "w.pth").write_text("these are not weights\n")
    elif what == "pickled-weights":  # an object torch's safe loader refuses: loading it would run code
        import argparse

        torch.save({"args": argparse.Namespace(lr=0.1)}, p / "w.pth")
    elif what == "misfit-weights":
        torch.save({"state_dict": {"0.weight": torch.zeros(8, 3, 3, 3)}}, p / "w.pth")
    elif what == "garbage-pt":
        (p / "model.pt").write_bytes(b"PK\x03\x04 not a torchscript archive")
    elif what == "names-3":
        (p / "names.txt").write_text("cat\ndog\nbird\n")
    elif what in ("det-no-decoder", "det-threshold", "det-setting", "det-mismatch"):
        task = {"det-no-decoder": "", "det-threshold": 'decoder = "boxes"\nscore_threshold = 1.5\n',
                "det-setting": 'decoder = "boxes"\nanchors = [1, 2]\n', "det-mismatch": 'decoder = "boxes"\n'}[what]
        (p / "edgeport.toml").write_text('[model]\nsource = "net.py:make"\n[input]\nshape = [1, 3, 32, 32]\n'
                                         f'[task]\ntype = "detection"\n{task}')
    elif what == "config-shape-text":
        (p / "edgeport.toml").write_text('[model]\nsource = "net.py:make"\n[input]\nshape = "1x3xabc"\n')
    elif what in ("config-unknown-key", "config-section", "config-toml", "config-type", "config-prune",
                  "config-tolerance"):
        text = {"config-unknown-key": '[model]\nsource = "net.py:make"\nwieghts = "w.pth"\n',
                "config-section": '[modle]\nsource = "net.py:make"\n',
                "config-toml": '[model\nsource = "net.py:make"\n',
                "config-type": '[model]\nsource = "net.py:make"\n[quantize]\nsubset_size = "ten"\n',
                "config-prune": '[model]\nsource = "net.py:make"\n[optimize]\nprune = 1.5\n',
                "config-tolerance": '[model]\nsource = "net.py:make"\n[validation.tolerance.output]\n'
                                    'min_cosin = 0.9\n'}[what]
        (p / "edgeport.toml").write_text(text)
    elif what == "bad-profile":
        (p / "targets").mkdir()
        (p / "targets" / "my-box.toml").write_text('description = "x"\nbackend = "openvino"\nprecisions = ["fp32"]\n'
                                                   'default_precision = "fp32"\nopset_max = 17\narch = "x86_64"\n'
                                                   'camra = 1\n[runtime]\nopenvino = "2026"\n')
    elif what == "calib-empty":
        (p / "calib").mkdir()
    elif what == "calib-corrupt":
        _write_images(p / "calib", 60, corrupt=True)
    elif what == "calib-few":
        _write_images(p / "calib", 10)
    elif what == "calib-text":
        (p / "calib.txt").write_text("frames\n")
    elif what == "calib-npy":
        import numpy as np

        np.save(p / "calib.npy", np.zeros((60, 5, 5), np.float32))
    elif what == "calib-truncated":
        _truncated_video(p / "calib.avi")
    elif what == "val-folder":
        _write_images(p / "val", 12)
    elif what == "afile":
        (p / "afile").write_text("not a folder")
    elif what == "onnx-dir":
        (p / "model.onnx").mkdir()


def _assert_clean(res: subprocess.CompletedProcess[str], words: str, project: Path) -> None:
    assert res.returncode != 0, res.stdout[-1500:] + res.stderr[-1500:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith(("error:", "internal error:"))]
    assert len(errors) == 1 and errors[0].startswith("error:"), res.stderr[-3000:]
    assert words in errors[0], errors[0]
    opencv = [ln for ln in res.stderr.splitlines() if ln.lstrip().startswith(("[ WARN:", "[ERROR:", "[ INFO:"))]
    assert not opencv, opencv[:3]  # OpenCV's own lines are silenced where edgeport says the same once
    for dist in (project / "dist",):
        assert not dist.exists() or not any(m for m in dist.rglob("manifest.json")), list(dist.rglob("*"))


# (id, setup, arguments after the command, words the one error line must hold, stage that must not run)
BUILD_CASES = [
    # model intake
    ("model-file-missing", None, ["--model", "nothere.py:make", *BASE], "nothere.py does not exist", "calibration"),
    ("model-pt-missing", None, ["--model", "nothere.pt", *BASE], "nothere.pt does not exist", "calibration"),
    ("factory-typo", None, ["--model", "net.py:mkae", *BASE], "did you mean 'make'", None),
    ("module-missing", None, ["--model", "no_such_pkg.nets:make", *BASE], "no module named 'no_such_pkg.nets'",
     "calibration"),
    ("factory-raises", None, ["--model", "net.py:raises", *BASE], "the factory wants a GPU", None),
    ("factory-not-module", None, ["--model", "net.py:number", *BASE], "not a torch.nn.Module", None),
    ("forward-raises", None, ["--model", "net.py:boom", *BASE], "forward raised ValueError", None),
    ("input-too-small", None, ["--model", "net.py:make", "--input", "1x3x2x2", "--task", "classification",
                               "--target", "intel-cpu:fp32"], "forward raised RuntimeError", None),
    ("weights-garbage", "garbage-weights", ["--model", "net.py:make", "--weights", "w.pth", *BASE],
     "not a PyTorch state_dict or checkpoint", None),
    ("weights-text", "text-weights", ["--model", "net.py:make", "--weights", "w.pth", *BASE],
     "not a PyTorch state_dict or checkpoint", None),
    ("weights-pickled-object", "pickled-weights", ["--model", "net.py:make", "--weights", "w.pth", *BASE],
     "never runs code from a file", None),
    ("weights-misfit", "misfit-weights", ["--model", "net.py:make", "--weights", "w.pth", *BASE],
     "0.weight (8, 3, 3, 3) vs model (4, 3, 3, 3)", None),
    ("weights-missing", None, ["--model", "net.py:make", "--weights", "nothere.pth", *BASE],
     "nothere.pth does not exist", "calibration"),
    ("torchvision-typo", None, ["--model", "torchvision:resnet81", *BASE], "did you mean 'resnet18'", None),
    ("torchvision-download", None, ["--model", "torchvision:resnet18?weights=DEFAULT", *BASE],
     "never downloads weights", None),
    ("torchvision-kwarg", None, ["--model", "torchvision:resnet18?num_clases=3", *BASE], "num_clases", None),
    ("model-form", None, ["--model", "just-a-name", *BASE], "expected torchvision:<name>", None),
    ("embedded-typo", None, ["--model", "edgeport:roadsge"], "the embedded models are edgeport:roadseg",
     "calibration"),
    ("torchscript-garbage", "garbage-pt", ["--model", "model.pt", *BASE], "cannot load", None),
    ("unsupported-op", None, ["--model", "net.py:fft", *BASE], "aten::fft_rfft2", None),
    ("constant-output", None, ["--model", "net.py:flat", *BASE], "barely depends on the input", None),
    ("class-names-count", "names-3", ["--model", "net.py:make", *BASE, "--class-names", "names.txt"],
     "3 class name(s) are given", None),
    ("class-names-missing", None, ["--model", "net.py:make", *BASE, "--class-names", "nothere.txt"],
     "cannot read labels file", "calibration"),
    # input and preprocessing flags
    ("input-letters", None, ["--model", "net.py:make", "--input", "abc"], "expected a shape like 1x3x224x224",
     "calibration"),
    ("input-zero", None, ["--model", "net.py:make", "--input", "1x3x0x32"], "4 positive sizes", "calibration"),
    ("input-3d", None, ["--model", "net.py:make", "--input", "3x32x32"], "4 positive sizes", "calibration"),
    ("mean-two-values", None, ["--model", "net.py:make", *BASE, "--mean", "0.5", "0.5"], "--mean", "calibration"),
    ("precision-choice", None, ["--precision", "int9"], "invalid choice: 'int9'", "calibration"),
    ("task-choice", None, ["--task", "pose"], "invalid choice: 'pose'", "calibration"),
    ("task-detection-no-decoder", None, ["--model", "net.py:make", "--input", "1x3x32x32", "--task", "detection"],
     "detection needs a decoder", "calibration"),
    ("task-of-an-embedded-model", None, ["--model", "edgeport:roaddet", "--task", "classification"],
     "edgeport:roaddet is a detection model, trained so; drop --task", "calibration"),
    ("input-shape-text-in-config", "config-shape-text", [], "[input] shape '1x3xabc': expected a shape like",
     "calibration"),
    ("calib-synthetic-parameter", None, ["--calib", "synthetic://?n=abc"], "n='abc' is not a whole number",
     "calibration"),
    ("val-synthetic-parameter", None, ["--val-images", "synthetic://?nn=3"], "unknown parameter 'nn'",
     "calibration"),
    ("prune-nothing-prunable", None, ["--model", "net.py:make", *BASE, "--prune", "0.999", "--recover-steps", "0"],
     "--prune 0.999 removed nothing", None),
    # config files
    ("config-unknown-key", "config-unknown-key", [], "did you mean 'weights'", "calibration"),
    ("detection-no-decoder", "det-no-decoder", [], "detection needs a decoder ([task] decoder = one of yolo, boxes",
     "calibration"),
    ("detection-threshold", "det-threshold", [], "score_threshold = 1.5 must be a number from 0 to 1", "calibration"),
    ("detection-setting", "det-setting", [], "task setting anchors is read by the anchors decoder only", "calibration"),
    ("detection-decoder-misfit", "det-mismatch", ["--target", "intel-cpu:fp32"],
     "decoder 'boxes' does not fit this model's outputs (output [1, 2]); the decoders are: yolo", None),
    ("config-unknown-section", "config-section", [], "unknown section 'modle'", "calibration"),
    ("config-bad-toml", "config-toml", [], "not valid TOML", "calibration"),
    ("config-bad-type", "config-type", [], "'quantize.subset_size' = 'ten'", "calibration"),
    ("config-prune-range", "config-prune", [], "prune 1.5 must be a fraction", "calibration"),
    ("config-tolerance-key", "config-tolerance", [], "did you mean 'min_cosine'", "calibration"),
    ("config-missing", None, ["--config", "nothere.toml"], "nothere.toml does not exist", "calibration"),
    # targets and precisions
    ("target-typo", None, ["--model", "net.py:make", *BASE, "--target", "jetson-nan"], "did you mean 'jetson-nano'",
     "calibration"),
    ("target-precision", None, ["--model", "net.py:make", *BASE, "--target", "intel-npu:fp32"],
     "does not support precision 'fp32'", "calibration"),
    ("precision-conflict", None, ["--target", "intel-cpu:int8", "--precision", "fp16"],
     "--target intel-cpu:int8 and --precision fp16 conflict", "calibration"),
    ("target-twice", None, ["--target", "intel-cpu:int8", "--target", "intel-cpu"], "selected twice", "calibration"),
    ("profile-unknown-key", "bad-profile", ["--target", "my-box"], "unknown key 'camra'", "calibration"),
    # calibration data
    ("calib-empty", "calib-empty", ["--model", "net.py:make", *BASE, "--calib", "calib", "--target",
                                    "intel-cpu:int8"], "holds no images", None),
    ("calib-corrupt", "calib-corrupt", ["--model", "net.py:make", *BASE, "--calib", "calib", "--target",
                                        "intel-cpu:int8"], "0 usable image(s) (60 undecodable skipped)", None),
    ("calib-missing", None, ["--model", "net.py:make", *BASE, "--calib", "nothere", "--target", "intel-cpu:int8"],
     "nothere does not exist", "calibration"),
    ("calib-wrong-file", "calib-text", ["--model", "net.py:make", *BASE, "--calib", "calib.txt", "--target",
                                        "intel-cpu:int8"], "expected an image folder, a video", "calibration"),
    ("calib-npy-shape", "calib-npy", ["--model", "net.py:make", *BASE, "--calib", "calib.npy", "--target",
                                      "intel-cpu:int8"], "is neither (N,H,W,3) uint8 BGR frames", None),
    ("calib-truncated-video", "calib-truncated", ["--model", "net.py:make", *BASE, "--calib", "calib.avi",
                                                  "--target", "intel-cpu:int8"], "is truncated or corrupt", None),
    ("calib-too-few", "calib-few", ["--model", "net.py:make", *BASE, "--calib", "calib", "--target",
                                    "intel-cpu:int8"], "10 usable image(s)", None),
    ("int8-without-calib", None, ["--model", "net.py:make", *BASE, "--target", "intel-cpu:int8"], "--calib",
     "calibration"),
    # flags that cannot take effect
    ("calib-method-no-trt", None, ["--target", "intel-cpu:int8", "--calib-method", "entropy"],
     "--calib-method has no effect", "calibration"),
    ("int8-preset-no-int8", None, ["--target", "intel-igpu:fp16", "--int8-preset", "mixed"],
     "--int8-preset has no effect: no selected target builds INT8", "calibration"),
    ("int8-ignore-bad-regex", None, ["--target", "intel-cpu:int8", "--int8-ignore", "(head"],
     "--int8-ignore / int8_ignore) is not a regular expression", "calibration"),
    ("max-drop-no-val", None, ["--model", "net.py:make", *BASE[:4], "--target", "intel-cpu:int8", "--max-drop",
                               "0.5"], "--max-drop has no effect without labelled validation data", "calibration"),
    ("val-labels-no-images", None, ["--target", "intel-cpu:int8", "--val-labels", "lab"],
     "--val-labels has no effect without --val-images", "calibration"),
    ("accuracy-control-few-calib", None, ["--model", "net.py:make", *BASE[:4], "--target", "intel-cpu:int8",
                                          "--accuracy-control", "--calib", "synthetic://?n=60"],
     "needs 100 calibration images or more (60 given)", None),
    ("accuracy-control-no-int8", None, ["--target", "intel-igpu:fp16", "--accuracy-control", "--val-images",
                                        "synthetic://?n=8"], "--accuracy-control has no effect: no selected target "
                                                             "builds INT8", "calibration"),
    ("int8-subset-zero", None, ["--target", "intel-cpu:int8", "--int8-subset", "0"], "0 is not 1 or more",
     "calibration"),
    ("max-drop-zero", None, ["--target", "intel-cpu:int8", "--max-drop", "0", "--val-images", "synthetic://?n=8"],
     "max_drop 0.0 must be in (0, 100]", "calibration"),
    ("prune-range", None, ["--prune", "1.5"], "prune 1.5 must be a fraction", "calibration"),
    ("prune-not-a-ratio", None, ["--prune", "half"], "'half' is neither a ratio (e.g. 0.3) nor auto", "calibration"),
    ("prune-auto-no-val", None, ["--model", "net.py:make", *BASE, "--prune", "auto"],
     "--prune auto chooses a ratio by its accuracy: pass --val-images", "calibration"),
    ("recover-without-prune", None, ["--target", "intel-cpu:fp32", "--recover-steps", "50"],
     "--recover-steps has no effect without pruning", "calibration"),
    ("recover-steps-negative", None, ["--prune", "0.3", "--recover-steps", "-1"], "recover_steps, "
     "recover_seconds and recover_supervised must be >= 0", "calibration"),
    ("opset-too-high", None, ["--target", "jetson-nano", "--opset", "17"], "exceeds the selected targets' ceiling",
     "calibration"),
    ("opset-too-low", None, ["--target", "intel-cpu", "--opset", "7"], "below 11", "calibration"),
    ("val-images-missing", None, ["--target", "intel-cpu:int8", "--val-images", "nothere"], "not a folder",
     "calibration"),
    ("val-labels-classification", "val-folder", ["--model", "net.py:make", *BASE, "--val-images", "val",
                                                 "--val-labels", "val"],
     "--val-labels is for segmentation label maps", "calibration"),
    # folders
    ("out-is-file", "afile", ["--target", "intel-cpu:fp32", "--out", "afile"], "--out", "calibration"),
    ("build-dir-is-file", "afile", ["--target", "intel-cpu:fp32", "--build-dir", "afile/cache"], "is a file",
     "calibration"),
    ("build-dir-unwritable", None, ["--target", "intel-cpu:fp32", "--build-dir", "/proc/edgeport-cache"],
     "--build-dir /proc/edgeport-cache cannot be", "calibration"),
]
BUILD_CASES.append(("int8-ignore-matches-nothing", None, ["--target", "jetson-orin-nano:int8", "--int8-ignore",
                                                         "^/nothing/"], "matches no layer of the model", None))
if has("onnx2tf"):
    BUILD_CASES.append(("int8-ignore-non-conv-on-tflite", None, ["--target", "raspberry-pi-5:int8", "--int8-ignore",
                                                                "Relu"], "can keep only convolutions in float", None))


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    (tmp_path / "net.py").write_text(NET)
    return tmp_path


@pytest.mark.parametrize(("setup", "args", "words", "not_run"), [c[1:] for c in BUILD_CASES],
                         ids=[c[0] for c in BUILD_CASES])
def test_build_refuses_bad_input(project: Path, setup: str | None, args: list[str], words: str,
                                 not_run: str | None) -> None:
    if setup:
        _setup(project, setup)
    res = run_cli("build", *args, cwd=project)
    _assert_clean(res, words, project)
    if not_run == "calibration":  # found before any expensive stage
        assert "calibration set" not in res.stderr and "exporting ONNX" not in res.stderr, res.stderr


def test_corrupt_calibration_images_are_reported_in_one_line(project: Path) -> None:
    _write_images(project / "calib", 60)
    for i in range(40):  # half of them with a PNG signature: OpenCV's PNG reader logs two lines for each
        (project / "calib" / f"bad{i:02d}.{'png' if i % 2 else 'jpg'}").write_bytes(
            b"\x89PNG\r\n\x1a\n not really" if i % 2 else b"broken")
    res = run_cli("build", "--model", "net.py:make", *BASE, "--calib", "calib",
                  cwd=project)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if "undecodable" in ln]
    assert len(lines) == 1 and "40 undecodable image(s)" in lines[0], res.stderr
    assert not [ln for ln in res.stderr.splitlines() if ln.lstrip().startswith(("[ WARN:", "[ERROR:"))], res.stderr


# ---------------------------------------------------------------- other commands
OTHER_CASES = [
    ("command-typo", None, ["buidl"], "invalid choice: 'buidl'"),
    ("abbreviated-flag", None, ["build", "--targ", "intel-cpu"], "unrecognized arguments: --targ"),
    ("export-out-suffix", None, ["export", "--out", "model.txt"], "must end in .onnx"),
    ("export-out-folder", "onnx-dir", ["export", "--out", "model.onnx"], "is a folder"),
    ("export-model-missing", None, ["export", "--model", "nothere.py:make", *BASE], "does not exist"),
    ("validate-missing-path", None, ["validate", "nothere"], "no such bundle or dist folder"),
    ("validate-empty-folder", "calib-empty", ["validate", "calib"], "no bundle in it"),
    ("validate-no-dist", None, ["validate"], "no such bundle or dist folder"),
    ("validate-labels-no-images", None, ["validate", "--val-labels", "lab"], "has no effect without --val-images"),
    ("validate-max-images", None, ["validate", "--max-images", "0"], "0 is not 1 or more"),
    ("inspect-garbage-onnx", "garbage-onnx", ["inspect", "g.onnx"], "is not a readable ONNX model"),
    ("inspect-empty-onnx", "empty-onnx", ["inspect", "e.onnx"], "e.onnx is not an ONNX model: it holds no graph (0 "
                                                                "bytes)"),
    ("inspect-missing", None, ["inspect", "nothere"], "does not exist"),
    ("inspect-not-bundle", "calib-empty", ["inspect", "calib"], "is not an edgeport bundle"),
    ("inspect-other-file", "names-3", ["inspect", "names.txt"], "expected a bundle folder or an .onnx file"),
    ("flash-not-bundle", "calib-empty", ["flash", "calib", "--host", "pi@10.0.0.9"], "not a bundle folder"),
    ("flash-no-host", None, ["flash", "dist/x"], "no host"),
    ("flash-identity-missing", None, ["flash", "dist/x", "--host", "pi@10.0.0.9", "--identity", "nokey"],
     "no such key file"),
    ("flash-inventory-toml", "config-toml", ["flash", "dist/x", "--inventory", "edgeport.toml"], "inventory"),
    ("flash-inventory-no-address", "inventory-no-address", ["flash", "dist/x", "--inventory", "hosts.toml"],
     "host 1 has no address"),
    ("flash-jobs-zero", None, ["flash", "dist/x", "--host", "pi@10.0.0.9", "--jobs", "0"], "0 is not 1 or more"),
    ("devices-no-host", None, ["devices", "status"], "no host"),
    # deploy input, checked before any device is contacted (no ssh-keyscan, no "is sshd running" guess)
    ("flash-port-out-of-range", None, ["flash", "dist/x", "--host", "root@127.0.0.1:99999"],
     "port 99999 is not a port number from 1 to 65535"),
    ("flash-port-text", None, ["flash", "dist/x", "--host", "root@127.0.0.1:abc"],
     "port abc is not a port number from 1 to 65535"),
    ("flash-user-no-address", None, ["flash", "dist/x", "--host", "root@"], "no address after '@'"),
    ("flash-host-is-an-option", None, ["flash", "dist/x", "--host=-oProxyCommand=touch /tmp/pwned"],
     "begins with '-'"),
    ("flash-address-is-an-option", None, ["flash", "dist/x", "--host", "pi@-oProxyCommand=x"],
     "is neither a host name nor an IP address"),
    ("flash-port-flag", None, ["flash", "dist/x", "--host", "pi@10.0.0.9", "--port", "65536"],
     "--port: port 65536 is not a port number"),
    ("devices-bad-host", None, ["devices", "status", "--host", "pi@bad host"], "is neither a host name"),
    ("flash-inventory-bad-port", "inventory-bad-port", ["flash", "dist/x", "--inventory", "hosts.toml"],
     "host 1: port 70000 is not a port number"),
    ("fleet-inventory-bad-yaml", "inventory-bad-yaml", ["fleet", "rollout", "b", "--inventory", "hosts.yml"],
     "Ansible cannot read it: line 6, column 13: expected ',' or '}'"),
    ("fleet-bundle-damaged", "damaged-bundle", ["fleet", "rollout", "b", "--inventory", "hosts.yml"],
     "b is damaged (model.xml: sha256 mismatch)"),
]


@pytest.mark.parametrize(("setup", "args", "words"), [c[1:] for c in OTHER_CASES], ids=[c[0] for c in OTHER_CASES])
def test_other_commands_refuse_bad_input(project: Path, setup: str | None, args: list[str], words: str) -> None:
    if setup == "garbage-onnx":
        (project / "g.onnx").write_bytes(b"\x08\x07garbage that is not protobuf" * 10)
    elif setup == "empty-onnx":
        (project / "e.onnx").write_bytes(b"")
    elif setup == "inventory-no-address":
        (project / "hosts.toml").write_text('[[host]]\nname = "cam"\n')
    elif setup == "inventory-bad-port":
        (project / "hosts.toml").write_text('[[host]]\naddress = "pi@10.0.0.9"\nport = 70000\n')
    elif setup in ("inventory-bad-yaml", "damaged-bundle"):
        ok = "        dev1: {ansible_host: 127.0.0.1}\n" if setup == "damaged-bundle" else \
            "        dev1: {ansible_host: 127.0.0.1\n        dev2:\n"
        (project / "hosts.yml").write_text("all:\n  children:\n    intel_cpu:\n      hosts:\n" + ok)
        (project / "b").mkdir()
        (project / "b" / "model.xml").write_text("<net/>")
        (project / "b" / "runner.py").write_text("")
        import hashlib

        files = {n: hashlib.sha256((project / "b" / n).read_bytes()).hexdigest() for n in ("model.xml", "runner.py")}
        if setup == "damaged-bundle":
            files["model.xml"] = "0" * 64  # not the file's
        (project / "b" / "manifest.json").write_text(json.dumps({
            "schema": 2, "target": "intel-cpu", "backend": "openvino", "precision": "int8",
            "model": {"name": "m"}, "files": files, "verdict": {"status": "passed"}}))
    elif setup:
        _setup(project, setup)
    _assert_clean(run_cli(*args, cwd=project), words, project)


def test_validate_refuses_a_bundle_whose_recorded_weights_changed(tmp_path: Path) -> None:
    """Without a config, validate takes the model from the manifest, and refuses when its weights changed."""
    import torch
    from torch import nn

    (tmp_path / "net.py").write_text(NET)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    torch.save(model.state_dict(), tmp_path / "w.pth")
    res = run_cli("build", "--model", "net.py:make", "--weights", "w.pth", *BASE,
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    ok = run_cli("validate", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    state = torch.load(tmp_path / "w.pth")
    state["3.bias"] += 1.0
    torch.save(state, tmp_path / "w.pth")
    _assert_clean(run_cli("validate", cwd=tmp_path), "changed since the build", tmp_path / "nodist")
    (tmp_path / "w.pth").unlink()
    _assert_clean(run_cli("validate", cwd=tmp_path), "are not there; pass --weights", tmp_path / "nodist")


# ---------------------------------------------------------------- the runner
def _runner(bundle: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "runner.py", *args], cwd=bundle, capture_output=True, text=True,
                          timeout=120)


RUNNER_CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("max-frames-negative", lambda d: ["synthetic://", "--headless", "--max-frames", "-3"],
     "argument --max-frames: -3 is below 0"),
    ("duration-negative", lambda d: ["synthetic://", "--headless", "--duration", "-1"], "is not 0 or more"),
    ("requests-zero", lambda d: ["synthetic://", "--headless", "--requests", "0"], "0 is below 1"),
    ("threads-negative", lambda d: ["synthetic://", "--headless", "--threads", "-2"], "-2 is below 0"),
    ("hint-unknown", lambda d: ["synthetic://", "--headless", "--hint", "fast"], "invalid choice: 'fast'"),
    ("timeout-text", lambda d: ["synthetic://", "--headless", "--timeout", "soon"], "is not a number of seconds"),
    ("source-missing", lambda d: [str(d / "nothere.mp4"), "--headless"], "does not exist"),
    ("folder-all-corrupt", lambda d: [str(_write_images(d / "bad", 5, corrupt=True)), "--headless"],
     "5 undecodable: none could be read"),
    ("folder-empty", lambda d: [str(_mkdir(d / "empty")), "--headless"], "holds no images"),
    ("video-truncated", lambda d: [str(_truncated_video(d / "cut.avi")), "--headless"], "truncated"),
    ("loop-live-source", lambda d: ["synthetic://", "--headless", "--loop"], "--loop replays a video file"),
    ("camera-missing", lambda d: ["/dev/video97", "--headless"], "camera /dev/video97 does not exist"),
    ("csi-no-gstreamer", lambda d: ["csi://0", "--headless"], "csi:// needs OpenCV built with GStreamer"),
    ("csi-bad-sensor", lambda d: ["csi://front", "--headless"], "GStreamer"),
    ("topk-on-segmentation", lambda d: ["synthetic://", "--headless", "--topk", "3"],
     "--topk has no effect on a segmentation model"),
    ("decode-threads-on-synthetic", lambda d: ["synthetic://", "--headless", "--decode-threads", "2"],
     "--decode-threads has no effect on synthetic://"),
    ("abbreviated-option", lambda d: ["synthetic://", "--headles", "--max-frames", "2"],
     "unrecognized arguments: --headles"),
    ("synthetic-width-text", lambda d: ["synthetic://?width=abc", "--headless", "--max-frames", "2"],
     "width=abc: give a whole number of at least 16"),
    ("synthetic-unknown-parameter", lambda d: ["synthetic://?widht=320", "--headless", "--max-frames", "2"],
     "'widht=320' is not a parameter of synthetic:// (it takes width, height, fps, frames, objects"),
    ("synthetic-over-max-pixels", lambda d: ["synthetic://?width=10000&height=8000", "--headless"],
     "10000x8000 (80 MP) is over the limit of 40 MP (--max-pixels)"),
    ("max-pixels-zero", lambda d: ["synthetic://", "--headless", "--max-pixels", "0"],
     "give a number of megapixels above 0"),
    ("jsonl-missing-folder", lambda d: ["synthetic://", "--headless", "--jsonl", str(d / "missing" / "x.jsonl")],
     "the folder"),
    ("save-missing-folder", lambda d: ["synthetic://", "--headless", "--save", str(d / "missing" / "out.mp4")],
     "does not exist; create it first"),
    ("save-a-folder", lambda d: ["synthetic://", "--headless", "--save", str(_mkdir(d / "videos"))],
     "is a folder; give a file in it"),
    ("save-unknown-extension", lambda d: ["synthetic://", "--headless", "--save", str(d / "out.xyz")],
     "give a video file ending in .mp4"),
]


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.mark.parametrize(("make_args", "words"), [c[1:] for c in RUNNER_CASES], ids=[c[0] for c in RUNNER_CASES])
def test_runner_refuses_bad_input(bundle: Path, tmp_path: Path, make_args: Callable[[Path], list[str]],
                                  words: str) -> None:
    res = _runner(bundle, *make_args(tmp_path))
    _assert_clean(res, words, tmp_path / "nodist")


def test_an_unwritable_jsonl_never_aborts_the_runner(bundle: Path, tmp_path: Path) -> None:
    """It was a raw FileNotFoundError, and in 4 of 17 runs an abort (rc 134) from the capture thread left running:
    the path is checked before any source opens, so every run ends the same way."""
    for _ in range(6):
        res = _runner(bundle, "synthetic://", "--headless", "--jsonl", str(tmp_path / "missing" / "x.jsonl"))
        assert res.returncode == 2, res.stderr
        _assert_clean(res, "--jsonl", tmp_path / "nodist")


@pytest.mark.parametrize("damage", ["schema-newer", "schema-old", "not-json", "no-manifest", "input-shape"])
def test_runner_refuses_a_manifest_it_cannot_trust(bundle: Path, tmp_path: Path, damage: str) -> None:
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    path = copy / "manifest.json"
    m = json.loads(path.read_text())
    if damage == "schema-newer":
        m["schema"] += 1
        path.write_text(json.dumps(m))
        words = "newer than this edgeport reads"
    elif damage == "schema-old":
        m["schema"] = 1
        path.write_text(json.dumps(m))
        words = "rebuild it with this edgeport"
    elif damage == "input-shape":  # edited in both places that declare it; the golden inputs keep the truth
        m["inputs"][0]["shape"] = m["preprocess"]["shape"] = [1, 3, 64, 64]
        path.write_text(json.dumps(m))
        words = "manifest.json's inputs[0].shape 1x3x64x64 is not the shape of golden/input_0.npy (1x3x120x160)"
    elif damage == "not-json":
        path.write_text("{ not json")
        words = "cannot read"
    else:
        path.unlink()
        words = "cannot read"
    for args in (["--selftest"], ["synthetic://", "--headless", "--max-frames", "2"]):
        _assert_clean(_runner(copy, *args), words, tmp_path / "nodist")
    if damage.startswith("schema"):
        _assert_clean(run_cli("inspect", str(copy)), words.split(" this")[0], tmp_path / "nodist")
        _assert_clean(run_cli("validate", str(copy)), words.split(" this")[0], tmp_path / "nodist")
