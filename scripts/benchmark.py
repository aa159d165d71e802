#!/usr/bin/env python3
"""Benchmark every installed CPU backend in one run, on one real input frame.

PyTorch eager FP32, ONNX Runtime FP32; OpenVINO FP32 and INT8 as edgeport bundles them
(through the bundle's own runner runtime, with the manifest's settings) and OpenVINO INT8 made
by plain nncf.quantize with its defaults and compiled with OpenVINO's defaults: the reference
our INT8 must stay within 15 % of; TFLite FP32 and full-integer INT8 through the bundle's
runner runtime (XNNPACK, as many threads as the others). Prints a Markdown table and ratios.

examples:
  .venv/bin/python scripts/benchmark.py
  .venv/bin/python scripts/benchmark.py --model torchvision:resnet18 --input 1x3x224x224 \\
      --task classification --calib ../shared/datasets/camvid/train --iters 300
  .venv/bin/python scripts/benchmark.py --backends openvino
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeport import api  # noqa: E402
from edgeport.bench import measure, table  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("examples:")[1].join(["examples:", ""]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="edgeport:roadseg")
    p.add_argument("--input", help="e.g. 1x3x224x224 (torchvision models)")
    p.add_argument("--task", choices=["classification", "segmentation"])
    p.add_argument("--calib", help="calibration images (default: the default model's sample set)")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--json", action="store_true", help="the figures as JSON on stdout (the table goes to stderr)")
    p.add_argument("--backends", nargs="+", default=["openvino", "tflite"], choices=["openvino", "tflite"])
    args = p.parse_args()

    import torch

    from edgeport.backends import availability
    from edgeport.backends.onnxruntime.backend import BACKEND as ORT
    from edgeport.bundle import read_manifest
    from edgeport.model import load_model

    chosen = [b for b in args.backends if availability(b).installed]
    targets = {"openvino": ["intel-cpu:fp32", "intel-cpu:int8"], "tflite": ["arm64-linux:fp32", "arm64-linux:int8"]}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        report = api.build(args.model, input=args.input, task=args.task, calib=args.calib,
                           target=[t for b in chosen for t in targets[b]], out=f"{tmp}/dist",
                           build_dir=f"{tmp}/build")
        if any(r.status not in ("built", "cached") for r in report.targets):
            print("build failed:", [r.message for r in report.targets], file=sys.stderr)
            return 1
        bundles = {(r.backend, r.precision): Path(r.bundle) for r in report.targets}
        manifests = {k: read_manifest(b) for k, b in bundles.items()}
        first = next(iter(bundles))
        nchw = np.load(bundles[first] / manifests[first]["golden"]["cases"][0]["input"])
        if manifests[first]["preprocess"]["layout"] == "NHWC":
            nchw = nchw.transpose(0, 3, 1, 2)
        nhwc = np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))
        name = manifests[first]["inputs"][0]["name"]
        model = load_model(args.model)
        xt = torch.from_numpy(nchw)
        ort = ORT.open_onnx(Path(report.onnx))

        def torch_eager() -> object:
            with torch.inference_mode():
                return model(xt)

        contenders = {"PyTorch eager FP32": torch_eager, "ONNX Runtime FP32": lambda: ort.infer({name: nchw})}
        versions = [f"torch {torch.__version__}"]
        if "openvino" in chosen:
            import nncf
            import openvino as ov

            from edgeport.backends.openvino.runner import OpenVINODeviceRuntime

            nncf.set_log_level(40)
            ov32 = OpenVINODeviceRuntime(manifests["openvino", "fp32"], str(bundles["openvino", "fp32"]))
            ov8 = OpenVINODeviceRuntime(manifests["openvino", "int8"], str(bundles["openvino", "int8"]))
            calib = np.load(next((Path(tmp) / "build" / "calibration").glob("*/data.npy")))
            plain_model = nncf.quantize(ov.convert_model(report.onnx),
                                        nncf.Dataset([calib[i:i + 1] for i in range(len(calib))]))
            plain = ov.Core().compile_model(plain_model, "CPU").create_infer_request()
            contenders["OpenVINO FP32 (edgeport)"] = lambda: ov32.infer({name: nchw})
            contenders["OpenVINO INT8 (edgeport)"] = lambda: ov8.infer({name: nchw})
            contenders["OpenVINO INT8 (plain nncf.quantize)"] = lambda: plain.infer({0: nchw})
            versions.append(f"openvino {ov.__version__.split('-')[0]}, nncf {nncf.__version__}")
        if "tflite" in chosen:
            from edgeport.backends.tflite.runner import TFLiteDeviceRuntime

            tfl32 = TFLiteDeviceRuntime(manifests["tflite", "fp32"], str(bundles["tflite", "fp32"]), threads=threads)
            tfl8 = TFLiteDeviceRuntime(manifests["tflite", "int8"], str(bundles["tflite", "int8"]), threads=threads)
            contenders["TFLite FP32 (edgeport)"] = lambda: tfl32.infer({name: nhwc})
            contenders["TFLite INT8 full-integer (edgeport)"] = lambda: tfl8.infer({name: nhwc})
            versions.append(tfl32.name)
        timings = measure(contenders, iters=args.iters)
        sizes = {f"{b} {p}": sum(f.stat().st_size for f in d.iterdir() if f.name.startswith("model")) / 1e6
                 for (b, p), d in bundles.items()}

    text = sys.stderr if args.json else sys.stdout
    print(f"model {report.model}, input {list(nchw.shape)}, {args.iters} timed runs each, {threads} threads; "
          + "; ".join(versions), file=text)
    print(table(timings, "PyTorch eager FP32"), file=text)
    print("\nmodel sizes: " + ", ".join(f"{k} {v:.2f} MB" for k, v in sizes.items()), file=text)
    ok = True
    result: dict[str, object] = {k: {"median": t.median, "p90": t.p90, "p99": t.p99} for k, t in timings.items()}
    if "openvino" in chosen:
        ours, ref = timings["OpenVINO INT8 (edgeport)"].median, timings["OpenVINO INT8 (plain nncf.quantize)"].median
        ratio = ours / ref
        ok = ratio <= 1.15
        result["ratio_vs_plain"] = ratio
        print(f"OpenVINO INT8 vs FP32: {timings['OpenVINO FP32 (edgeport)'].median / ours:.2f}x; edgeport INT8 / "
              f"plain nncf INT8 latency: {ratio:.3f} (goal <= 1.15): {'PASS' if ok else 'FAIL'}", file=text)
    if "tflite" in chosen:
        gain = timings["TFLite FP32 (edgeport)"].median / timings["TFLite INT8 full-integer (edgeport)"].median
        print(f"TFLite INT8 vs FP32: {gain:.2f}x", file=text)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
