"""The embedded detection default: a tiny anchor-free road-object detector (car, pedestrian, sign).

A small encoder (the road-segmentation network's blocks) with a two-step top-down neck to a stride-4 grid;
each cell scores the classes and regresses its distances to a box's four sides (FCOS-style). The box is
decoded inside the graph and normalised to [0, 1] of the input, and boxes and scores are separate outputs
(``boxes`` [1, N, 4] x1y1x2y2, ``scores`` [1, N, C] after a sigmoid), so each gets its own INT8 scale and
no pixel coordinate shares a scale with a score. NMS runs in the runner (edgeport/tasks/detection/runner.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgeport.zoo.net import _cbr, _ds
from edgeport.zoo.scene import DET_CLASSES

WEIGHTS = Path(__file__).with_name("roaddet.pt")
INPUT_HW = (128, 160)
STRIDE = 4
MAX_LOG_SIZE = 5.0  # distances are exp(r) * STRIDE pixels, r clipped here (148 px on a stride-4 grid)


class RoadDetNet(nn.Module):
    """1x3xHxW normalised RGB in (H, W divisible by 16); {"boxes": 1xNx4 in [0, 1], "scores": 1xNxC} out,
    N = (H/4)(W/4), cells in row-major order."""

    def __init__(self, num_classes: int = len(DET_CLASSES), width: int = 16, hw: tuple[int, int] = INPUT_HW) -> None:
        super().__init__()
        c1, c2, c3, c4 = width, width * 2, width * 4, width * 6
        self.stem = nn.Sequential(_cbr(3, c1, 2), _ds(c1, c1))  # 1/2
        self.enc2 = nn.Sequential(_ds(c1, c2, 2), _ds(c2, c2))  # 1/4
        self.enc3 = nn.Sequential(_ds(c2, c3, 2), _ds(c3, c3))  # 1/8
        self.enc4 = nn.Sequential(_ds(c3, c4, 2), _ds(c4, c4), _ds(c4, c4))  # 1/16
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.neck3 = _ds(c4 + c3, c3)
        self.neck2 = _ds(c3 + c2, c2)
        self.tower = nn.Sequential(_ds(c2, c2), _ds(c2, c2))
        self.cls = nn.Conv2d(c2, num_classes, 1)
        self.reg = nn.Conv2d(c2, 4, 1)
        nn.init.constant_(self.cls.bias, -4.0)  # a rare-positive prior, as focal-loss detectors start
        h, w = hw[0] // STRIDE, hw[1] // STRIDE
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        centres = torch.stack([(xs + 0.5) * STRIDE / hw[1], (ys + 0.5) * STRIDE / hw[0]], -1).reshape(1, -1, 2)
        self.register_buffer("centres", centres, persistent=False)
        self.register_buffer("unit", torch.tensor([STRIDE / hw[1], STRIDE / hw[0]]), persistent=False)

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits 1xNxC, log distances 1xNx4 (left, top, right, bottom)) before decoding."""
        s1 = self.stem(x)
        s2 = self.enc2(s1)
        s3 = self.enc3(s2)
        s4 = self.enc4(s3)
        p3 = self.neck3(torch.cat([self.up(s4), s3], 1))
        p2 = self.tower(self.neck2(torch.cat([self.up(p3), s2], 1)))
        logits = self.cls(p2).flatten(2).transpose(1, 2)
        dist = self.reg(p2).flatten(2).transpose(1, 2)
        return logits, dist

    def decode(self, dist: torch.Tensor) -> torch.Tensor:
        """Normalised x1y1x2y2 boxes from log distances."""
        d = torch.exp(torch.clamp(dist, max=MAX_LOG_SIZE))
        lt = self.centres - d[..., :2] * self.unit
        rb = self.centres + d[..., 2:] * self.unit
        return torch.clamp(torch.cat([lt, rb], -1), 0.0, 1.0)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, dist = self.raw(x)
        return {"boxes": self.decode(dist), "scores": torch.sigmoid(logits)}


def roaddet(pretrained: bool = True) -> RoadDetNet:
    """The detection default, with its shipped weights when ``pretrained``."""
    model = RoadDetNet()
    if pretrained:
        model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()



CAMVID_DET_CLASSES = ("car", "pedestrian", "bicyclist")
CAMVID_DET_HW = (176, 240)


def camvid_det() -> RoadDetNet:
    """The CamVid detector of scripts/train_camvid_det.py (car, pedestrian, bicyclist at 176x240).

    Its weights are not in the package: pass them with --weights (models/camvid-det.pt)."""
    return RoadDetNet(num_classes=len(CAMVID_DET_CLASSES), hw=CAMVID_DET_HW).eval()
