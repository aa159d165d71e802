#!/usr/bin/env python3
"""TFLite calibration benchmark: time and peak memory of the TFLite job's range pass (the converter's float model
with every tensor kept, read by edgeport.quantize.ranges.measure) on a large graph.

The model (torchvision's convnext_tiny, random weights, 1x3x224x224, 723 recorded tensors by default) is exported
and converted once by onnx2tf and the TFLite converter, as the TFLite job does (minutes); then the range pass runs
in a fresh child process per round, so that each round's peak resident memory is its own. Prints the seconds, the
peak memory the pass added, and a checksum of the ranges (equal across rounds and versions when the ranges are).
Not a timed test: compare rounds of one run.

examples:
  .venv/bin/python scripts/tflite_calibrate_benchmark.py --images 60 --rounds 2
  .venv/bin/python scripts/tflite_calibrate_benchmark.py --work /tmp/cnx --images 300
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAMVID_TRAIN = ROOT.parent / "shared" / "datasets" / "camvid" / "train"

ROUND = r"""
import json, sys, threading, time
from pathlib import Path
import numpy as np
import tensorflow  # noqa: F401 (the job has it loaded before the pass)
from edgeport.backends.tflite import litert

def rss():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS"))

work, n, method = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
blob = (work / "recorded.tflite").read_bytes()
images = np.load(work / "calib.npy")[:n]
base, peak = rss(), [0]
def watch():
    while True:
        peak[0] = max(peak[0], rss())
        time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
t = time.perf_counter()
_, amax = litert.calibrate(blob, images, method)
print(json.dumps({"seconds": time.perf_counter() - t, "added_gb": (peak[0] - base) / 1e9,
                  "checksum": sum((amax or {}).values())}))
"""

PREPARE = r"""
import os, sys
from pathlib import Path
import numpy as np
import torch, torchvision
from edgeport.backends.tflite.convert import SAMPLE, write_sample
from edgeport.backends.tflite.rewrite import rewrite_for_onnx2tf
from edgeport.preprocess import InputSpec
from edgeport.calibration import load_calibration

work, calib_dir, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = torchvision.models.convnext_tiny().eval()
torch.onnx.export(model, torch.randn(1, 3, 224, 224), str(work / "exported.onnx"), opset_version=17, dynamo=False)
rewrite_for_onnx2tf(work / "exported.onnx", work / "model.onnx")
spec = InputSpec()
calib = load_calibration(calib_dir, spec, max_images=n).data.transpose(0, 2, 3, 1)
np.save(work / "calib.npy", np.ascontiguousarray(calib, np.float32))
write_sample(np.zeros((0, 128, 128, 3), np.uint8), work / SAMPLE)
os.chdir(work)
import onnx2tf
onnx2tf.convert(input_onnx_file_path=str(work / "model.onnx"), output_folder_path=str(work / "saved_model"),
                copy_onnx_input_output_names_to_tflite=True, non_verbose=True, output_signaturedefs=True)
import tensorflow as tf
conv = tf.lite.TFLiteConverter.from_saved_model(str(work / "saved_model"))
conv.optimizations = [tf.lite.Optimize.DEFAULT]
conv.representative_dataset = lambda: iter([[calib[:1].astype(np.float32)]])
conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
conv.inference_input_type = conv.inference_output_type = tf.int8
conv._experimental_calibrate_only = True
(work / "recorded.tflite").write_bytes(conv.convert())
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("examples:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60, help="calibration images per round (default 60)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--method", default="percentile", choices=["max", "percentile", "entropy", "mse"])
    parser.add_argument("--calib", type=Path, default=CAMVID_TRAIN, help="calibration folder (CamVid train)")
    parser.add_argument("--work", type=Path, help="folder kept between runs for the converted model")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="tflite-calib-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    if not (work / "recorded.tflite").exists():
        print(f"converting convnext_tiny with onnx2tf in {work} (minutes)", file=sys.stderr)
        subprocess.run([sys.executable, "-c", PREPARE, str(work), str(args.calib), str(max(args.images, 300))],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    for r in range(args.rounds):
        out = subprocess.run([sys.executable, "-c", ROUND, str(work), str(args.images), args.method], check=True,
                             env=env, capture_output=True, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        print(f"round {r + 1}: {args.method} over {args.images} images {res['seconds']:.1f} s, peak memory added "
              f"{res['added_gb']:.2f} GB, ranges checksum {res['checksum']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
