"""Training for RoadDetNet detectors (scripts/train_roaddet.py, scripts/train_camvid_det.py): FCOS-style target
assignment, sigmoid focal loss, GIoU loss, and COCO mAP with the runner's own NMS. Imports torch; never
imported by the CLI."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeport.zoo.det import STRIDE, RoadDetNet


def assign(boxes: np.ndarray, classes: np.ndarray, n_classes: int, hw: tuple[int, int]) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """(class targets (N, C) in {0, 1}, box targets (N, 4) x1y1x2y2 pixels, NaN for negatives) per grid cell:
    a cell whose centre lies inside a box and within 1.5 cells of its centre, and the cell holding each box's
    centre, is a positive of the smallest such box."""
    h, w = hw[0] // STRIDE, hw[1] // STRIDE
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    cx, cy = ((xs + 0.5) * STRIDE).ravel(), ((ys + 0.5) * STRIDE).ravel()
    cls_t = np.zeros((h * w, n_classes), np.float32)
    box_t = np.full((h * w, 4), np.nan, np.float32)
    best = np.full(h * w, np.inf)
    for b, c in zip(boxes, classes):
        bx, by = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        inside = (cx > b[0]) & (cx < b[2]) & (cy > b[1]) & (cy < b[3])
        near = (np.abs(cx - bx) <= 1.5 * STRIDE) & (np.abs(cy - by) <= 1.5 * STRIDE)
        pos = inside & near
        pos[min(int(by // STRIDE), h - 1) * w + min(int(bx // STRIDE), w - 1)] = True
        area = (b[2] - b[0]) * (b[3] - b[1])
        take = pos & (area < best)
        best[take] = area
        cls_t[take] = 0.0
        cls_t[take, int(c)] = 1.0
        box_t[take] = b
    return cls_t, box_t


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - GIoU of x1y1x2y2 boxes, per row."""
    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_p = (pred[:, 2:] - pred[:, :2]).clamp(min=0).prod(1)
    area_t = (target[:, 2:] - target[:, :2]).prod(1)
    union = area_p + area_t - inter
    hull = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])).clamp(min=0).prod(1)
    return 1 - inter / union.clamp(min=1e-6) + (hull - union) / hull.clamp(min=1e-6)


def focal(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss per element (Lin et al.)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    return (alpha * targets + (1 - alpha) * (1 - targets)) * ce * (1 - p_t) ** gamma


def train(model: RoadDetNet, x_all: torch.Tensor, boxes: list[np.ndarray], classes: list[np.ndarray],
          hw: tuple[int, int], steps: int, batch: int, lr: float = 3e-3,
          log: Callable[[str], None] = print) -> None:
    """Train in place: AdamW, one-cycle schedule, horizontal mirror half the time, seeded by the caller."""
    n_classes = model.cls.out_channels
    targets = [assign(b, c, n_classes, hw) for b, c in zip(boxes, classes)]
    mirrored = [assign(np.stack([hw[1] - b[:, 2], b[:, 1], hw[1] - b[:, 0], b[:, 3]], 1) if len(b) else b, c,
                       n_classes, hw) for b, c in zip(boxes, classes)]
    cls_all = torch.from_numpy(np.stack([t[0] for t in targets]))
    box_all = torch.from_numpy(np.stack([t[1] for t in targets]))
    cls_flip = torch.from_numpy(np.stack([t[0] for t in mirrored]))
    box_flip = torch.from_numpy(np.stack([t[1] for t in mirrored]))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([hw[1], hw[0]] * 2, dtype=torch.float32)
    t0 = time.time()
    for step in range(steps):
        model.train()
        idx = torch.randint(0, len(x_all), (batch,), generator=gen)
        if torch.rand(1, generator=gen).item() < 0.5:  # mirror: roads look alike both ways
            x, cls_t, box_t = x_all[idx].flip(-1), cls_flip[idx], box_flip[idx]
        else:
            x, cls_t, box_t = x_all[idx], cls_all[idx], box_all[idx]
        logits, dist = model.raw(x)
        pos = ~torch.isnan(box_t[..., 0])
        n_pos = max(int(pos.sum()), 1)
        cls_loss = focal(logits, cls_t).sum() / n_pos
        reg = giou_loss(model.decode(dist)[pos] * scale, box_t[pos]).sum() / n_pos if pos.any() else logits.sum() * 0
        loss = cls_loss + 2.0 * reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step:5d}/{steps} loss {loss.item():.4f} (focal {cls_loss.item():.4f}, giou {reg.item():.4f}) "
                f"{time.time() - t0:.0f}s")


def evaluate(model: RoadDetNet, x: torch.Tensor, boxes: list[np.ndarray], classes: list[np.ndarray],
             hw: tuple[int, int]) -> tuple[float, float]:
    """(mAP@[.5:.95], mAP@.5) in percent on preprocessed ``x`` (stretched frames of the model's size, boxes in
    its pixels), with the runner's own NMS and pycocotools."""
    from edgeport.tasks.detection.runner import postprocess
    from edgeport.tasks.detection.task import coco_map

    h, w = hw
    images, annotations, results = [], [], []
    model.eval()
    with torch.no_grad():
        out = [model(x[i:i + 50]) for i in range(0, len(x), 50)]
    pb = torch.cat([o["boxes"] for o in out]).numpy()
    ps = torch.cat([o["scores"] for o in out]).numpy()
    opts = {"score_threshold": 0.001, "iou_threshold": 0.45, "max_detections": 100, "agnostic": False}
    for i in range(len(x)):
        images.append({"id": i, "width": w, "height": h})
        for b, c in zip(boxes[i], classes[i]):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(c) + 1, "iscrowd": 0,
                                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                                "area": float((b[2] - b[0]) * (b[3] - b[1]))})
        kb, kc, ks = postprocess(pb[i], ps[i], opts)
        for b, c, s in zip(kb * [w, h, w, h], kc, ks):
            results.append({"image_id": i, "category_id": int(c) + 1, "score": float(s),
                            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    m, m50 = coco_map(images, annotations, results, model.cls.out_channels)
    return 100 * m, 100 * m50


def finish(model: RoadDetNet, x: torch.Tensor, boxes: list[np.ndarray], classes: list[np.ndarray],
           hw: tuple[int, int], what: str, out: Path) -> None:
    """Print the model's mAP on the held-out ``x`` (``what`` names them) and save its weights to ``out``."""
    m, m50 = evaluate(model, x, boxes, classes, hw)
    print(f"{what}: mAP@[.5:.95] {m:.1f}, mAP@.5 {m50:.1f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
