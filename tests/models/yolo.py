"""Ultralytics YOLO11n models for the intake tests, made in code (nothing downloaded, nothing shipped).

``make`` is the issue's factory as a user writes it: the model with its Detect head in export mode (one
[1, 4+C, N] output), handed over as ``file.py:make``. Untrained weights with Ultralytics' init give outputs that
hardly depend on the input (the activations vanish through the layers), so the convolutions are re-drawn with
a variance-keeping init under a fixed seed: a model whose outputs follow the frame, which is all these tests
need (accuracy needs trained weights: scripts/versus_ultralytics.py)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

NAMES = {0: "car", 1: "pedestrian", 2: "sign"}
GAIN = 0.9
CAMVID_TRAIN = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "camvid" / "train"


def _frames(n: int = 4, size: int = 160) -> Any:
    """The first ``n`` CamVid train frames as a batch (RGB, /255, stretched to size x size)."""
    import cv2
    import numpy as np
    import torch

    paths = sorted(CAMVID_TRAIN.glob("*.png"))[:n]
    imgs = [cv2.resize(cv2.imread(str(p)), (size, size))[:, :, ::-1] / 255.0 for p in paths]
    return torch.from_numpy(np.stack(imgs).transpose(0, 3, 1, 2).astype(np.float32))


def untrained(nc: int = 3, seed: int = 0) -> Any:
    """DetectionModel('yolo11n.yaml', nc) with random weights made frame-like: batch-norm statistics measured on
    CamVid frames (as training would set them), class logits spread around -3 so a few scores pass 0.25."""
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-settings-"))  # not the user's home
    import torch
    from ultralytics.nn.tasks import DetectionModel

    frames = _frames(8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DetectionModel("yolo11n.yaml", nc=nc, verbose=False)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the frames
        head = model.model[-1]
        model.train()
        with torch.no_grad():
            model(frames)
        for m in model.modules():  # a contracting gain: random networks at unit gain amplify float rounding
            if isinstance(m, torch.nn.BatchNorm2d):  # layer by layer, trained ones do not
                m.weight.data.fill_(GAIN)
        model.eval()
        last = [seq[-1] for seq in head.cv3]
        seen: list[Any] = []
        hooks = [conv.register_forward_hook(lambda mod, i, o: seen.append(i[0])) for conv in last]
        with torch.no_grad():
            model(frames)
        for h in hooks:
            h.remove()
        for conv, feat in zip(last, seen):
            torch.nn.init.normal_(conv.weight, 0, 1.0)
            with torch.no_grad():  # weights orthogonal to the features' mean: logits centred by the weights
                mean = feat.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)  # themselves, not by a cancelling bias
                w = conv.weight - (conv.weight * mean).sum(1, keepdim=True) * mean / (mean * mean).sum()
                conv.weight.copy_(w * 1.5 / float(torch.nn.functional.conv2d(feat, w).std()))
                conv.bias.fill_(-3.0)
    model.names = dict(NAMES) if nc == len(NAMES) else {i: f"class{i}" for i in range(nc)}
    return model.eval()


def make() -> Any:
    """The factory of the issue: the head put in export mode, nothing else done to the model."""
    model = untrained()
    model.model[-1].export = True
    return model


def save_checkpoint(path: Path, imgsz: int = 160) -> Path:
    """A checkpoint laid out as Ultralytics' trainer saves one: the model object in half precision, no EMA."""
    import torch

    model = untrained()
    model.args = {"imgsz": imgsz, "task": "detect"}
    torch.save({"model": model.half(), "ema": None, "train_args": {"imgsz": imgsz, "task": "detect"},
                "date": "2026-12-05", "version": "8.4.190"}, path)
    return path
