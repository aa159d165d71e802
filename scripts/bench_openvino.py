#!/usr/bin/env python3
"""Benchmark the Intel path in one run, on one real input frame.

PyTorch eager FP32, ONNX Runtime FP32, OpenVINO FP32 and INT8 as edgeport bundles them
(through the bundle's own runner runtime, with the manifest's settings), and OpenVINO INT8
made by plain nncf.quantize with its defaults and compiled with OpenVINO's defaults: the
reference our INT8 must stay within 15 % of. Prints a Markdown table and the ratios.

examples:
  .venv/bin/python scripts/bench_openvino.py
  .venv/bin/python scripts/bench_openvino.py --model torchvision:resnet18 --input 1x3x224x224 \\
      --task classification --calib ../shared/datasets/camvid/train --iters 300
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
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()

    import nncf
    import openvino as ov
    import torch

    from edgeport.backends.onnxruntime.backend import BACKEND as ORT
    from edgeport.backends.openvino.runner import OpenVINODeviceRuntime
    from edgeport.bundle import read_manifest
    from edgeport.model import load_model

    nncf.set_log_level(40)
    with tempfile.TemporaryDirectory() as tmp:
        report = api.build(args.model, input=args.input, task=args.task, calib=args.calib,
                           target=["intel-cpu:fp32", "intel-cpu:int8"], out=f"{tmp}/dist",
                           build_dir=f"{tmp}/build")
        bundles = {r.precision: Path(r.bundle) for r in report.targets}
        if any(r.status not in ("built", "cached") for r in report.targets):
            print("build failed:", [r.message for r in report.targets], file=sys.stderr)
            return 1
        m32, m8 = read_manifest(bundles["fp32"]), read_manifest(bundles["int8"])
        x = np.load(bundles["int8"] / m8["golden"]["cases"][0]["input"])
        name = m8["inputs"][0]["name"]
        ours32 = OpenVINODeviceRuntime(m32, str(bundles["fp32"]))
        ours8 = OpenVINODeviceRuntime(m8, str(bundles["int8"]))

        model = load_model(args.model)
        xt = torch.from_numpy(x)
        ort = ORT.open_onnx(Path(report.onnx))

        calib = np.load(next((Path(tmp) / "build" / "calibration").glob("*/data.npy")))
        core = ov.Core()
        plain_model = nncf.quantize(ov.convert_model(report.onnx),
                                    nncf.Dataset([calib[i:i + 1] for i in range(len(calib))]))
        plain = core.compile_model(plain_model, "CPU").create_infer_request()

        def torch_eager() -> object:
            with torch.inference_mode():
                return model(xt)

        contenders = {
            "PyTorch eager FP32": torch_eager,
            "ONNX Runtime FP32": lambda: ort.infer({name: x}),
            "OpenVINO FP32 (edgeport)": lambda: ours32.infer({name: x}),
            "OpenVINO INT8 (edgeport)": lambda: ours8.infer({name: x}),
            "OpenVINO INT8 (plain nncf.quantize)": lambda: plain.infer({0: x}),
        }
        timings = measure(contenders, iters=args.iters)
        sizes = {p: sum(f.stat().st_size for f in b.glob("model.*")) / 1e6 for p, b in bundles.items()}

    print(f"model {report.model}, input {list(x.shape)}, {args.iters} timed runs each, openvino "
          f"{ov.__version__.split('-')[0]}, nncf {nncf.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(table(timings, "PyTorch eager FP32"))
    ours, ref = timings["OpenVINO INT8 (edgeport)"].median, timings["OpenVINO INT8 (plain nncf.quantize)"].median
    ratio = ours / ref
    speedup = timings["OpenVINO FP32 (edgeport)"].median / ours
    print(f"\nINT8 vs FP32 (OpenVINO, edgeport): {speedup:.2f}x; IR size FP32 {sizes['fp32']:.2f} MB, "
          f"INT8 {sizes['int8']:.2f} MB")
    print(f"edgeport INT8 / plain nncf INT8 latency: {ratio:.3f} (goal <= 1.15): {'PASS' if ratio <= 1.15 else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: {"median": t.median, "p90": t.p90, "p99": t.p99}
                                               for k, t in timings.items()} | {"ratio_vs_plain": ratio}, indent=2))
    return 0 if ratio <= 1.15 else 1


if __name__ == "__main__":
    sys.exit(main())
