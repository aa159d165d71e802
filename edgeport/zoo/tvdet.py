"""torchvision's detectors (SSD/SSDlite, RetinaNet, FCOS) as edgeport exports them: backbone and head only.

Their own ``forward`` resizes, decodes and runs NMS with data-dependent shapes and is never exported. The
wrapper runs the backbone and the head on the already preprocessed input and returns the head's raw outputs;
on its first (untraced) forward it computes the anchors for that input size with the model's own anchor
generator and carries them, with the box coder's weights and the score activation, in
``edgeport_task_options``, which the build writes into the manifest for the runner's ``anchors`` decoder.
FCOS's linear box coder (distances scaled by the anchor's size) is decoded inside the graph instead, with its
centre-ness folded into the scores as torchvision does, for the ``boxes`` decoder.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class HeadExport(nn.Module):
    """A torchvision SSD, RetinaNet or FCOS without its transform and postprocessing (module docstring)."""

    def __init__(self, det: nn.Module) -> None:
        super().__init__()
        self.det = det.eval()
        self.kind = type(det).__name__
        if self.kind not in ("SSD", "RetinaNet", "FCOS"):
            raise TypeError(f"{self.kind} is not a detector edgeport wraps (SSD, RetinaNet, FCOS)")
        self.edgeport_task_options: dict[str, Any] | None = None
        self._hw: tuple[int, int] | None = None

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.det.backbone(x)
        return list(feats.values()) if isinstance(feats, dict) else [feats]

    def _anchors(self, x: torch.Tensor, feats: list[torch.Tensor]) -> None:
        from torchvision.models.detection.image_list import ImageList

        hw = (int(x.shape[-2]), int(x.shape[-1]))
        anchors = self.det.anchor_generator(ImageList(x[:1], [hw]), feats)[0].detach()
        self.register_buffer("anchor_boxes", anchors.clone(), persistent=False)
        self._hw = hw
        if self.kind == "FCOS":
            self.edgeport_task_options = {"decoder": "boxes"}
        else:
            self.edgeport_task_options = {
                "decoder": "anchors", "anchors": anchors.tolist(),
                "box_coder_weights": [float(w) for w in self.det.box_coder.weights],
                "score_activation": "softmax" if self.kind == "SSD" else "sigmoid",
                "background": 0 if self.kind == "SSD" else None}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self._features(x)
        tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        if not tracing and self._hw != (int(x.shape[-2]), int(x.shape[-1])):
            self._anchors(x, feats)
        out = self.det.head(feats)
        if self.kind != "FCOS":
            return {"boxes": out["bbox_regression"], "scores": out["cls_logits"]}
        a = self.anchor_boxes
        size = (a[:, 2:] - a[:, :2]).repeat(1, 2)
        centre = ((a[:, :2] + a[:, 2:]) / 2).repeat(1, 2)
        rel = out["bbox_regression"] * size * torch.tensor([-1.0, -1.0, 1.0, 1.0])
        h, w = self._hw or (int(x.shape[-2]), int(x.shape[-1]))
        boxes = (centre + rel) / torch.tensor([w, h, w, h], dtype=torch.float32)
        scores = torch.sqrt(torch.sigmoid(out["cls_logits"]) * torch.sigmoid(out["bbox_ctrness"]))
        return {"boxes": boxes, "scores": scores}


def wraps(model: nn.Module) -> bool:
    """Whether ``model`` is a torchvision detector edgeport exports by its backbone and head."""
    return type(model).__name__ in ("SSD", "RetinaNet", "FCOS") and hasattr(model, "anchor_generator")
