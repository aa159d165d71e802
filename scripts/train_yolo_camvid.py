#!/usr/bin/env python3
"""Train an Ultralytics YOLO11n from scratch on CamVid train with boxes DERIVED from its label maps.

The boxes follow scripts/camvid_boxes.py's rule (one box per 8-connected component of car, pedestrian and
bicyclist; small ones dropped): they measure a detector against derived ground truth, not human boxes. The
dataset is laid out as Ultralytics wants it under --out (images are symlinks into ../shared, never copies),
then Ultralytics' own trainer runs on the CPU, offline, seeded, without plots. The checkpoint it writes
(--out/runs/train/weights/best.pt) is what `edgeport build --model ultralytics:PATH` and
scripts/versus_ultralytics.py take. Its size (about 5.3 MB) is over the 5 MB edgeport ships, so it stays in
build/.

Example:
    .venv/bin/python scripts/train_yolo_camvid.py --epochs 40 --imgsz 320
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from camvid_boxes import CAMVID, CLASSES, MIN_AREA, boxes_of  # noqa: E402


def layout(camvid: Path, out: Path, min_area: int) -> Path:
    """images/{train,val} (symlinks) and labels/{train,val} (.txt) under ``out``; returns the data yaml."""
    for split in ("train", "val"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for label_path in sorted((camvid / f"{split}annot").glob("*.png")):
            image = camvid / split / label_path.name
            link = out / "images" / split / label_path.name
            if not link.exists():
                link.symlink_to(image.resolve())
            rows = boxes_of(cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED), min_area)
            (out / "labels" / split / f"{label_path.stem}.txt").write_text(
                "".join(f"{c} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}\n" for c, cx, cy, bw, bh in rows))
    data = out / "data.yaml"
    names = "".join(f"  {i}: {n}\n" for i, n in enumerate(CLASSES.values()))
    data.write_text(f"path: {out.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--camvid", type=Path, default=CAMVID)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "yolo-camvid")
    ap.add_argument("--model", default="yolo11n.yaml", help="the architecture (default yolo11n.yaml)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--min-area", type=int, default=MIN_AREA)
    args = ap.parse_args()
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-settings-"))
    os.environ.setdefault("YOLO_OFFLINE", "True")
    data = layout(args.camvid, args.out, args.min_area)
    from ultralytics import YOLO

    model = YOLO(args.model)
    model.train(data=str(data), imgsz=args.imgsz, epochs=args.epochs, batch=args.batch, device="cpu", workers=2,
                seed=0, deterministic=True, pretrained=False, amp=False, plots=False, project=str(args.out / "runs"),
                name="train", exist_ok=True, verbose=False)
    print(f"checkpoint: {args.out / 'runs' / 'train' / 'weights' / 'best.pt'}")


if __name__ == "__main__":
    main()
