"""A model as users bring one: a file with a factory function (``--model examples/own-model/net.py:make``).

It stands in for your network: it builds edgeport's road-segmentation network (7 classes of road scenes,
1x3x120x160), so that the weights ``make_files.py`` writes beside it are trained ones. Yours is any
``torch.nn.Module`` your function returns.
"""
from __future__ import annotations

from torch import nn

from edgeport.zoo.net import RoadSegNet


def make() -> nn.Module:
    """The factory edgeport calls; --weights loads the state_dict into what it returns."""
    return RoadSegNet()
