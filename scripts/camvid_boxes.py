#!/usr/bin/env python3
"""Derive detection boxes (car, pedestrian, bicyclist) from CamVid's label maps, as YOLO .txt files.

CamVid has no boxes. These are DERIVED: each 8-connected component of a class in a label map becomes one
box, and components under --min-area pixels (at 480x360) are dropped. Touching objects of one class merge
into one box and an object split by an occluder becomes two, so these boxes measure a detector against
derived ground truth, not against human box annotations. The label maps stay in ../shared; the .txt files
go to --out (default build/camvid-boxes/{train,val}, outside the repository's tracked files).

Example:
    .venv/bin/python scripts/camvid_boxes.py
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "datasets" / "camvid"
CLASSES = {8: "car", 9: "pedestrian", 10: "bicyclist"}  # CamVid id -> detection class, in this order
MIN_AREA = 150  # pixels at 480x360; smaller components (a few pixels at the detector's 176x240) are dropped


def boxes_of(label: np.ndarray, min_area: int) -> list[tuple[int, float, float, float, float]]:
    """[(class, cx, cy, w, h)] normalised, one per connected component of each class."""
    h, w = label.shape
    out = []
    for k, cid in enumerate(CLASSES):
        n, _, stats, _ = cv2.connectedComponentsWithStats((label == cid).astype(np.uint8), connectivity=8)
        for x, y, bw, bh, area in stats[1:n]:
            if area >= min_area:
                out.append((k, (x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--camvid", type=Path, default=CAMVID)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "camvid-boxes")
    ap.add_argument("--min-area", type=int, default=MIN_AREA,
                    help=f"smallest component kept, in pixels (default {MIN_AREA})")
    args = ap.parse_args()
    (args.out / "names.txt").parent.mkdir(parents=True, exist_ok=True)
    (args.out / "names.txt").write_text("\n".join(CLASSES.values()) + "\n")
    for split in ("train", "val"):
        dest = args.out / split
        dest.mkdir(parents=True, exist_ok=True)
        counts = np.zeros(len(CLASSES), int)
        files = sorted((args.camvid / f"{split}annot").glob("*.png"))
        for path in files:
            label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            rows = boxes_of(label, args.min_area)
            for r in rows:
                counts[r[0]] += 1
            (dest / f"{path.stem}.txt").write_text("".join(f"{c} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}\n"
                                                           for c, cx, cy, bw, bh in rows))
        print(f"{split}: {len(files)} label maps -> {dest}: " +
              ", ".join(f"{n} {name}" for n, name in zip(counts, CLASSES.values())))


if __name__ == "__main__":
    main()
