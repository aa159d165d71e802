#!/usr/bin/env python3
"""Build benchmark: cold and warm `edgeport build` per stage, with compiles against bundles.

Each scenario builds in a fresh temporary project folder, cold (empty cache) and then warm (nothing
changed), each as its own `edgeport build --json` process, as a user runs it; prints the wall time and
every stage's time, and how many compiles ran for how many bundles. Not a timed test: figures vary
with the machine and its load (compare within one run).

Scenarios:
  default   the Quickstart build: the embedded default model, every installed target
  resnet18  torchvision resnet18 (random init, seeded), 1x3x224x224, calibration on CamVid train:
            intel-cpu, raspberry-pi-5 (FP32 and INT8) and jetson-orin-nano (FP16 and INT8)

examples:
  .venv/bin/python scripts/build_benchmark.py
  .venv/bin/python scripts/build_benchmark.py --scenario default --json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAMVID_TRAIN = ROOT.parent / "shared" / "datasets" / "camvid" / "train"
SCENARIOS = {
    "default": [],
    "resnet18": ["--model", "torchvision:resnet18", "--input", "1x3x224x224", "--task", "classification",
                 "--calib", str(CAMVID_TRAIN), "--target", "intel-cpu:fp32", "--target", "intel-cpu:int8",
                 "--target", "raspberry-pi-5:fp32", "--target", "raspberry-pi-5:int8",
                 "--target", "jetson-orin-nano:fp16", "--target", "jetson-orin-nano:int8"],
}


def build(folder: Path, args: list[str]) -> tuple[float, dict]:
    """(wall seconds, the build's JSON report) of one `edgeport build` process in ``folder``."""
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "edgeport.cli", "build", *args, "--json"], cwd=folder,
                         capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode not in (0, 3):
        sys.exit(f"error: the build failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ''}")
    return wall, json.loads(res.stdout)


def table(name: str, cold: tuple[float, dict], warm: tuple[float, dict]) -> list[str]:
    """A Markdown table: each stage's cold and warm seconds."""
    warm_by = {(s["stage"], s["serves"]): s for s in warm[1]["stages"]}
    lines = [f"### {name}: cold {cold[0]:.1f} s, warm {warm[0]:.1f} s (wall, including start-up); "
             f"{cold[1]['compiles']} compiles for {len(cold[1]['targets'])} bundles cold, "
             f"{warm[1]['compiles']} warm", "", "| stage | serves | cold s | warm s |", "| --- | --- | --- | --- |"]
    for s in cold[1]["stages"]:
        w = warm_by.get((s["stage"], s["serves"]))
        lines.append(f"| {s['stage'].strip()} | {s['serves']} | {s['seconds']:.1f} | "
                     f"{'%.2f' % w['seconds'] if w else '-'} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("examples:")[1].join(["examples:", ""]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=list(SCENARIOS), action="append", help="default: all")
    p.add_argument("--json", action="store_true", help="the figures as JSON on stdout (tables on stderr)")
    args = p.parse_args()
    results = {}
    text = sys.stderr if args.json else sys.stdout
    for name in args.scenario or list(SCENARIOS):
        with tempfile.TemporaryDirectory(prefix="edgeport-bench-") as tmp:
            print(f"{name}: cold build ...", file=sys.stderr, flush=True)
            cold = build(Path(tmp), SCENARIOS[name])
            print(f"{name}: warm build ...", file=sys.stderr, flush=True)
            warm = build(Path(tmp), SCENARIOS[name])
        results[name] = {"cold_s": cold[0], "warm_s": warm[0], "compiles": cold[1]["compiles"],
                         "bundles": len(cold[1]["targets"]), "warm_compiles": warm[1]["compiles"],
                         "stages_cold": cold[1]["stages"], "stages_warm": warm[1]["stages"]}
        print("\n".join(table(name, cold, warm)) + "\n", file=text, flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
