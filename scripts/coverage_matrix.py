"""The coverage matrix: every common torchvision architecture to every backend, FP32 and INT8.

Each model (scripts/coverage_zoo.py: random weights re-initialised from a seeded He normal, so outputs depend
on the input) is built by ``edgeport build`` in a child process for intel-cpu (OpenVINO), raspberry-pi-5
(TFLite) and jetson-orin-nano (TensorRT) at FP32 and INT8, calibrated on CamVid val frames, with plain INT8
(no accuracy control: agreement is reported, not gated; random weights give near-tied outputs, which make
agreement a weak signal). A cell is the FP32 max error (relative to the output range) or the INT8 top-1 /
pixel agreement with the PyTorch reference, with the time; or the build's error line. TensorRT FP32 is the
ONNX the Jetson builds its engine from (the engine itself needs the device); TensorRT INT8 is the Q/DQ model
emulated in ONNX Runtime.

    python scripts/coverage_matrix.py                                  # all 20 models (hours on 2 cores)
    python scripts/coverage_matrix.py --models vit_b_16,fcn_resnet50 --precisions fp32
    python scripts/coverage_matrix.py --markdown coverage.md --json coverage.json

Progress goes to stderr, one line per model; the table to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from coverage_zoo import MODELS, SEGMENTATION  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ZOO = Path(__file__).resolve().parent / "coverage_zoo.py"
BACKENDS = {"openvino": "intel-cpu", "tflite": "raspberry-pi-5", "tensorrt": "jetson-orin-nano"}
DEFAULT_CALIB = ROOT.parent / "shared" / "datasets" / "camvid" / "val"


def build_one(model: str, backends: list[str], precisions: list[str], calib: Path, work: Path, subset: int,
              timeout: float) -> dict:
    """One ``edgeport build`` of ``model`` for the chosen backends and precisions: its JSON report, or the
    error line and the time."""
    task = "segmentation" if model in SEGMENTATION else "classification"
    cmd = [sys.executable, "-m", "edgeport", "build", "--model", f"{ZOO}:{model}", "--name", model,
           "--input", "1x3x224x224", "--task", task, "--calib", str(calib), "--build-dir", str(work / "build"),
           "--out", str(work / "dist"), "--json"]
    if "int8" in precisions:  # edgeport refuses INT8 flags that no selected target reads
        cmd += ["--int8-subset", str(subset), "--no-accuracy-control"]
    for b in backends:
        for p in precisions:
            cmd += ["--target", f"{BACKENDS[b]}:{p}"]
    start = time.monotonic()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=work)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "seconds": time.monotonic() - start}
    seconds = time.monotonic() - start
    try:
        report = json.loads(res.stdout)
    except json.JSONDecodeError:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        return {"error": lines[-1] if lines else f"exit {res.returncode}", "seconds": seconds}
    report["wall_seconds"] = seconds
    return report


def cells(model: str, report: dict, backends: list[str], precisions: list[str]) -> list[dict]:
    """One row per backend x precision: status, error, max_rel, agreement, seconds."""
    rows = []
    by_target = {(t["target"], t["precision"]): t for t in report.get("targets", [])}
    stages = {s["stage"]: s["seconds"] for s in report.get("stages", [])}
    export_rel = (report.get("export_parity") or {})
    export_rel = max((v.get("max_rel", 0.0) for v in export_rel.values()), default=None)
    for b in backends:
        for p in precisions:
            row = {"model": model, "backend": b, "precision": p}
            if "error" in report:
                row.update(status="error", message=report["error"])
                rows.append(row)
                continue
            t = by_target.get((BACKENDS[b], p))
            if t is None:
                row.update(status="error", message="no row in the build report")
                rows.append(row)
                continue
            parity = t.get("parity") or {}
            rels = [v.get("max_rel") for v in parity.values() if v.get("max_rel") is not None]
            agree = [v.get("agreement") for v in parity.values() if v.get("agreement") is not None]
            compile_s = stages.get(f"compile {b} {p}")
            row.update(status=t["status"], verdict=t.get("verdict"), message=t.get("message", ""),
                       max_rel=max(rels) if rels else (export_rel if b == "tensorrt" and p != "int8" else None),
                       agreement=min(agree) if agree else None, seconds=compile_s)
            rows.append(row)
    return rows


def cell_text(row: dict) -> str:
    """What a Markdown cell shows."""
    if row["status"] == "error" or (row["status"] == "failed" and row.get("max_rel") is None
                                    and row.get("agreement") is None):
        return "FAILED: " + (row.get("message") or "").replace("|", "/")[:160]
    parts = []
    if row["precision"] == "int8":
        parts.append(f"{100 * row['agreement']:.0f} % agree" if row.get("agreement") is not None else "built")
    else:
        parts.append(f"{row['max_rel']:.1e}" if row.get("max_rel") is not None else "built")
    if row.get("seconds") is not None:
        parts.append(f"{row['seconds']:.0f} s")
    if row.get("verdict") not in (None, "passed", "device-only") and row["precision"] != "int8":
        parts.append(str(row["verdict"]))
    return ", ".join(parts)


def markdown(rows: list[dict], backends: list[str], precisions: list[str]) -> str:
    """model x (backend, precision) as a Markdown table."""
    cols = [(b, p) for b in backends for p in precisions]
    head = "| model | " + " | ".join(f"{b} {p}" for b, p in cols) + " |"
    lines = [head, "| --- " * (len(cols) + 1) + "|"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    index = {(r["model"], r["backend"], r["precision"]): r for r in rows}
    for m in models:
        lines.append(f"| {m} | " + " | ".join(cell_text(index[(m, b, p)]) for b, p in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example: python scripts/coverage_matrix.py --models "
                                            "resnet18,vit_b_16 --precisions fp32,int8 --markdown cov.md",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: all 20)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="openvino,tflite,tensorrt")
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--calib", type=Path, default=DEFAULT_CALIB, help="calibration images (CamVid val)")
    parser.add_argument("--int8-subset", type=int, default=64, help="calibration images used for INT8")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per model")
    parser.add_argument("--work", type=Path, help="build folder kept between runs (default: a temporary one)")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--json", type=Path, help="also write every cell here")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    backends = [b for b in args.backends.split(",") if b]
    if any(b not in BACKENDS for b in backends):
        parser.error(f"--backends takes {', '.join(BACKENDS)}")
    precisions = [p for p in args.precisions.split(",") if p]
    if not args.calib.is_dir():
        parser.error(f"--calib {args.calib}: no such folder")
    work = args.work or Path(tempfile.mkdtemp(prefix="edgeport-coverage-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for i, model in enumerate(models, 1):
        print(f"[{i}/{len(models)}] {model}: building for {', '.join(backends)} at {', '.join(precisions)}",
              file=sys.stderr, flush=True)
        report = build_one(model, backends, precisions, args.calib, work, args.int8_subset, args.timeout)
        new = cells(model, report, backends, precisions)
        rows += new
        seconds = report.get("wall_seconds", report.get("seconds", 0.0))
        print(f"[{i}/{len(models)}] {model}: {seconds:.0f} s; " + "; ".join(
            f"{r['backend']} {r['precision']} {cell_text(r)}" for r in new), file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    table = markdown(rows, backends, precisions)
    stamp = (f"{time.strftime('%Y-%m-%d')}, {platform.machine()} with {os.cpu_count()} cores, "
             f"Python {platform.python_version()}")
    print(f"Coverage matrix ({stamp})\n\n{table}")
    if args.markdown:
        args.markdown.write_text(f"Coverage matrix ({stamp})\n\n{table}\n")
    return 0 if all(r["status"] != "error" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
