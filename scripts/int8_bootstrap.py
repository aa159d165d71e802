"""INT8 against FP32, and backend against backend, on the report half, with paired bootstrap intervals.

After a build of a segmentation project with labelled validation data, every INT8 artifact of the newest
compile per backend (OpenVINO, TFLite, TensorRT as the emulated Q/DQ model in ONNX Runtime) and the FP32
ONNX are run on the report half of the validation set, split as the build splits it. Each frame's confusion
matrix is kept; frames are resampled with replacement (the same draw for every model: paired) and mIoU is
recomputed from the summed matrices, which gives a 95 % interval for each difference. A printed table, not a
test:

    .venv/bin/edgeport build --config examples/camvid/edgeport.toml
    .venv/bin/python scripts/int8_bootstrap.py --config examples/camvid/edgeport.toml
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgeport.cache import newest_stage


def main() -> None:
    """Print the table (and write --json)."""
    from edgeport.backends import get_backend
    from edgeport.build.compile import artifacts_from_dict
    from edgeport.config import load_config, resolve_path
    from edgeport.evaluate import load_labelled, split_halves
    from edgeport.preprocess import to_layout
    from edgeport.tasks import get as get_task
    from edgeport.tasks.segmentation.runner import segment
    from edgeport.tasks.segmentation.task import confusions, scores_of

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="example: python "
                                 "scripts/int8_bootstrap.py --config examples/camvid/edgeport.toml")
    ap.add_argument("--config", required=True, help="the project's edgeport.toml (built once before)")
    ap.add_argument("--half", choices=("report", "selection", "whole"), default="report")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    cfg = load_config(Path(args.config))
    if cfg.input.task != "segmentation":
        raise SystemExit("error: this script scores segmentation projects (mIoU from confusion matrices)")
    build = resolve_path(cfg.build.build_dir, cfg.root) if cfg.build.build_dir else cfg.root / "build"
    data = load_labelled(cfg.validation.val_images, cfg.validation.val_labels, cfg.input,
                         max_images=cfg.validation.max_images, root=cfg.root)
    idx = list(range(len(data))) if args.half == "whole" else split_halves(data, cfg.validation.split)[args.half]
    sub = data.subset(idx)
    spec = cfg.input
    task = get_task(spec.task)
    n_classes = len(cfg.input.labels)
    conf: dict[str, np.ndarray] = {}
    shape = None
    for name in ("openvino-fp32", "openvino-int8", "tflite-int8", "tensorrt-int8"):
        found = newest_stage(build / "artifact" / name)
        if found is None:
            continue
        stage = found.parent
        info = json.loads((stage / "stage.json").read_text())["info"]
        art = artifacts_from_dict(info["artifacts"], stage)
        with get_backend(art.backend).open(art) as rt:
            outs = rt.run_batches(to_layout(sub.inputs, spec.layout, art.spec.layout))
        packed = task.pack(outs, [o.name for o in art.outputs], spec)
        if shape is not None and packed.shape != shape:  # an NHWC artifact's (TFLite) outputs
            packed = to_layout(packed, art.spec.layout, spec.layout)
        shape = packed.shape
        masks = [segment(packed[i:i + 1], spec.layout == "NHWC") for i in range(len(packed))]
        label = "fp32" if name.endswith("fp32") else name.split("-")[0]
        conf[label] = confusions(masks, sub, n_classes)
        print(f"{label:<10} {scores_of(conf[label].sum(0))['miou']:.2f} mIoU on {len(idx)} frames ({args.half} half; "
              f"artifact {stage.name})", flush=True)
    if "fp32" not in conf:
        raise SystemExit("error: no FP32 OpenVINO artifact in the build folder: build intel-cpu:fp32 too")
    rng = np.random.default_rng(args.seed)
    draws = rng.integers(0, len(idx), size=(args.resamples, len(idx)))
    boot = {k: np.array([scores_of(c[d].sum(0))["miou"] for d in draws]) for k, c in conf.items()}
    point = {k: scores_of(c.sum(0))["miou"] for k, c in conf.items()}
    pairs = [(k, "fp32") for k in conf if k != "fp32"]
    if "tensorrt" in conf and "openvino" in conf:
        pairs.append(("tensorrt", "openvino"))
    if "tflite" in conf and "openvino" in conf:
        pairs.append(("tflite", "openvino"))
    rows = []
    print(f"\n{'difference':<24}{'point':>8}{'95% interval':>20}")
    for a, b in pairs:
        diff = boot[a] - boot[b]
        lo, hi = np.percentile(diff, [2.5, 97.5])
        rows.append({"a": a, "b": b, "point": point[a] - point[b], "low": float(lo), "high": float(hi)})
        print(f"{a + ' - ' + b:<24}{point[a] - point[b]:>+8.2f}{f'[{lo:+.2f}, {hi:+.2f}]':>20}")
    if args.json:
        Path(args.json).write_text(json.dumps({"half": args.half, "frames": len(idx), "miou": point, "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
