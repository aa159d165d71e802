"""The models users bring from their ecosystems: an Ultralytics YOLO11n (a factory of the user's own and an
``ultralytics:`` checkpoint), a Hugging Face SegFormer folder (``hf:``) and timm classifiers (``timm:``), each
built for OpenVINO, TFLite and TensorRT (emulated) at FP32 and INT8 offline and passed by ``edgeport validate``.
The models are made in code under fixed seeds (tests/models/yolo.py, the SegFormer config below)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import has, run_cli, run_cli_offline

pytestmark = pytest.mark.skipif(not (has("openvino") and has("onnx2tf") and has("torch")),
                                reason="the backends' extras are not installed")
ROOT = Path(__file__).resolve().parents[2]
EVERY = ["intel-cpu:int8", "arm64-linux:int8", "jetson-orin-nano:int8",
         "intel-cpu:fp32", "arm64-linux:fp32", "jetson-orin-nano:fp32"]


def _targets() -> list[str]:
    return [a for t in EVERY for a in ("--target", t)]


def _build_and_validate(project: Path, model: str, camvid: Path, *extra: str) -> dict:
    """Build every target offline, then validate dist/; both must pass. Returns the build's JSON report."""
    res = run_cli_offline("build", "--model", model, "--calib", str(camvid / "train"), "--int8-subset", "64",
                          *_targets(), *extra, "--report", "reports", cwd=project, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((project / "reports" / "report.json").read_text())
    assert report["ok"] is True and len(report["targets"]) == len(EVERY), report["targets"]
    data = list(extra[extra.index("--val-images"):][:2]) if "--val-images" in extra else []
    val = run_cli("validate", "dist", *data, cwd=project, timeout=1800)
    assert val.returncode == 0, val.stdout[-3000:] + val.stderr[-3000:]
    assert " 0 failed" in val.stdout, val.stdout[-2000:]
    return report


def _manifest(project: Path, name: str) -> dict:
    return json.loads((project / "dist" / name / "manifest.json").read_text())


@pytest.mark.skipif(not has("ultralytics"), reason="ultralytics not installed")
def test_yolo_factory_with_its_head_in_export_mode_builds(tmp_path: Path, camvid: Path) -> None:
    """The issue's case: a factory returning DetectionModel with the Detect head in export mode, the yolo decoder,
    letterbox; edgeport's passes before export used to leave inference tensors in the head."""
    (tmp_path / "names.txt").write_text("car\npedestrian\nsign\n")
    (tmp_path / "edgeport.toml").write_text(f"""[model]
model = "{ROOT / 'tests' / 'models' / 'yolo.py'}:make"
[input]
shape = "1x3x160x160"
[preprocess]
resize = "letterbox"
mean = [0.0, 0.0, 0.0]
std = [1.0, 1.0, 1.0]
[task]
type = "detection"
decoder = "yolo"
labels_file = "names.txt"
""")
    res = run_cli("build", "--calib", str(camvid / "train"), "--int8-subset", "64", "--target", "intel-cpu:fp32",
                  "--target", "jetson-orin-nano:int8", cwd=tmp_path, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Inference tensors" not in res.stderr


@pytest.mark.skipif(not has("ultralytics"), reason="ultralytics not installed")
def test_ultralytics_checkpoint_builds_everywhere_with_what_it_carries(tmp_path: Path, camvid: Path) -> None:
    from tests.models.yolo import save_checkpoint

    save_checkpoint(tmp_path / "best.pt", imgsz=160)
    # Random weights: INT8 agrees 75-83 % with FP32 on the golden frames, under the 0.95 gate, and the
    # accuracy-aware search that then keeps layers in float ran past 15 minutes of CI's time (NNCF ranked layers
    # 13 times). This test is about intake (what the checkpoint carries, every backend building and validating),
    # so the project (which validate reads too) sets its gate under what random weights give;
    # tests/integration/test_accuracy_fallback.py covers the accuracy-aware loops.
    (tmp_path / "edgeport.toml").write_text('[model]\nmodel = "ultralytics:best.pt"\n'
                                            '[validation.tolerance."*"]\nmin_agreement = 0.7\n')
    home = Path.home() / ".config" / "Ultralytics"
    before = home.exists()
    _build_and_validate(tmp_path, "ultralytics:best.pt", camvid)
    m = _manifest(tmp_path, "intel-cpu-int8")
    pre = m["preprocess"]
    assert pre["shape"] == [1, 3, 160, 160] and pre["resize"] == "letterbox" and pre["labels"] == [
        "car", "pedestrian", "sign"]
    assert pre["task"] == "detection" and pre["task_options"]["decoder"] == "boxes"
    assert sorted(o["name"] for o in m["outputs"]) == ["boxes", "scores"]  # scores keep their own INT8 scale
    assert home.exists() == before  # no settings file written in the user's home


@pytest.mark.skipif(not has("transformers"), reason="transformers not installed")
def test_huggingface_segformer_folder_builds_everywhere(tmp_path: Path, camvid: Path) -> None:
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    names = ["sky", "road", "car", "other"]
    torch.manual_seed(0)
    cfg = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[4, 2], hidden_sizes=[16, 32],
                          num_attention_heads=[1, 2], decoder_hidden_size=32, num_labels=len(names),
                          id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    SegformerForSemanticSegmentation(cfg).save_pretrained(tmp_path / "segformer")
    SegformerImageProcessor(size={"height": 128, "width": 160}).save_pretrained(tmp_path / "segformer")
    _build_and_validate(tmp_path, "hf:segformer", camvid)
    m = _manifest(tmp_path, "intel-cpu-int8")
    assert m["preprocess"]["shape"] == [1, 3, 128, 160] and m["preprocess"]["labels"] == names
    assert m["outputs"][0]["shape"] == [1, len(names), 128, 160]  # quarter-resolution logits resized in the graph


@pytest.mark.skipif(not has("timm"), reason="timm not installed")
@pytest.mark.parametrize("name", ["convnext_atto"])
def test_timm_models_build_everywhere(tmp_path: Path, camvid: Path, name: str) -> None:
    """Briefly trained weights (tests/models/classifier.py: random ones tie, and INT8 flips the ties) given with
    --weights; agreement on CamVid val's frames (a plain image folder) beside the golden frames, which INT8's
    accuracy-aware loop holds on their selection half by default. One model (LayerNorm, GELU, depthwise
    convolutions): regnetx_002 passed beside it and was left out for CI's time."""
    from tests.models.classifier import train

    weights = train(name, camvid, tmp_path / f"{name}.pth")
    _build_and_validate(tmp_path, f"timm:{name}?num_classes=5", camvid, "--weights", weights.name,
                        "--input", "1x3x128x128", "--val-images", str(camvid / "val"))
    m = _manifest(tmp_path, "intel-cpu-int8")
    assert m["preprocess"]["shape"] == [1, 3, 128, 128] and m["outputs"][0]["shape"] == [1, 5]
    assert m["preprocess"]["mean"] == pytest.approx([0.485, 0.456, 0.406], abs=1e-6)  # from timm's data config
    fb = _manifest(tmp_path, "jetson-orin-nano-int8")["provenance"]["accuracy_fallback"]
    assert fb["metric"] == "agreement" and not fb["labelled"] and fb["max_drop"] == pytest.approx(5.0), fb


def test_hub_forms_fail_with_one_line(tmp_path: Path) -> None:
    cases = [
        (["--model", "ultralytics:missing.pt"], "Ultralytics checkpoint"),
        (["--model", "ultralytics:yolo11n.yaml?nc=0"], "nc=0 must be a whole number"),
        (["--model", "hf:nowhere"], "is not a folder"),
        (["--model", "timm:resnet18?pretrained=True"], "never downloads weights"),
    ]
    for args, words in cases:
        res = run_cli("build", *args, "--target", "intel-cpu:fp32", cwd=tmp_path, timeout=300)
        assert res.returncode != 0 and words in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
