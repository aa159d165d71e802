"""Every cached stage re-runs when an input it depends on changes, and only then.

One small project is built once (OpenVINO FP32 and INT8, a calibration folder, a validation folder); each case
copies it with its build folder, changes one input, builds again, and compares which stage folders are new
(build/<stage>/<key>/stage.json: a stage that re-ran wrote a new key) and which bundles were rewritten with the
stages that input feeds. Stages that must not re-run are checked too: a cache that re-runs everything is correct
but useless.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import CAMVID, needs_openvino, needs_torch, run_cli

pytestmark = [needs_torch, needs_openvino]

NET = '''
import torch
from torch import nn


def make():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))
'''
ARGS = ["--model", "net.py:make", "--input", "1x3x32x32", "--task", "classification", "--target", "intel-cpu:fp32",
        "--target", "intel-cpu:int8", "--calib", "calA", "--val-images", "valA"]
FP32, INT8 = "artifact/openvino-fp32", "artifact/openvino-int8"
RUN32, RUN8 = "hostrun/openvino-fp32", "hostrun/openvino-int8"
EVAL32, EVAL8 = "evaluation/openvino-fp32", "evaluation/openvino-int8"
EVERY = {"calibration", "export", "validation", FP32, INT8, RUN32, RUN8, EVAL32, EVAL8}


def _images(folder: Path, first: int, n: int) -> None:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    frames = sorted((CAMVID / "train").glob("*.png"))
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.resize(cv2.imread(str(frames[first + i])), (48, 36)))


def _stages(project: Path) -> set[str]:
    return {str(p.parent.relative_to(project / "build")) for p in (project / "build").rglob("stage.json")}


def _bundle_keys(project: Path) -> dict[str, str]:
    return {p.parent.name: json.loads(p.read_text())["build_key"] for p in (project / "dist").glob("*/manifest.json")}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from torch import nn

    p = tmp_path_factory.mktemp("cachekeys")
    (p / "net.py").write_text(NET)
    _images(p / "calA", 0, 60)
    _images(p / "calB", 100, 60)
    _images(p / "valA", 200, 12)
    _images(p / "valB", 220, 12)
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(8, 4))
        torch.save(model.state_dict(), p / f"w{seed}.pth")
    res = run_cli("build", *ARGS, "--weights", "w1.pth", cwd=p)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {s.rsplit("/", 1)[0] for s in _stages(p)} == EVERY, _stages(p)
    return p


def _swap_one_image(p: Path) -> None:  # the same name, another frame of the same drive
    shutil.copy(p / "calB" / "000.png", p / "calA" / "000.png")


def _edit_source(p: Path) -> None:
    (p / "net.py").write_text(NET.replace("nn.Linear(8, 4))", "nn.Linear(8, 4))  # edited"))


def _config(text: str):
    return lambda p: (p / "edgeport.toml").write_text(text)


# (id, what to change (a function of the project), extra flags, the stages that must re-run, bundles rewritten)
CASES = [
    ("nothing", None, [], set(), False),
    ("calib-one-image", _swap_one_image, [], {"calibration", "export", INT8, RUN32, RUN8, EVAL8}, True),
    ("calib-other-folder", None, ["--calib", "calB"], {"calibration", "export", INT8, RUN32, RUN8, EVAL8}, True),
    ("name", None, ["--name", "mynet"], {"export", "validation", FP32, INT8, RUN32, RUN8, EVAL32, EVAL8}, True),
    ("model-source", _edit_source, [], {"export"}, True),
    ("weights", None, ["--weights", "w2.pth"], EVERY - {"calibration"}, True),
    ("preprocessing", None, ["--mean", "0.5", "0.5", "0.5"], EVERY, True),
    ("max-images", _config("[calibration]\nmax_images = 50\n"), [],
     {"calibration", "export", INT8, RUN32, RUN8, EVAL8}, True),
    ("opset", None, ["--opset", "17"], EVERY - {"calibration"}, True),
    # INT8's accuracy-aware loop reads the validation set's selection half (agreement with FP32: no labels here)
    ("val-other-folder", None, ["--val-images", "valB"], {"validation", INT8, RUN8, EVAL32, EVAL8}, True),
    ("val-split", _config('[validation]\nsplit = "alternate"\n'), [], {INT8, RUN8, EVAL32, EVAL8}, True),
    ("int8-subset", None, ["--int8-subset", "40"], {INT8, RUN8, EVAL8}, True),
    ("int8-preset", None, ["--int8-preset", "mixed"], {INT8, RUN8, EVAL8}, True),
    ("tolerance", _config('[validation.tolerance."*"]\nmin_cosine = 0.5\n'), [], set(), True),
]


@pytest.mark.slow
@pytest.mark.parametrize(("change", "flags", "reruns", "rewritten"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_stage_reruns_exactly_when_an_input_changes(built: Path, tmp_path: Path, change, flags: list[str],
                                                      reruns: set[str], rewritten: bool) -> None:
    p = tmp_path / "p"
    shutil.copytree(built, p, symlinks=True)
    # The copy is another folder: paths the manifests record (the project, the calibration folder) differ, so the
    # first build there re-runs what records them; the case's change is measured from that build.
    assert run_cli("build", *ARGS, "--weights", "w1.pth", cwd=p).returncode == 0
    before, keys = _stages(p), _bundle_keys(p)
    if change is not None:
        change(p)
    args = list(ARGS)
    for flag in flags:  # a flag given here replaces the baseline's
        if flag.startswith("--") and flag in args:
            i = args.index(flag)
            del args[i:i + 2]
    weights = [] if "--weights" in flags else ["--weights", "w1.pth"]
    res = run_cli("build", *args, *weights, *flags, cwd=p)
    assert res.returncode == 0, res.stderr[-3000:]
    ran = {s.rsplit("/", 1)[0] for s in _stages(p) - before}
    assert ran == reruns, f"re-ran {sorted(ran)}, expected {sorted(reruns)}"
    after = _bundle_keys(p)
    assert set(after) == set(keys)
    assert (after != keys) == rewritten, (keys, after)
    if not rewritten:
        assert "nothing changed" in res.stdout, res.stdout[-1500:]
    if "--name" in flags:  # it was dropped on a used build folder: the manifest kept the factory's name
        names = {json.loads(m.read_text())["model"]["name"] for m in (p / "dist").glob("*/manifest.json")}
        assert names == {"mynet"}, names


def test_fewer_samples_than_the_last_build_compare_with_their_own_outputs(built: Path, tmp_path: Path) -> None:
    """A second calibration folder of 5 images in the same build folder: the FP32 artifact is not recompiled, it
    runs on the new samples, and its parity is measured on them (it compared the new reference with the old
    samples' outputs, and 5 against 8 samples ended in an internal error)."""
    p = tmp_path / "p"
    shutil.copytree(built, p, symlinks=True)
    _images(p / "calC", 300, 5)
    fp32 = ARGS[:6] + ["--target", "intel-cpu:fp32", "--weights", "w1.pth"]
    res = run_cli("build", *fp32, "--calib", "calC", cwd=p)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((p / "dist" / "intel-cpu-fp32" / "manifest.json").read_text())
    assert m["verdict"]["status"] == "passed" and m["provenance"]["samples"]["count"] == 5
    assert m["parity"]["artifact"]["output"]["max_rel"] < 1e-4, m["parity"]["artifact"]
    row = [ln for ln in res.stdout.splitlines() if ln.startswith("compile openvino fp32")]
    assert len(row) == 1 and row[0].split()[-1] == "cached", res.stdout[-2000:]
    # the bundle was written anew around a cached compile, and the summary says which
    assert "1 target(s): 1 built (1 of them from cached compiles), 0 cached, 0 failed" in res.stdout, res.stdout[-500:]
