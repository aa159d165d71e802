"""MobileNetV3-style models (hard-swish, squeeze-excite) with weights that make their outputs depend on the input.

torchvision's mobilenet_v3_small/large and lraspp_mobilenet_v3_large, built without downloads and
re-initialised from a seeded normal of std sqrt(2 / fan_in) (every conv and linear weight; biases
zero; BatchNorm at identity): their default random init gives near-constant outputs, which no INT8
check can judge. Hard-swish, squeeze-excite gating and the wide activation ranges they make are
what break plain INT8 on these models.
"""
from __future__ import annotations

import math

import torch
from torch import nn

SEED = 0


def _reinit(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
    return model.eval()


def mobilenet_v3_small() -> nn.Module:
    """torchvision mobilenet_v3_small (1000 classes), re-initialised."""
    from torchvision.models import mobilenet_v3_small as make

    return _reinit(make(weights=None))


def mobilenet_v3_large() -> nn.Module:
    """torchvision mobilenet_v3_large (1000 classes), re-initialised."""
    from torchvision.models import mobilenet_v3_large as make

    return _reinit(make(weights=None))


class _Segmenter(nn.Module):
    """LR-ASPP's dict output as one tensor (the 'out' logits)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


def lraspp_mobilenet_v3_large() -> nn.Module:
    """torchvision lraspp_mobilenet_v3_large (21 classes, no backbone download), re-initialised."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large as make

    return _reinit(_Segmenter(make(weights=None, weights_backbone=None)))
