#!/usr/bin/env python3
"""The failure edgeport prevents: the embedded detector exported the naive way against edgeport's way, TFLite
full-integer INT8 mAP for both.

naive:  one output [1, N, 4+C]: pixel boxes (cx, cy, w, h in model pixels, 0..160) and [0, 1] scores in one tensor,
        so one INT8 scale covers both (the scores round to a step of about 0.6: most vanish below 0.25);
ours:   edgeport:roaddet as shipped: boxes normalised to [0, 1] and scores as separate outputs, then
        edgeport's accuracy-aware INT8 (the heads and the ops after them kept in float, float outputs).
Each is built for raspberry-pi-5:int8 in its own project folder and scored on the report half of 200
synthetic scenes it never saw. Prints a Markdown table.

Example:
    .venv/bin/python scripts/detection_naive.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
VAL = "synthetic://?objects=1&n=200"


class NaiveRoadDet(nn.Module):
    """edgeport:roaddet with its boxes in model pixels (cx, cy, w, h) concatenated with its scores."""

    def __init__(self) -> None:
        super().__init__()
        from edgeport.zoo.det import roaddet

        self.det = roaddet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.det(x)
        b = out["boxes"] * torch.tensor([160.0, 128.0, 160.0, 128.0])
        cxcywh = torch.cat([(b[..., :2] + b[..., 2:]) / 2, b[..., 2:] - b[..., :2]], -1)
        return torch.cat([cxcywh, out["scores"]], -1)


def naive_roaddet() -> nn.Module:
    return NaiveRoadDet().eval()


CONFIG = f"""[model]
source = "{Path(__file__).resolve()}:naive_roaddet"
name = "roaddet-naive"
[input]
name = "image"
shape = [1, 3, 128, 160]
[task]
type = "detection"
labels = ["car", "pedestrian", "sign"]
decoder = "yolo"
[calibration]
source = "synthetic://?objects=1"
"""


def build(folder: Path, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "edgeport.cli", "build", "--target", "raspberry-pi-5:int8", "--val-images", VAL, *args]
    subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=1800)
    for where in (folder / "dist" / "raspberry-pi-5-int8", folder / "dist" / "failed" / "raspberry-pi-5-int8"):
        if (where / "manifest.json").is_file():
            return json.loads((where / "manifest.json").read_text())["parity"]["accuracy"]
    raise SystemExit(f"no bundle in {folder}/dist")


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, args, config in (
            ("naive: pixel boxes + scores in one output, plain INT8", ["--no-accuracy-control"], CONFIG),
            ("edgeport: [0, 1] boxes, separate scores, plain INT8", ["--model", "edgeport:roaddet",
                                                                     "--no-accuracy-control"], None),
            ("edgeport: the same, accuracy-aware INT8 (default)", ["--model", "edgeport:roaddet"], None),
        ):
            folder = Path(tmp) / str(len(rows))
            folder.mkdir()
            if config:
                (folder / "edgeport.toml").write_text(config)
            acc = build(folder, args)
            rows.append((name, acc["reference"]["map"], acc["metrics"]["map"], acc["drop"]))
            print(f"{name}: FP32 {rows[-1][1]:.2f}, INT8 {rows[-1][2]:.2f}", file=sys.stderr, flush=True)
    print("| export | FP32 mAP | TFLite INT8 mAP | drop |")
    print("| --- | --- | --- | --- |")
    for name, ref, got, drop in rows:
        print(f"| {name} | {ref:.2f} | {got:.2f} | {drop:.2f} |")


if __name__ == "__main__":
    main()
