#!/usr/bin/env python3
"""Train the CamVid detector (car, pedestrian, bicyclist) on CamVid train with boxes DERIVED from its label maps.

The boxes come from scripts/camvid_boxes.py's rule (one box per 8-connected component of a class, small ones
dropped; see there for what that means). Seeded, CPU-only (about 10 minutes on 2 cores), at 176x240 with
edgeport.zoo.det.RoadDetNet and edgeport.zoo.det_train. Writes models/camvid-det.pt and prints COCO mAP on
CamVid val against its derived boxes.

Example:
    .venv/bin/python scripts/train_camvid_det.py --steps 2500
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from camvid_boxes import CAMVID, MIN_AREA, boxes_of  # noqa: E402

from edgeport.preprocess import InputSpec  # noqa: E402
from edgeport.zoo.det import CAMVID_DET_CLASSES, CAMVID_DET_HW, camvid_det  # noqa: E402
from edgeport.zoo.det_train import finish, train  # noqa: E402


def load(split: str, spec: InputSpec, min_area: int) -> tuple[torch.Tensor, list[np.ndarray], list[np.ndarray]]:
    """Preprocessed frames (stretched to the model's size) and their derived boxes in model pixels."""
    h, w = CAMVID_DET_HW
    frames, boxes, classes = [], [], []
    for path in sorted((CAMVID / split).glob("*.png")):
        img = cv2.imread(str(path))
        label = cv2.imread(str(CAMVID / f"{split}annot" / path.name), cv2.IMREAD_UNCHANGED)
        rows = np.asarray(boxes_of(label, min_area), np.float32).reshape(-1, 5)
        cx, cy, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
        frames.append(img)
        boxes.append(np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1))
        classes.append(rows[:, 0].astype(np.int64))
    return torch.from_numpy(spec.apply_batch(frames)), boxes, classes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--min-area", type=int, default=MIN_AREA)
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "camvid-det.pt")
    args = ap.parse_args()

    torch.manual_seed(0)
    np.random.seed(0)
    spec = InputSpec(name="image", shape=(1, 3, *CAMVID_DET_HW), task="detection", labels=list(CAMVID_DET_CLASSES),
                     task_options={"decoder": "boxes"})
    t0 = time.time()
    x, boxes, classes = load("train", spec, args.min_area)
    xv, vboxes, vclasses = load("val", spec, args.min_area)
    print(f"read {len(x)} + {len(xv)} frames ({sum(len(b) for b in boxes)} training boxes) in {time.time() - t0:.1f}s",
          flush=True)
    model = camvid_det()
    train(model, x, boxes, classes, CAMVID_DET_HW, args.steps, args.batch, log=lambda s: print(s, flush=True))
    finish(model, xv, vboxes, vclasses, CAMVID_DET_HW, "CamVid val (derived boxes)", args.out)


if __name__ == "__main__":
    main()
