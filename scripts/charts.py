"""The Benchmarks pages' charts, drawn with matplotlib from the figures the benchmarks recorded.

Each chart reads one file of ``docs/benchmarks/data/`` (its figures, and when, on what and by which command they
were measured, which the chart prints under its title) and writes ``docs/benchmarks/img/<name>.svg``. The
record subcommands take those figures from what the tools write, so a new measurement is one command each:

    python scripts/charts.py                                   # every chart, from the recorded data
    python scripts/charts.py record-latency reports/validate/validate.json   # after edgeport validate --bench --report
    python scripts/charts.py record-build build.json           # after edgeport build --json > build.json (cold)
    python scripts/charts.py record-accuracy-control dist/      # INT8 bundles built with accuracy control
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "benchmarks" / "data"
IMG = ROOT / "docs" / "benchmarks" / "img"
COLOURS = {"openvino": "#0068b5", "tflite": "#ff6f00", "tensorrt": "#76b900", "tensorrt (emulated)": "#76b900",
           "pytorch": "#888888", "onnxruntime": "#5c5c5c"}


def _machine() -> str:
    import os

    return f"{platform.machine()} Linux, {os.cpu_count()} CPUs, no GPU"


def _measured(d: dict[str, Any]) -> str:
    m = d["measured"]
    return f"measured {m['date']} on {m['machine']}: {m['command']}"


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "edgeport", "font.size": 9})  # the same SVG for the same figures
    return plt.subplots(figsize=(width, height))


def _save(fig: Any, ax: Any, d: dict[str, Any], title: str, name: str) -> Path:
    ax.set_title(title, loc="left", fontsize=10)
    import textwrap

    note = textwrap.fill(_measured(d), 140)
    fig.text(0.01, 0.01, note, fontsize=7, color="#555555", va="bottom")
    fig.tight_layout(rect=(0, 0.035 * (note.count("\n") + 1) * 4 / fig.get_size_inches()[1], 1, 1))
    IMG.mkdir(parents=True, exist_ok=True)
    out = IMG / f"{name}.svg"
    fig.savefig(out, format="svg", metadata={"Date": None})
    return out


def accuracy_drop(d: dict[str, Any]) -> Path:
    """mIoU change of each INT8 artifact against FP32 on the report half, with its 95 % interval, per model."""
    rows = [(m["model"], r) for m in d["models"] for r in m["rows"]]
    fig, ax = _figure(7.5, 0.45 * len(rows) + 1.2)
    for i, (_, r) in enumerate(rows):
        y = len(rows) - 1 - i
        lo, hi = r["interval"]
        ax.barh(y, r["change"], color=COLOURS.get(r["backend"].split(",")[0], "#999"), height=0.6)
        ax.errorbar(r["change"], y, xerr=[[r["change"] - lo], [hi - r["change"]]], fmt="none", ecolor="black",
                    capsize=3, lw=1)
        ax.text(max(hi, 0) + 0.01, y, f"{r['change']:+.2f} [{lo:+.2f}, {hi:+.2f}]", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{m}: {r['backend']}" for m, r in reversed(rows)])
    ax.axvline(0, color="black", lw=0.8)
    ax.axvline(-d["max_drop"], color="#c00", lw=0.8, ls="--")
    ax.text(-d["max_drop"], len(rows) - 0.4, f" max_drop {d['max_drop']}", color="#c00", fontsize=7)
    ax.set_xlabel("INT8 minus FP32, mIoU points on the report half (95 % interval)")
    ax.set_xlim(-d["max_drop"] - 0.1, max(r["interval"][1] for _, r in rows) + 0.35)
    return _save(fig, ax, d, "INT8 against FP32 per backend (CamVid val, report half)", "accuracy-drop")


def latency(d: dict[str, Any]) -> Path:
    """Median latency (p99 as a whisker) of each bundle and the PyTorch reference, from validate --bench."""
    rows = [{"name": "pytorch (reference)", "backend": "pytorch", **d["reference_latency"]}] + d["bundles"]
    fig, ax = _figure(7.5, 0.32 * len(rows) + 1.2)
    for i, r in enumerate(rows):
        y = len(rows) - 1 - i
        ax.barh(y, r["median_ms"], color=COLOURS.get(r["backend"].split(" ")[0], "#999"), height=0.6)
        ax.errorbar(r["median_ms"], y, xerr=[[0], [r["p99_ms"] - r["median_ms"]]], fmt="none", ecolor="#333",
                    capsize=2, lw=0.8)
        ax.text(r["p99_ms"] + 0.1, y, f"{r['median_ms']:.2f} ms", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [r["name"] for r in reversed(rows)])
    ax.set_xlabel("ms per frame, one at a time: median (bar), p99 (whisker); TensorRT rows: ONNX Runtime")
    return _save(fig, ax, d, f"Latency per bundle here, {d['model']} ({d['input']})", "latency")


def metric_per_bundle(d: dict[str, Any]) -> Path:
    """Each bundle's task metric minus PyTorch's, per backend and precision, from the same validate --bench run."""
    rows = [b for b in d["bundles"] if b.get("change") is not None]
    fig, ax = _figure(7.5, 0.32 * len(rows) + 1.2)
    for i, b in enumerate(rows):
        y = len(rows) - 1 - i
        change = b["change"]
        ax.barh(y, change, color=COLOURS.get(b["backend"].split(" ")[0], "#999"), height=0.6)
        ax.text(change + (0.02 if change >= 0 else -0.02), y, f"{change:+.2f}", va="center", fontsize=7,
                ha="left" if change >= 0 else "right")
    ax.set_yticks(range(len(rows)), [f"{b['name']} ({b['backend']})" for b in reversed(rows)])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"{d['metric']} minus PyTorch's on the same frames (the half the build gated), points")
    return _save(fig, ax, d, f"Metric change per bundle, {d['model']}", "metric-per-bundle")


def build_stages(d: dict[str, Any]) -> Path:
    """Seconds of each stage of a cold build."""
    stages = [s for s in d["stages"] if s["seconds"] >= 0.05]
    fig, ax = _figure(7.5, 0.3 * len(stages) + 1.3)
    for i, s in enumerate(stages):
        y = len(stages) - 1 - i
        backend = next((b for b in ("openvino", "tflite", "tensorrt") if b in s["stage"]), "")
        ax.barh(y, s["seconds"], color=COLOURS.get(backend, "#7a7a7a"), height=0.6)
        ax.text(s["seconds"] + 0.1, y, f"{s['seconds']:.1f} s", va="center", fontsize=7)
    ax.set_yticks(range(len(stages)), [s["stage"] for s in reversed(stages)])
    ax.set_xlabel(f"seconds (wall time of the whole cold build: {d['seconds']:.1f} s; stages under 0.05 s left out)")
    return _save(fig, ax, d, f"Where a cold build's time goes: {d['what']}", "build-stages")


def runner_stages(d: dict[str, Any]) -> Path:
    """CPU-ms per frame of each runner stage, stacked, against what one and two CPUs give a frame at the FPS run."""
    fig, ax = _figure(7.5, 2.4)
    left = 0.0
    palette = ["#8da0cb", "#66c2a5", "#0068b5", "#fc8d62", "#e78ac3"]
    for (name, ms), colour in zip(d["stages"].items(), palette):
        ax.barh(0, ms, left=left, color=colour, height=0.5, label=f"{name} {ms:.2f}")
        left += ms
    for cpus in (1, d["cpus"]):
        budget = cpus * 1000.0 / d["fps"]
        ax.axvline(budget, color="#c00", ls="--", lw=0.8)
        ax.text(budget, 0.32, f" {cpus} CPU{'s' if cpus > 1 else ''} at {d['fps']:.0f} FPS", color="#c00",
                fontsize=7)
    ax.set_yticks([0], ["CPU-ms per frame"])
    ax.set_xlim(0, max(left, d["cpus"] * 1000.0 / d["fps"]) * 1.15)
    ax.set_ylim(-0.5, 0.6)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=len(d["stages"]), fontsize=7, frameon=False)
    ax.set_xlabel("")
    return _save(fig, ax, d, f"The runner's stage budget: {d['what']}", "runner-stages")


def accuracy_control(d: dict[str, Any]) -> Path:
    """The metric drop on the selection half as accuracy control keeps layers in float, per backend."""
    fig, ax = _figure(7.5, 3.2)
    for b in d["backends"]:
        xs = [len(s["kept"]) for s in b["steps"]]
        ys = [s["drop"] for s in b["steps"]]
        ax.plot(xs, ys, marker="o", color=COLOURS.get(b["backend"], "#999"), label=f"{b['bundle']} ({b['by']})")
        ax.annotate(f"{ys[-1]:.2f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(d["max_drop"], color="#c00", ls="--", lw=0.8)
    ax.text(0, d["max_drop"], f" max_drop {d['max_drop']}", color="#c00", fontsize=7, va="bottom")
    ax.set_yscale("symlog", linthresh=1.0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layers kept in float")
    ax.set_ylabel(f"{d['metric']} drop, selection half (points)")
    ax.legend(fontsize=7)
    return _save(fig, ax, d, f"Accuracy control on {d['model']}: plain INT8, then layers back in float",
                 "accuracy-control")


CHARTS = {"accuracy-drop": accuracy_drop, "latency": latency, "metric-per-bundle": metric_per_bundle,
          "build-stages": build_stages, "runner-stages": runner_stages, "accuracy-control": accuracy_control}


SOURCES = {"metric-per-bundle": "latency"}  # a chart drawn from another chart's data


def _stamp(command: str) -> dict[str, str]:
    return {"date": datetime.date.today().isoformat(), "machine": _machine(), "command": command}


def _change(bundle: dict[str, Any], primary: str) -> float | None:
    """A bundle's metric minus PyTorch's on the same frames (its metric check's figures)."""
    for case in bundle.get("cases", []):
        m = case.get("metrics") or {}
        got, ref = m.get("metrics") or {}, m.get("reference") or {}
        if case.get("check") == primary and primary in got and primary in ref:
            return got[primary] - ref[primary]
    return None


def record_latency(validate_json: Path, command: str) -> Path:
    """docs/benchmarks/data/latency.json from edgeport validate --bench's validate.json."""
    v = json.loads(validate_json.read_text())
    primary = next(k for k in ("miou", "top1", "map") if k in v["reference_metrics"])
    bundles = [{"name": b["name"], "backend": b["backend"] + (" (emulated)" if b["backend"] == "tensorrt" else ""),
                "precision": b["precision"], "size_mb": b["size_mb"], **b["latency"],
                "change": _change(b, primary)}
               for b in v["bundles"] if b.get("latency")]
    d = {"measured": _stamp(command), "model": v["model"], "input": v.get("dataset", ""),
         "reference_latency": v["reference_latency"], "bundles": bundles, "metric": primary}
    return _write("latency", d)


def record_build(build_json: Path, command: str) -> Path:
    """docs/benchmarks/data/build-stages.json from edgeport build --json (a cold build)."""
    b = json.loads(build_json.read_text())
    stages = [{"stage": s["stage"], "seconds": s["seconds"]} for s in b["stages"] if not s.get("cached")]
    d = {"measured": _stamp(command), "what": f"{b.get('model', 'the model')}, {len(b['targets'])} bundles",
         "seconds": b.get("seconds", sum(s["seconds"] for s in stages)), "stages": stages}
    return _write("build-stages", d)


def record_accuracy_control(dist: Path, command: str) -> Path:
    """docs/benchmarks/data/accuracy-control.json from the INT8 manifests of ``dist``: edgeport's loop's steps
    (TFLite, TensorRT) and NNCF's before and after (OpenVINO)."""
    backends, metric, max_drop, model = [], "miou", 1.0, ""
    for mf in sorted(dist.glob("*/manifest.json")) + sorted(dist.glob("failed/*/manifest.json")):
        m = json.loads(mf.read_text())
        model = m["model"]["name"]
        prov = m.get("provenance", {})
        fb = prov.get("accuracy_fallback")
        if fb and fb.get("steps"):
            metric, max_drop = fb["metric"], fb["max_drop"]
            backends.append({"bundle": mf.parent.name, "backend": m["backend"], "by": "edgeport's loop",
                             "steps": [{"kept": s["kept"], "drop": s["drop"]} for s in fb["steps"]]})
            continue
        ac = (m.get("quantization") or prov.get("quantization") or {}).get("accuracy_control")
        if ac and "drop_before" in ac:
            reverted = ac.get("reverted") if isinstance(ac.get("reverted"), dict) else {}
            kept = ac.get("kept_float") or reverted.get("layers") or []
            backends.append({"bundle": mf.parent.name, "backend": m["backend"], "by": "NNCF",
                             "steps": [{"kept": [], "drop": ac["drop_before"]},
                                       {"kept": list(kept), "drop": ac["drop_after"]}]})
    if not backends:
        raise SystemExit(f"no INT8 manifest with accuracy control in {dist}")
    d = {"measured": _stamp(command), "model": model, "metric": metric, "max_drop": max_drop, "backends": backends}
    return _write("accuracy-control", d)


def _write(name: str, d: dict[str, Any]) -> Path:
    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / f"{name}.json"
    path.write_text(json.dumps(d, indent=1) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="all",
                    choices=["all", *CHARTS, "record-latency", "record-build", "record-accuracy-control"])
    ap.add_argument("source", nargs="?", type=Path, help="record-*: the tool's output to take the figures from")
    ap.add_argument("--command", default="", help="record-*: the command that measured them, as shown on the chart")
    args = ap.parse_args()
    if args.what.startswith("record-"):
        if args.source is None or not args.command:
            ap.error(f"{args.what} needs SOURCE and --command")
        record = {"record-latency": record_latency, "record-build": record_build,
                  "record-accuracy-control": record_accuracy_control}[args.what]
        print(record(args.source, args.command))
        name = {"record-latency": "latency", "record-build": "build-stages",
                "record-accuracy-control": "accuracy-control"}[args.what]
        for chart, source in [(name, name)] + [(c, s) for c, s in SOURCES.items() if s == name]:
            print(CHARTS[chart](json.loads((DATA / f"{source}.json").read_text())))
        return
    for name, draw in CHARTS.items():
        if args.what in ("all", name):
            path = DATA / f"{SOURCES.get(name, name)}.json"
            if not path.exists():
                print(f"{name}: no {path.relative_to(ROOT)} yet", file=sys.stderr)
                continue
            print(draw(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
