"""A briefly trained timm classifier for the intake tests: random weights give near-tied top-1 scores, which any
INT8 rounding flips on a tenth of the frames, so INT8 agreement says nothing about them. A few hundred steps on
CamVid frames (which class a frame shows most of: sky, building, road, tree or car, from its label map) give the
confident margins a trained model has. The tests train on the frames they measure agreement on (CamVid val),
so the outputs there are as confident as a trained model's on its own domain; no accuracy is claimed. Seeded;
about a minute on 2 cores at 128x128."""
from __future__ import annotations

from pathlib import Path

KEEP = (0, 1, 3, 5, 8)  # CamVid ids: sky, building, road, tree, car


def train(name: str, camvid: Path, out: Path, size: int = 128, steps: int = 200, seed: int = 0,
          split: str = "val") -> Path:
    """Train ``timm:{name}?num_classes=5`` as edgeport builds it (seed 0) and save its state_dict to ``out``."""
    import cv2
    import numpy as np
    import timm
    import torch

    data = timm.data.resolve_data_config({}, model=timm.create_model(name, pretrained=False, num_classes=5))
    mean, std = np.array(data["mean"]), np.array(data["std"])
    xs, ys = [], []
    for p in sorted((camvid / split).glob("*.png")):
        img = cv2.resize(cv2.imread(str(p)), (size, size), interpolation=cv2.INTER_AREA)[:, :, ::-1] / 255.0
        xs.append(((img - mean) / std).transpose(2, 0, 1))
        label = cv2.imread(str(camvid / f"{split}annot" / p.name), cv2.IMREAD_UNCHANGED)
        ys.append(int(np.argmax([(label == k).sum() for k in KEEP])))
    x = torch.from_numpy(np.stack(xs).astype(np.float32))
    y = torch.tensor(ys)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, num_classes=5)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(x), (16,), generator=gen)
            batch = x[idx]
            if torch.rand(1, generator=gen) < 0.5:
                batch = batch.flip(-1)
            loss = torch.nn.functional.cross_entropy(model(batch), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.save(model.eval().state_dict(), out)
    return out
