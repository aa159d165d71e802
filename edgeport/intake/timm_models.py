"""``timm:NAME[?k=v]``: a timm image classifier (``timm.create_model(NAME, pretrained=False, **kw)``), random
init under the build's seed or the weights of ``--weights``; its pretrained config gives the input size,
interpolation, crop and normalisation."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgeport.errors import ModelError
from edgeport.intake.common import query

_INTERPOLATION = {"bilinear": "linear", "bicubic": "cubic", "nearest": "nearest", "area": "area"}


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm's pretrained weights come from the Hub: never here


class _Timm:
    prefix = "timm"
    package = "timm"
    extra = "timm"
    forms = "timm:NAME[?k=v] (e.g. timm:resnet18, timm:convnext_atto?num_classes=10)"
    int8_preset = None

    def check(self, rest: str, root: Path, weights: str | None) -> None:
        """ModelError for an empty name or a request for downloaded weights."""
        name, kwargs = query(rest)
        if not name:
            raise ModelError(f"--model timm:{rest}: expected {self.forms}")
        if kwargs.get("pretrained") not in (None, False):
            raise ModelError(f"timm:{rest}: edgeport never downloads weights; drop 'pretrained=' and pass a local "
                             "file with --weights")

    def files(self, rest: str, root: Path) -> list[Path]:
        """None: the name, its settings and timm's version make the model."""
        return []

    def name(self, rest: str) -> str:
        """The timm model name."""
        return query(rest)[0]

    def _create(self, rest: str) -> Any:
        _offline()
        import timm

        name, kwargs = query(rest)
        kwargs.pop("pretrained", None)
        if name not in timm.list_models():
            from edgeport.errors import close_match

            raise ModelError(f"timm has no model '{name}'{close_match(name, timm.list_models())}")
        try:
            return timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as e:
            raise ModelError(f"timm:{rest}: {e}") from None

    def load(self, rest: str, root: Path) -> Any:
        """The classifier in eval mode (its logits are the output)."""
        return self._create(rest).eval()

    def weights_into(self, model: Any) -> Any:
        """The model itself: --weights is a state_dict of the timm model."""
        return model

    def spec(self, rest: str, root: Path) -> Any:
        """The model's data config: input size, interpolation, crop (shorter side to size / crop_pct), mean, std."""
        import timm.data

        from edgeport.preprocess import InputSpec

        model = self._create(rest)
        cfg = timm.data.resolve_data_config({}, model=model)
        c, h, w = cfg["input_size"]
        crop = float(cfg.get("crop_pct") or 1.0)
        shorter = int(round(min(h, w) / crop))
        resize = "shorter-crop" if crop < 1.0 and cfg.get("crop_mode", "center") == "center" else "stretch"
        return InputSpec(name="input", shape=(1, c, h, w), resize=resize,
                         resize_size=shorter if resize == "shorter-crop" else None,
                         interpolation=_INTERPOLATION.get(cfg.get("interpolation", "bilinear"), "linear"),
                         color="RGB", mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), task="classification")


HUB = _Timm()
