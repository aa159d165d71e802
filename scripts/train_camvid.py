#!/usr/bin/env python3
"""Train a road-segmentation network on CamVid (../shared/datasets/camvid/train) on the CPU.

The network is edgeport.zoo.net:camvid_net (the default's U-Net, 11 classes, width 32) at
144x192 input, or with --arch lraspp edgeport.zoo.net:camvid_lraspp (torchvision's
lraspp_mobilenet_v3_large: hard-swish and squeeze-excite, the MobileNetV3 family's INT8 test on real
data; recipe examples/camvid-lraspp/edgeport.toml). Seeded; flips and colour jitter; cross-entropy
ignoring the void class (11); Adam with a cosine schedule. Writes models/camvid-roadseg.pt (or
models/camvid-lraspp.pt; a state_dict) and prints the
val mIoU at label resolution, computed by edgeport.evaluate (what `edgeport build --val-images`
reports). The build recipe is examples/camvid/edgeport.toml.

examples:
  .venv/bin/python scripts/train_camvid.py                 # about 15 minutes on 2 cores
  .venv/bin/python scripts/train_camvid.py --steps 300     # a quick smoke run
  .venv/bin/python scripts/train_camvid.py --arch lraspp   # writes models/camvid-lraspp.pt
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeport.config import load_config  # noqa: E402
from edgeport.evaluate import load_labelled, task_metrics  # noqa: E402
from edgeport.zoo.net import camvid_lraspp, camvid_net  # noqa: E402

CAMVID = ROOT.parent / "shared" / "datasets" / "camvid"
ARCHS = {"unet": (camvid_net, ROOT / "examples" / "camvid" / "edgeport.toml", "camvid-roadseg.pt"),
         "lraspp": (camvid_lraspp, ROOT / "examples" / "camvid-lraspp" / "edgeport.toml", "camvid-lraspp.pt")}
VOID = 11


def load_split(split: str, hw: tuple[int, int], spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """Images preprocessed by the recipe's spec, and label maps resized (nearest) to the input size."""
    from edgeport.runner.preprocess import preprocess

    xs, ys = [], []
    for img_path in sorted((CAMVID / split).glob("*.png")):
        img = cv2.imread(str(img_path))
        lab = cv2.imread(str(CAMVID / f"{split}annot" / img_path.name), cv2.IMREAD_UNCHANGED)
        xs.append(preprocess(img, spec)[0][0])
        ys.append(cv2.resize(lab, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST))
    return np.stack(xs).astype(np.float32), np.stack(ys).astype(np.int64)


def deflate(path: Path) -> None:
    """Rewrite torch.save's zip (stored, uncompressed) with every entry deflated; torch.load reads it as it is.
    lraspp's bfloat16 weights: 6.57 MB -> 4.45 MB, under the repository's 5 MB limit on tracked files (float16
    deflated to 5.00 MB)."""
    import zipfile

    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for entry in src.infolist():
            dst.writestr(entry.filename, src.read(entry.filename))
    tmp.replace(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="examples:" + __doc__.split("examples:")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="unet")
    ap.add_argument("--out", help="default: models/camvid-roadseg.pt (unet), models/camvid-lraspp.pt (lraspp)")
    args = ap.parse_args()
    factory, recipe, default_out = ARCHS[args.arch]
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = load_config(recipe)
    spec = cfg.input
    hw = spec.hw
    x, y = load_split("train", hw, spec.to_dict())
    print(f"train: {len(x)} images at {hw[0]}x{hw[1]}", flush=True)
    # Inverse-sqrt-frequency class weights: poles, signs and cyclists are a few % of pixels.
    freq = np.bincount(y[y != VOID].ravel(), minlength=VOID).astype(np.float64)
    weights = torch.tensor((freq.sum() / np.maximum(freq, 1)) ** 0.5, dtype=torch.float32)
    weights = weights / weights.mean()
    model = factory().train()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-5)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        idx = rng.integers(0, len(x), args.batch)
        xb, yb = xt[idx].clone(), yt[idx].clone()
        flip = torch.from_numpy(rng.random(args.batch) < 0.5)
        xb[flip], yb[flip] = xb[flip].flip(-1), yb[flip].flip(-1)
        xb = xb * torch.from_numpy(rng.uniform(0.8, 1.2, (args.batch, 1, 1, 1)).astype(np.float32)) + \
            torch.from_numpy(rng.uniform(-0.2, 0.2, (args.batch, 3, 1, 1)).astype(np.float32))
        for g in opt.param_groups:
            g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        loss = F.cross_entropy(model(xb), yb, weight=weights, ignore_index=VOID)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps:
            print(f"step {step}/{args.steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    out = Path(args.out or ROOT / "models" / default_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if args.arch == "lraspp":  # bfloat16 on disk: the rounded weights are the model, scored below
        state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state)
    torch.save(state, out)
    if args.arch == "lraspp":
        deflate(out)

    val = load_labelled(str(CAMVID / "val"), str(CAMVID / "valannot"), spec)
    with torch.inference_mode():
        logits = torch.cat([model(torch.from_numpy(val.inputs[i:i + 16])) for i in range(0, len(val), 16)]).numpy()
    m = task_metrics(logits, val)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB); CamVid val: mIoU {m['miou']:.2f}, "
          f"pixel accuracy {m['pixel_acc']:.2f} ({len(val)} images, {time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
