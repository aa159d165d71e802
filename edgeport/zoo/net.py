"""The embedded default network: a small U-Net for road-scene segmentation.

Conv + BatchNorm + ReLU blocks with depthwise-separable convolutions, three stride-2
stages and bilinear upsampling: ops every backend (TensorRT, OpenVINO, TFLite) handles.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgeport.zoo.scene import SCENE_CLASSES

WEIGHTS = Path(__file__).with_name("roadseg.pt")
INPUT_HW = (120, 160)


def _cbr(cin: int, cout: int, stride: int = 1, groups: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _ds(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Depthwise-separable block."""
    return nn.Sequential(_cbr(cin, cin, stride, groups=cin), _cbr(cin, cout, k=1))


class RoadSegNet(nn.Module):
    """Tiny U-Net: 1x3xHxW normalised RGB in, 1xCxHxW class logits out (H, W divisible by 8)."""

    def __init__(self, num_classes: int = len(SCENE_CLASSES), width: int = 24) -> None:
        super().__init__()
        c1, c2, c3 = width, width * 2, width * 4
        self.stem = nn.Sequential(_cbr(3, c1, 2), _ds(c1, c1))  # 1/2
        self.enc2 = nn.Sequential(_ds(c1, c2, 2), _ds(c2, c2))  # 1/4
        self.enc3 = nn.Sequential(_ds(c2, c3, 2), _ds(c3, c3), _ds(c3, c3))  # 1/8
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec2 = _ds(c3 + c2, c2)
        self.dec1 = _ds(c2 + c1, c1)
        self.head = nn.Conv2d(c1, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.stem(x)
        s2 = self.enc2(s1)
        s3 = self.enc3(s2)
        d2 = self.dec2(torch.cat([self.up(s3), s2], 1))
        d1 = self.dec1(torch.cat([self.up(d2), s1], 1))
        return self.up(self.head(d1))


def roadseg(pretrained: bool = True) -> RoadSegNet:
    """The default model, with its shipped weights when ``pretrained``."""
    model = RoadSegNet()
    if pretrained:
        model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()


CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car", "pedestrian",
                  "bicyclist")
CAMVID_PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))


def camvid_net() -> RoadSegNet:
    """The CamVid road-segmentation network of scripts/train_camvid.py (11 classes, width 32).

    Its weights are not in the package: pass them with --weights (models/camvid-roadseg.pt).
    """
    return RoadSegNet(num_classes=len(CAMVID_CLASSES), width=32).eval()


class _OutOnly(nn.Module):
    """A torchvision segmentation model's ``out`` tensor (its forward returns a dict)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def camvid_lraspp() -> nn.Module:
    """torchvision's lraspp_mobilenet_v3_large (hard-swish, squeeze-excite) for CamVid's 11 classes, as
    scripts/train_camvid.py --arch lraspp trains it from scratch (nothing downloaded).

    Its weights are not in the package: pass them with --weights (models/camvid-lraspp.pt).
    """
    import torchvision  # the torch extra

    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=len(CAMVID_CLASSES))
    return _OutOnly(model).eval()
