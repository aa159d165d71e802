#!/usr/bin/env python3
"""Range benchmark: what measuring TensorRT activation ranges costs against one plain ONNX Runtime pass.

Each scenario is first built by `edgeport build` (TensorRT INT8 only, in a temporary folder) for its
exported ONNX and its preprocessed calibration set; then, in one process and interleaved round by round,
one plain ONNX Runtime pass over the calibration set (a default session, one image per run, session set
up inside the timing) and edgeport's range measurement by each method (set-up included). Prints the best
of the rounds and its ratio to the plain pass. Not a timed test: figures vary with the machine and its
load, so compare ratios from one run.

Scenarios:
  camvid    the CamVid U-Net (examples/camvid, 1x3x144x192), 300 CamVid train frames
  resnet18  torchvision resnet18 (random init, seeded), 1x3x224x224, 300 CamVid train frames

examples:
  .venv/bin/python scripts/ranges_benchmark.py
  .venv/bin/python scripts/ranges_benchmark.py --scenario resnet18 --method percentile --rounds 5
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from build_benchmark import build  # scripts/ is this script's import path

ROOT = Path(__file__).resolve().parents[1]
CAMVID_TRAIN = ROOT.parent / "shared" / "datasets" / "camvid" / "train"
TRT = ["--target", "jetson-orin-nano:int8", "--no-accuracy-control", "--calib-method", "max"]
SCENARIOS = {
    "camvid": ["--config", str(ROOT / "examples" / "camvid" / "edgeport.toml"), *TRT],
    "resnet18": ["--model", "torchvision:resnet18", "--input", "1x3x224x224", "--task", "classification",
                 "--calib", str(CAMVID_TRAIN), *TRT],
}
METHODS = ("max", "percentile", "entropy", "mse")


def prepare(folder: Path, args: list[str]) -> tuple[Path, np.ndarray]:
    """(the exported ONNX, the calibration set (N, ...) float32) of one scenario, built in ``folder``."""
    build(folder, [*args, "--build-dir", str(folder / "build"), "--out", str(folder / "dist")])
    onnx_path = next((folder / "build" / "export").glob("*/model.onnx"))
    data = np.load(next((folder / "build" / "calibration").glob("*/data.npy")))
    return onnx_path, np.ascontiguousarray(data, np.float32)


def plain_pass(onnx_path: Path, data: np.ndarray) -> float:
    """Seconds for one plain ONNX Runtime pass, session set-up included."""
    import onnxruntime as ort

    t = time.perf_counter()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for i in range(len(data)):
        session.run(None, {name: data[i:i + 1]})
    return time.perf_counter() - t


def ranges_pass(onnx_path: Path, data: np.ndarray, method: str) -> float:
    """Seconds for edgeport's ranges by ``method``, set-up included (its progress bar silenced)."""
    from edgeport.quantize.ranges import collect_ranges

    t = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        collect_ranges(onnx_path, data, method)
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("examples:")[1].join(["examples:", ""]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=list(SCENARIOS), action="append", help="default: all")
    p.add_argument("--method", choices=METHODS, action="append", help="default: all")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is kept (default 3)")
    args = p.parse_args()
    methods = args.method or list(METHODS)
    for name in args.scenario or list(SCENARIOS):
        with tempfile.TemporaryDirectory(prefix="edgeport-ranges-") as tmp:
            print(f"{name}: building for its ONNX and calibration set ...", file=sys.stderr, flush=True)
            onnx_path, data = prepare(Path(tmp), SCENARIOS[name])
            ranges_pass(onnx_path, data[:2], "max")  # imports and first-use costs out of the rounds
            best: dict[str, float] = {}
            for r in range(args.rounds):
                print(f"{name}: round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
                best["plain"] = min(best.get("plain", np.inf), plain_pass(onnx_path, data))
                for m in methods:
                    best[m] = min(best.get(m, np.inf), ranges_pass(onnx_path, data, m))
        print(f"\n### {name}: {len(data)} images of {'x'.join(map(str, data.shape[1:]))}, best of {args.rounds}\n")
        print("| pass | seconds | / plain pass |\n| --- | --- | --- |")
        for k, v in best.items():
            print(f"| {k} | {v:.2f} | {v / best['plain']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
