"""The torchvision architectures of the coverage matrix, as edgeport model factories.

``--model scripts/coverage_zoo.py:resnet18`` gives torchvision's resnet18 (no download) with every
convolution and linear layer re-initialised from a seeded normal of std sqrt(2 / fan_in), biases zero,
norm layers at scale 1 and shift 0, and batch-norm running statistics measured on seeded noise, so outputs
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
MODELS = CLASSIFICATION + SEGMENTATION
SEED = 0


def make(name: str, num_classes: int | None = None) -> Any:
    """torchvision ``name`` with seeded He-normal weights (``num_classes`` when given)."""
    import torch
    import torchvision
    from torch import nn

    kwargs: dict[str, Any] = {"weights": None}
    if name in SEGMENTATION:
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
    _batch_norm_statistics(model, gen)
    return model.eval()


def _batch_norm_statistics(model: Any, gen: Any, batches: int = 4) -> None:
    """Running statistics measured on seeded noise images, with only the BatchNorm layers in training mode
    (dropout and stochastic depth stay off), as training would leave them: with the default mean 0 / variance
    1 an untrained efficientnet_v2_s reaches 1e6 and its float32 output is 35 % away from its float64 one."""
    import torch
    from torch import nn

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches
        bn.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn((4, 3, 224, 224), generator=gen))
    for bn in bns:
        bn.momentum = 0.1


def __getattr__(name: str) -> Any:
    """``coverage_zoo.resnet18`` and so on: a factory per model, for ``--model scripts/coverage_zoo.py:NAME``."""
    if name in MODELS:
        return lambda: make(name)
    raise AttributeError(name)
