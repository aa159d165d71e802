"""Writes the files the README's "your own model" commands use, beside this script: ``net.pth`` (a state_dict of
``net.py``'s model), ``net.pt`` (TorchScript) and ``net.pt2`` (``torch.export``), from the trained weights edgeport
ships for that network. Nothing is downloaded; a few seconds.

    .venv/bin/python examples/own-model/make_files.py
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from edgeport.zoo.net import roadseg

HERE = Path(__file__).resolve().parent


def main() -> None:
    model = roadseg(pretrained=True).eval()
    torch.save(model.state_dict(), HERE / "net.pth")
    example = torch.rand(1, 3, 120, 160)
    with warnings.catch_warnings():  # TorchScript is deprecated, and still a form users bring
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(model, example).save(str(HERE / "net.pt"))
    torch.export.save(torch.export.export(model, (example,)), str(HERE / "net.pt2"))
    print(f"wrote net.pth, net.pt and net.pt2 in {HERE}")


if __name__ == "__main__":
    main()
