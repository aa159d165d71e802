#!/usr/bin/env python3
"""Train the embedded detection default (edgeport:roaddet) on procedural road scenes with boxes.

Seeded and CPU-only (about 10 minutes on 2 cores at the defaults). Scenes come from
edgeport.zoo.scene.render_scene_boxes (cars, pedestrians, signs; boxes of what stays visible); the network
is edgeport.zoo.det.RoadDetNet, trained FCOS-style (edgeport.zoo.det_train: focal loss on the classes,
GIoU loss on the decoded boxes). Writes
  edgeport/zoo/roaddet.pt      the weights shipped in the package (state_dict)
and prints COCO mAP (pycocotools) on scenes the training never saw.

Example:
    .venv/bin/python scripts/train_roaddet.py --steps 3000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeport.zoo import embedded_spec  # noqa: E402
from edgeport.zoo.det import INPUT_HW, WEIGHTS, RoadDetNet  # noqa: E402
from edgeport.zoo.det_train import finish, train  # noqa: E402
from edgeport.zoo.scene import render_scene_boxes  # noqa: E402

TRAIN_SEED, VAL_SEED = 3_000_000, 3_500_000


def render(first: int, n: int) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    h, w = INPUT_HW
    imgs, boxes, classes = np.zeros((n, h, w, 3), np.uint8), [], []
    for i in range(n):
        imgs[i], _, b, c = render_scene_boxes(first + i, h, w)
        boxes.append(b)
        classes.append(c)
    return imgs, boxes, classes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train-scenes", type=int, default=6000)
    ap.add_argument("--val-scenes", type=int, default=300)
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    args = ap.parse_args()

    torch.manual_seed(0)
    np.random.seed(0)
    spec = embedded_spec("roaddet")
    t0 = time.time()
    imgs, boxes, classes = render(TRAIN_SEED, args.train_scenes)
    vimgs, vboxes, vclasses = render(VAL_SEED, args.val_scenes)
    x_all = torch.from_numpy(spec.apply_batch(list(imgs)))
    xv = torch.from_numpy(spec.apply_batch(list(vimgs)))
    print(f"rendered {len(imgs)} + {len(vimgs)} scenes ({sum(len(b) for b in boxes)} training boxes) in "
          f"{time.time() - t0:.1f}s", flush=True)
    model = RoadDetNet()
    train(model, x_all, boxes, classes, INPUT_HW, args.steps, args.batch, log=lambda s: print(s, flush=True))
    finish(model, xv, vboxes, vclasses, INPUT_HW, f"val ({len(vimgs)} unseen scenes)", args.out)


if __name__ == "__main__":
    main()
