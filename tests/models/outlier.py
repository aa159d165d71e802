"""A model built to break INT8: the default road-segmentation network with one outlier activation channel.

One channel of the stem's depthwise block is scaled up by ``SCALE`` (its BatchNorm's weight and bias;
ReLU is positively homogeneous) and the 1x1 convolution reading it scales that channel's weights down by
the same factor: the float function is unchanged, but the tensor between them spans ``SCALE`` times the
range of its other channels, so a per-tensor INT8 scale rounds those channels to nothing (the outlier
channels of real models, in one place). Keeping that 1x1 convolution in float restores the accuracy.
"""
from __future__ import annotations

import torch

from edgeport.zoo.net import roadseg

SCALE = 1000.0
CONSUMER = "/stem.1.1.0/Conv"  # the 1x1 convolution that reads the outlier tensor (its ONNX node name)
PRODUCER = "/stem.1.0.0/Conv"  # the depthwise convolution that writes it (TFLite quantizes its output too)


def outlier_roadseg() -> torch.nn.Module:
    """The default model, the same function in float, one outlier channel (module docstring)."""
    model = roadseg()
    bn = model.stem[1][0][1]
    conv = model.stem[1][1][0]
    with torch.no_grad():
        bn.weight[0] *= SCALE
        bn.bias[0] *= SCALE
        conv.weight[:, 0] /= SCALE
    return model.eval()
