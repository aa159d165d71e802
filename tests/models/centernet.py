"""The embedded detector (edgeport:roaddet) with a CenterNet head's outputs, for the ``centernet`` decoder.

roaddet scores each cell of its stride-4 grid and regresses the cell centre's distances to the box's four sides.
The same numbers, rearranged as CenterNet ("Objects as Points") emits them: ``hm`` [1, C, H, W] class logits,
``wh`` [1, 2, H, W] box width and height in cells, ``reg`` [1, 2, H, W] the box centre's offset from the cell's
corner in cells. A trained head, so its peaks are not the near-ties of random weights; the runner's 3x3 peak
test then stands in for most of NMS.
"""
from __future__ import annotations

import torch
from torch import nn

from edgeport.zoo.det import MAX_LOG_SIZE, roaddet


class RoadDetCenterNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.det = roaddet()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, dist = self.det.raw(x)
        h, w = x.shape[-2] // 4, x.shape[-1] // 4
        d = torch.exp(torch.clamp(dist, max=MAX_LOG_SIZE))  # distances in cells: left, top, right, bottom
        size = torch.stack([d[..., 0] + d[..., 2], d[..., 1] + d[..., 3]], 1)
        offset = torch.stack([0.5 + (d[..., 2] - d[..., 0]) / 2, 0.5 + (d[..., 3] - d[..., 1]) / 2], 1)
        return {"hm": logits.transpose(1, 2).reshape(-1, logits.shape[2], h, w), "wh": size.reshape(-1, 2, h, w),
                "reg": offset.reshape(-1, 2, h, w)}


def roaddet_centernet() -> nn.Module:
    """roaddet's shipped weights behind CenterNet-style outputs (module docstring)."""
    return RoadDetCenterNet().eval()
