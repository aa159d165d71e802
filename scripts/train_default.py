"""Train the embedded default road-segmentation network on procedural scenes.

Seeded and CPU-friendly (a few minutes on 2 cores). Writes
  edgeport/zoo/roadseg.pt                the weights shipped in the package (state_dict)
  calibration/road-synth/*.jpg           the default calibration sample (320 frames)
and prints the validation mIoU on scenes the training never saw.

Example:
    python scripts/train_default.py --steps 1500
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeport.preprocess import default_spec  # noqa: E402
from edgeport.zoo.net import WEIGHTS, RoadSegNet  # noqa: E402
from edgeport.zoo.scene import SCENE_CLASSES, scene_batch  # noqa: E402

TRAIN_SEED, VAL_SEED, CALIB_SEED = 0, 500_000, 1_000_000


def miou(pred: np.ndarray, lab: np.ndarray, n: int) -> float:
    """Mean IoU over classes present in labels or predictions."""
    ious = []
    for c in range(n):
        inter = np.logical_and(pred == c, lab == c).sum()
        union = np.logical_or(pred == c, lab == c).sum()
        if union:
            ious.append(inter / union)
    return float(np.mean(ious))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--train-scenes", type=int, default=4000)
    ap.add_argument("--calib", type=int, default=320, help="calibration frames to write")
    args = ap.parse_args()

    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = default_spec()
    h, w = spec.hw
    t0 = time.time()
    imgs, labs = scene_batch(TRAIN_SEED, args.train_scenes, h, w)
    vimgs, vlabs = scene_batch(VAL_SEED, 200, h, w)
    x_all = torch.from_numpy(spec.apply_batch(list(imgs)))
    y_all = torch.from_numpy(labs.astype(np.int64))
    xv = torch.from_numpy(spec.apply_batch(list(vimgs)))
    print(f"rendered {len(imgs)} + {len(vimgs)} scenes in {time.time() - t0:.1f}s", flush=True)

    # Class weights soften the imbalance (lane markings and cars are small).
    freq = np.bincount(labs.ravel(), minlength=len(SCENE_CLASSES)).astype(np.float64)
    weight = torch.tensor((freq.sum() / (freq + 1)) ** 0.3, dtype=torch.float32)
    weight /= weight.mean()

    model = RoadSegNet()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=args.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, len(x_all), (args.batch,), generator=gen)
        x, y = x_all[idx], y_all[idx]
        if torch.rand(1, generator=gen).item() < 0.5:  # mirror: roads look alike both ways
            x, y = x.flip(-1), y.flip(-1)
        loss = F.cross_entropy(model(x), y, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}/{args.steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(xv[i:i + 50]) for i in range(0, len(xv), 50)]).argmax(1).numpy()
    print(f"val mIoU {100 * miou(pred, vlabs, len(SCENE_CLASSES)):.1f} "
          f"pixel acc {100 * (pred == vlabs).mean():.1f}")
    torch.save(model.state_dict(), WEIGHTS)
    print(f"wrote {WEIGHTS} ({WEIGHTS.stat().st_size / 1e6:.2f} MB)")

    out = ROOT / "calibration" / "road-synth"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.jpg"):
        old.unlink()
    cimgs, _ = scene_batch(CALIB_SEED, args.calib, h, w)
    for i, im in enumerate(cimgs):
        cv2.imwrite(str(out / f"scene_{i:04d}.jpg"), im, [cv2.IMWRITE_JPEG_QUALITY, 92])
    print(f"wrote {args.calib} calibration frames to {out}")


if __name__ == "__main__":
    main()
