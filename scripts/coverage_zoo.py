"""The torchvision architectures of the coverage matrix, as edgeport model factories.

``--model scripts/coverage_zoo.py:resnet18`` gives torchvision's resnet18 (no download) with every
convolution and linear layer re-initialised from a seeded normal of std sqrt(2 / fan_in), biases zero,
norm layers at scale 1 and shift 0, and batch-norm running statistics measured on procedural road scenes, so outputs
depend on the input (torchvision's own init leaves several of these models with near-constant outputs or
outputs around 1e-9). The seed is fixed: every process gets the same function.
"""
from __future__ import annotations

import math
from typing import Any

CLASSIFICATION = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
                  "efficientnet_b0", "efficientnet_v2_s", "shufflenet_v2_x1_0", "squeezenet1_1", "mnasnet1_0",
                  "regnet_y_400mf", "densenet121", "googlenet", "convnext_tiny", "vit_b_16", "swin_t", "maxvit_t")
SEGMENTATION = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50")
# Exported by backbone and head (edgeport.zoo.tvdet.HeadExport); decoding and NMS run in the runner.
DETECTION = ("ssdlite320_mobilenet_v3_large", "retinanet_resnet50_fpn", "fcos_resnet50_fpn")
MODELS = CLASSIFICATION + SEGMENTATION  # the coverage matrix; the detectors are built by tests and by hand
SEED = 0


def make(name: str, num_classes: int | None = None) -> Any:
    """torchvision ``name`` with seeded He-normal weights (``num_classes`` when given)."""
    import torch
    import torchvision
    from torch import nn

    kwargs: dict[str, Any] = {"weights": None}
    if name in SEGMENTATION + DETECTION:
        kwargs["weights_backbone"] = None
    if num_classes:
        kwargs["num_classes"] = num_classes
    if name == "googlenet":
        kwargs.update(aux_logits=False, init_weights=False)
    if name == "inception_v3":
        kwargs.update(aux_logits=False, init_weights=False)
    model = torchvision.models.get_model(name, **kwargs)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                    m.bias.zero_()
    _batch_norm_statistics(model)
    if name in DETECTION:
        from edgeport.zoo.tvdet import HeadExport

        return HeadExport(model)
    return model.eval()


def _batch_norm_statistics(model: Any, batches: int = 4) -> None:
    """Running statistics measured on edgeport's procedural road scenes (224x224, RGB, ImageNet mean and std,
    the preprocessing a build uses by default), with only the BatchNorm layers in training mode (dropout and
    stochastic depth stay off), as training on images would leave them. With the default mean 0 / variance 1,
    or with statistics of white noise, an untrained efficientnet_v2_s reached 4e3 on real frames and its
    float32 output was 20 % away from its float64 one."""
    import numpy as np
    import torch
    from torch import nn

    from edgeport.zoo.scene import render_scene

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches
        bn.train()
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    with torch.no_grad():
        for b in range(batches):
            frames = [(render_scene(SEED + 4 * b + i, 224, 224)[0] / 255.0 - mean) / std for i in range(4)]
            model(torch.from_numpy(np.stack(frames).transpose(0, 3, 1, 2).astype(np.float32)))
    for bn in bns:
        bn.momentum = 0.1


def __getattr__(name: str) -> Any:
    """``coverage_zoo.resnet18`` and so on: a factory per model, for ``--model scripts/coverage_zoo.py:NAME``."""
    if name in MODELS + DETECTION:
        return lambda: make(name)
    raise AttributeError(name)
