#!/usr/bin/env python3
"""The same YOLO weights through Ultralytics' own exporter and through edgeport, scored by one evaluator and
timed on one video.

Accuracy: each model file (Ultralytics' OpenVINO FP32 and INT8 and LiteRT INT8 exports; edgeport's OpenVINO,
TFLite and TensorRT-emulated bundles) runs on the same preprocessed frames (edgeport's letterbox, pad 114, RGB,
/255) of the report half of CamVid val, its raw outputs go through the same decoding and NMS and the same
pycocotools COCOeval against the boxes derived from CamVid's label maps (scripts/camvid_boxes.py's rule). Both
tools calibrate INT8 on CamVid train frames (Ultralytics through a data yaml whose val split is train).

Speed: the OpenVINO INT8 model of each tool on the same video (CamVid val frames at 480x360, looped), Ultralytics'
``predict`` loop against edgeport's runner (its default for a video file, OpenVINO's throughput hint, and
``--hint latency``, the hint Ultralytics uses; the same threads), each in its own process, interleaved,
``--rounds`` times; steady-state FPS (the frames after the first ``WARMUP``) and FPS with the process start
included. Prints a Markdown table.

Example:
    .venv/bin/python scripts/train_yolo_camvid.py --epochs 30
    .venv/bin/python scripts/versus_ultralytics.py --weights build/yolo-camvid/runs/train/weights/last.pt
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from camvid_boxes import CAMVID, MIN_AREA  # noqa: E402
from train_yolo_camvid import layout  # noqa: E402

WARMUP = 10
PREDICT = """
import json, sys, time
from ultralytics import YOLO
model = YOLO(sys.argv[1], task="detect")
stamps = []
for _ in model.predict(source=sys.argv[2], stream=True, imgsz=int(sys.argv[3]), conf=0.25, iou=0.45, verbose=False):
    stamps.append(time.perf_counter())
print(json.dumps(stamps))
"""


def run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
        ok: tuple[int, ...] = (0,)) -> tuple[float, str]:
    """(seconds, stdout) of a command that must exit with one of ``ok``."""
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if res.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t, res.stdout


def edgeport_build(weights: Path, camvid: Path, data: Path, out: Path, imgsz: int) -> float:
    """Build the bundles; returns the build's seconds."""
    project = out / "edgeport"
    project.mkdir(parents=True, exist_ok=True)
    targets = ["intel-cpu:fp32", "intel-cpu:int8", "arm64-linux:fp32", "arm64-linux:int8", "jetson-orin-nano:int8"]
    seconds, _ = run([sys.executable, "-m", "edgeport.cli", "build", "--model", f"ultralytics:{weights.resolve()}",
                      "--calib", str(camvid / "train"), "--val-images", str(data / "images" / "val"),
                      "--val-labels", str(data / "labels" / "val"),
                      *[a for t in targets for a in ("--target", t)]], cwd=project, ok=(0, 3))
    return seconds  # 3: a target failed its gates; its bundle is in dist/failed and is scored all the same


def ultralytics_exports(weights: Path, data: Path, out: Path, imgsz: int) -> dict[str, tuple[Path, float]]:
    """{name: (model path, export seconds)} of Ultralytics' own exports, INT8 calibrated on CamVid train."""
    from ultralytics import YOLO

    folder = out / "ultralytics"
    folder.mkdir(parents=True, exist_ok=True)
    model_pt = folder / "model.pt"
    shutil.copy(weights, model_pt)
    calib = folder / "calib.yaml"  # Ultralytics calibrates on the data's val split: point it at train
    calib.write_text((data / "data.yaml").read_text().replace("val: images/val", "val: images/train"))
    record = folder / "exports.json"  # an earlier run's exports of the same weights are reused
    if record.is_file():
        old = json.loads(record.read_text())
        same = old.get("weights_mtime") == weights.stat().st_mtime
        if same and all(Path(v[0]).exists() for v in old["found"].values()):
            return {k: (Path(v[0]), v[1]) for k, v in old["found"].items()}
    found = {}
    for name, kw in (("openvino fp32", {"format": "openvino"}),
                     ("openvino int8", {"format": "openvino", "int8": True, "data": str(calib)}),
                     ("litert int8", {"format": "tflite", "int8": True, "data": str(calib)})):
        t = time.perf_counter()
        try:
            path = YOLO(str(model_pt)).export(imgsz=imgsz, **kw)
        except Exception as e:  # an exporter that cannot run here is a row that says so
            print(f"ultralytics {name}: export failed: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        found[name] = (Path(path), time.perf_counter() - t)
    record.write_text(json.dumps({"weights_mtime": weights.stat().st_mtime,
                                  "found": {k: [str(v[0]), v[1]] for k, v in found.items()}}))
    return found


def _ultralytics_runtime(path: Path) -> Any:
    """A callable NCHW float batch -> [N, 4+C, A] for an Ultralytics OpenVINO folder or .tflite file."""
    if path.is_dir() and any(path.glob("*.xml")):
        import openvino as ov

        compiled = ov.Core().compile_model(str(next(path.glob("*.xml"))), "CPU")
        return lambda x: compiled(x)[0]
    files = sorted(path.glob("*.tflite")) if path.is_dir() else [path]
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(files[0]))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]

    def infer(x: np.ndarray) -> np.ndarray:
        rows = []
        for frame in x:
            nhwc = frame[None] if inp["shape"][1] == 3 else frame.transpose(1, 2, 0)[None]  # litert-torch: NCHW
            if inp["dtype"] != np.float32:
                scale, zero = inp["quantization"]
                nhwc = np.clip(np.round(nhwc / scale + zero), -128, 127).astype(inp["dtype"])
            interp.set_tensor(inp["index"], nhwc)
            interp.invoke()
            y = interp.get_tensor(out["index"])
            if out["dtype"] != np.float32:
                scale, zero = out["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            rows.append(y[0])
        return np.stack(rows)

    return infer


def score_all(weights: Path, data: Path, out: Path, exports: dict[str, tuple[Path, float]],
              imgsz: int, bootstrap: int = 0) -> dict[str, dict[str, Any]]:
    """{model: {'map', 'map50'}} on the report half of CamVid val, one evaluator for every model; with
    ``bootstrap`` draws, each INT8 model's 'interval': the 95 % paired bootstrap interval of its mAP minus
    PyTorch's over the frames."""
    import dataclasses

    import torch

    from edgeport.evaluate import split_halves
    from edgeport.intake import carried_spec
    from edgeport.model import load_model
    from edgeport.preprocess import to_layout
    from edgeport.tasks import get as get_task
    from edgeport.validate import open_bundle

    source = f"ultralytics:{weights.resolve()}"
    spec = carried_spec(source, ROOT)
    task = get_task("detection")
    ds = task.load(data / "images" / "val", data / "labels" / "val", spec, 10_000)
    idx = split_halves(ds, "blocks")["report"]
    sub = dataclasses.replace(ds.subset(idx), spec=spec)
    x = ds.inputs[idx]
    yolo_spec = dataclasses.replace(spec, task_options={**spec.task_options, "decoder": "yolo", "box_format": "cxcywh",
                                                        "normalized": False})
    sub_yolo = dataclasses.replace(sub, spec=yolo_spec)
    rows: dict[str, dict[str, Any]] = {}
    model = load_model(source, None, ROOT)
    with torch.no_grad():
        outs = [model(torch.from_numpy(x[i:i + 1])) for i in range(len(x))]
    ref = {k: np.concatenate([o[k].numpy() for o in outs]) for k in ("boxes", "scores")}
    packed: dict[str, tuple[Any, Any]] = {"pytorch fp32": (task.pack(ref, ["boxes", "scores"], spec), sub)}
    dist = out / "edgeport" / "dist"
    for bundle in sorted([*dist.iterdir(), *(dist / "failed").glob("*")]):
        manifest_path = bundle / "manifest.json"
        if not manifest_path.is_file():
            continue
        manifest = json.loads(manifest_path.read_text())
        rt, label, _ = open_bundle(bundle, manifest)
        with rt:
            got = rt.run_batches(to_layout(x, "NCHW", manifest["preprocess"]["layout"]))
        names = [o["name"] for o in manifest["outputs"]]
        verdict = " FAILED its gates" if bundle.parent.name == "failed" else ""
        packed[f"edgeport {bundle.name} ({label}){verdict}"] = (task.pack(got, names, spec), sub)
    for name, (path, _) in exports.items():
        raw = np.concatenate([_ultralytics_runtime(path)(x[i:i + 1]) for i in range(len(x))])
        if raw[:, :4].max() <= 2.0:  # LiteRT exports divide the boxes by the input size
            raw = raw.copy()
            raw[:, :4] *= imgsz
        packed[f"ultralytics {name}"] = (task.pack({"output": raw}, ["output"], yolo_spec), sub_yolo)
    rows = {name: task.metrics(out, ds_, "NCHW") for name, (out, ds_) in packed.items()}
    if bootstrap:
        draws = np.random.default_rng(0).integers(0, len(x), size=(bootstrap, len(x)))
        ref_maps = [task.metrics(packed["pytorch fp32"][0][d], sub.subset(list(d)), "NCHW")["map"] for d in draws]
        for name, (out, ds_) in packed.items():
            if "int8" in name:
                diffs = [task.metrics(out[d], ds_.subset(list(d)), "NCHW")["map"] - r for d, r in zip(draws, ref_maps)]
                rows[name]["interval"] = tuple(float(v) for v in np.percentile(diffs, [2.5, 97.5]))
    return rows


def video(camvid: Path, path: Path, loops: int) -> int:
    """CamVid val frames at 480x360 as an mp4, ``loops`` times; returns the frame count."""
    import cv2

    frames = sorted((camvid / "val").glob("*.png"))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (480, 360))
    for _ in range(loops):
        for f in frames:
            writer.write(cv2.resize(cv2.imread(str(f)), (480, 360)))
    writer.release()
    return len(frames) * loops


def speed(ov_int8: Path, bundle: Path, clip: Path, frames: int, imgsz: int, rounds: int,
          threads: int) -> dict[str, dict[str, float]]:
    """Steady-state and whole-process FPS of each tool's OpenVINO INT8 model on ``clip``, interleaved."""
    env = {"YOLO_OFFLINE": "True", "YOLO_VERBOSE": "False"}
    runners = {"edgeport runner": [], "edgeport runner --hint latency": ["--hint", "latency"]}
    got: dict[str, dict[str, list[float]]] = {tool: {"steady": [], "process": []}
                                              for tool in ("ultralytics predict", *runners)}
    for _ in range(rounds):
        seconds, out = run([sys.executable, "-c", PREDICT, str(ov_int8), str(clip), str(imgsz)], env=env)
        stamps = json.loads(out.strip().splitlines()[-1])
        got["ultralytics predict"]["steady"].append((len(stamps) - WARMUP) / (stamps[-1] - stamps[WARMUP - 1]))
        got["ultralytics predict"]["process"].append(len(stamps) / seconds)
        for tool, extra in runners.items():
            with tempfile.TemporaryDirectory() as tmp:
                jsonl = Path(tmp) / "frames.jsonl"
                force = ["--force"] if bundle.parent.name == "failed" else []  # speed does not depend on the verdict
                seconds, _ = run([sys.executable, str(bundle / "runner.py"), str(clip), "--headless", "--jsonl",
                                  str(jsonl), "--threads", str(threads), *extra, *force])
                stamps = [json.loads(line)["timestamp"] for line in jsonl.read_text().splitlines() if line.strip()]
            got[tool]["steady"].append((len(stamps) - WARMUP) / (stamps[-1] - stamps[WARMUP - 1]))
            got[tool]["process"].append(len(stamps) / seconds)
    return {tool: {k: float(np.median(v)) for k, v in d.items()} for tool, d in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=ROOT / "build/yolo-camvid/runs/train/weights/last.pt")
    ap.add_argument("--camvid", type=Path, default=CAMVID)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "versus")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds (default 3)")
    ap.add_argument("--loops", type=int, default=3, help="times the val frames repeat in the video (default 3)")
    ap.add_argument("--threads", type=int, default=0, help="runner inference threads (default 0: OpenVINO's "
                                                           "choice, as Ultralytics leaves it)")
    ap.add_argument("--bootstrap", type=int, default=200, help="paired bootstrap draws for the INT8 rows' "
                    "intervals (default 200; 0: none)")
    ap.add_argument("--speed-only", action="store_true", help="only the speed rounds, on the models an earlier run "
                                                              "left in --out")
    args = ap.parse_args()
    if args.speed_only:
        clip = args.out / "camvid-val.mp4"
        n = video(args.camvid, clip, args.loops)
        print_speed(speed(args.out / "ultralytics" / "model_int8_openvino_model",
                          _bundle(args.out, "intel-cpu-int8"), clip, n, args.imgsz, args.rounds,
                          args.threads))
        return
    if not args.weights.is_file():
        raise SystemExit(f"no weights at {args.weights}: run scripts/train_yolo_camvid.py first, or pass --weights")
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-settings-"))
    os.environ.setdefault("YOLO_OFFLINE", "True")
    data = args.out / "data"
    layout(args.camvid, data, MIN_AREA)
    print("edgeport build ...", file=sys.stderr)
    build_s = edgeport_build(args.weights, args.camvid, data, args.out, args.imgsz)
    print("ultralytics exports ...", file=sys.stderr)
    exports = ultralytics_exports(args.weights, data, args.out, args.imgsz)
    print("scoring ...", file=sys.stderr)
    rows = score_all(args.weights, data, args.out, exports, args.imgsz, args.bootstrap)
    print(f"\nmAP on the report half of CamVid val (derived boxes); edgeport build {build_s:.0f} s for 5 targets\n")
    print("| model | mAP@[.5:.95] | mAP@.5 | INT8 - FP32, 95 % interval | export s |\n| --- | --- | --- | --- | --- |")
    for name, m in rows.items():
        secs = next((f"{s:.0f}" for n, (_, s) in exports.items() if name == f"ultralytics {n}"), "-")
        ci = f"{m['interval'][0]:+.2f} to {m['interval'][1]:+.2f}" if "interval" in m else "-"
        print(f"| {name} | {m['map']:.2f} | {m['map50']:.2f} | {ci} | {secs} |")
    if "openvino int8" in exports:
        clip = args.out / "camvid-val.mp4"
        n = video(args.camvid, clip, args.loops)
        print(f"\nspeed: {n} frames of {clip.name}, OpenVINO INT8, {args.rounds} interleaved rounds (medians)\n",
              file=sys.stderr)
        print_speed(speed(exports["openvino int8"][0], _bundle(args.out, "intel-cpu-int8"), clip, n,
                          args.imgsz, args.rounds, args.threads))


def _bundle(out: Path, name: str) -> Path:
    """A bundle of the edgeport build, passed (dist/NAME) or failed (dist/failed/NAME)."""
    dist = out / "edgeport" / "dist"
    return dist / name if (dist / name).is_dir() else dist / "failed" / name


def print_speed(fps: dict[str, dict[str, float]]) -> None:
    """The speed table and the ratio."""
    print("\n| tool | steady FPS | FPS with process start |\n| --- | --- | --- |")
    for tool, v in fps.items():
        print(f"| {tool} | {v['steady']:.1f} | {v['process']:.1f} |")
    for tool in fps:
        if tool.startswith("edgeport"):
            ratio = fps[tool]["steady"] / fps["ultralytics predict"]["steady"]
            print(f"\n{tool} / ultralytics predict, steady FPS: {ratio:.2f}x", end="")
    print()

if __name__ == "__main__":
    main()
