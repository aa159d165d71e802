"""Emulated TensorRT INT8 accuracy per activation-range method, chosen on one half and reported on the other.

The labelled validation set is split deterministically as the build splits it (edgeport.evaluate.halves,
the config's [validation] split: by default the first half of the sorted frames selects, the second half
reports). For each range method the Q/DQ model is written by
edgeport's own producer and run in ONNX Runtime on both halves; the method with the best selection-half
metric is the one to make the default, and its report-half figure is the honest one. A printed table,
not a test. Run after a build of the project (it reads the build folder's ONNX and calibration set):

    .venv/bin/edgeport build --config examples/camvid/edgeport.toml
    .venv/bin/python scripts/int8_methods.py --config examples/camvid/edgeport.toml
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeport.cache import newest_stage


def _latest(folder: Path, name: str) -> Path:
    found = newest_stage(folder, name)
    if found is None:
        raise SystemExit(f"error: no {name} under {folder}: build the project first")
    return found


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def main() -> None:
    """Print the per-method table (and write --json)."""
    from edgeport.backends.tensorrt import qdq
    from edgeport.config import load_config, resolve_path
    from edgeport.evaluate import load_labelled, primary, split_halves, task_metrics
    from edgeport.quantize.ranges import METHODS, collect_ranges

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="example: python "
                                 "scripts/int8_methods.py --config examples/camvid/edgeport.toml")
    ap.add_argument("--config", required=True, help="the project's edgeport.toml (built once before)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated range methods")
    ap.add_argument("--images", type=int, default=300, help="calibration images for the ranges (default 300)")
    ap.add_argument("--external", action="append", default=[], metavar="NAME=PATH",
                    help="also score a Q/DQ ONNX another producer wrote (e.g. NVIDIA Model Optimizer) and lint it")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    cfg = load_config(Path(args.config))
    build = resolve_path(cfg.build.build_dir, cfg.root) if cfg.build.build_dir else cfg.root / "build"
    onnx_path = _latest(build / "export", "model.onnx")
    calib = np.load(_latest(build / "calibration", "data.npy"))[:args.images]
    data = load_labelled(cfg.validation.val_images, cfg.validation.val_labels, cfg.input,
                         max_images=cfg.validation.max_images, root=cfg.root)
    halves = split_halves(data, cfg.validation.split)
    sets = {h: data.subset(idx) for h, idx in halves.items()}
    print(f"model {onnx_path}; calibration {len(calib)} images; {data.source}: selection {len(halves['selection'])}"
          f", report {len(halves['report'])} images")

    def score(outputs: np.ndarray) -> dict[str, float]:
        return {h: primary(task_metrics(outputs[idx], sets[h]))[1] or 0.0 for h, idx in halves.items()}

    fp32 = _run(onnx_path, data.inputs)
    base = score(fp32)
    rows = [{"method": "fp32", **base, "seconds": 0.0}]
    print(f"{'method':<12}{'selection':>10}{'report':>10}{'sel drop':>10}{'rep drop':>10}{'ranges s':>10}")
    print(f"{'fp32':<12}{base['selection']:>10.2f}{base['report']:>10.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            t = time.time()
            amax = collect_ranges(onnx_path, calib, method, f"{method} ranges")
            seconds = time.time() - t
            out = Path(tmp) / f"{method}.onnx"
            qdq.write_qdq(onnx_path, amax, out)
            got = score(_run(out, data.inputs))
            rows.append({"method": method, **got, "seconds": seconds})
            print(f"{method:<12}{got['selection']:>10.2f}{got['report']:>10.2f}"
                  f"{base['selection'] - got['selection']:>10.2f}{base['report'] - got['report']:>10.2f}"
                  f"{seconds:>10.1f}")
    ours = list(rows[1:])
    for item in args.external:
        name, _, path = item.partition("=")
        got = score(_run(Path(path), data.inputs))
        findings = qdq.lint(Path(path))
        rows.append({"method": name, **got, "seconds": 0.0, "lint": [str(f) for f in findings]})
        rules = sorted({f.rule for f in findings})
        print(f"{name:<12}{got['selection']:>10.2f}{got['report']:>10.2f}"
              f"{base['selection'] - got['selection']:>10.2f}{base['report'] - got['report']:>10.2f}"
              f"{'':>10}  lint: {len(findings)} finding(s) {', '.join(rules)}")
    best = max(ours, key=lambda r: r["selection"])
    print(f"chosen on the selection half: {best['method']} (report half {best['report']:.2f}, "
          f"{base['report'] - best['report']:+.2f} below FP32's {base['report']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "chosen": best["method"]}, indent=1))


if __name__ == "__main__":
    main()
