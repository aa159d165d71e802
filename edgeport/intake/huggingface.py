"""``hf:DIR``: a local Hugging Face ``transformers`` checkpoint folder (``config.json``, the weights, and the
image processor's ``preprocessor_config.json``) of an image classifier (ViT, ConvNeXt, ...) or a semantic
segmenter (SegFormer, ...). A folder without weights gives the architecture with random weights under the
build's seed. The model's ModelOutput becomes its ``logits``; segmentation logits at a fraction of the input
resolution (SegFormer's quarter) are resized to the input in the graph. Input size, resize, normalisation and
class names come from the folder's JSON files, read without importing transformers."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgeport.errors import ModelError
from edgeport.intake.common import local_path

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
_RESAMPLE = {0: "nearest", 2: "linear", 3: "cubic", 4: "area", 1: "linear", 5: "cubic"}  # PIL's codes


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _task(architecture: str) -> str | None:
    if architecture.endswith("ForSemanticSegmentation"):
        return "segmentation"
    if architecture.endswith("ForImageClassification"):
        return "classification"
    return None


class _HuggingFace:
    prefix = "hf"
    package = "transformers"
    extra = "hf"
    forms = "hf:DIR (a local transformers checkpoint folder: config.json, weights, preprocessor_config.json)"
    int8_preset = None

    def _read(self, rest: str, root: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
        folder = local_path(rest, root)
        if not folder.is_dir():
            raise ModelError(f"--model hf:{rest}: {folder} is not a folder; expected {self.forms}")
        out = []
        for name in ("config.json", "preprocessor_config.json"):
            path = folder / name
            if not path.is_file():
                todo = ("save the model with model.save_pretrained(DIR)" if name == "config.json" else
                        "save the image processor beside it: AutoImageProcessor.from_pretrained(...)"
                        ".save_pretrained(DIR)")
                raise ModelError(f"--model hf:{rest}: {folder} has no {name}; {todo}")
            try:
                out.append(json.loads(path.read_text()))
            except (ValueError, UnicodeDecodeError) as e:
                raise ModelError(f"{path} is not valid JSON: {e}") from None
        config, processor = out
        archs = config.get("architectures") or []
        if not archs or _task(archs[0]) is None:
            raise ModelError(f"--model hf:{rest}: architecture {archs[0] if archs else 'none'!s} in config.json; "
                             "edgeport takes *ForImageClassification and *ForSemanticSegmentation models")
        return folder, config, processor

    def check(self, rest: str, root: Path, weights: str | None) -> None:
        """ModelError for a folder that is missing, lacks its JSON files, or holds another kind of model."""
        self._read(rest, root)
        if weights:
            raise ModelError(f"--weights with hf:{rest}: the folder carries its weights "
                             f"({' or '.join(WEIGHT_FILES[:2])}); drop --weights")

    def files(self, rest: str, root: Path) -> list[Path]:
        """config.json, preprocessor_config.json and the weights."""
        folder = local_path(rest, root)
        return [folder / n for n in ("config.json", "preprocessor_config.json", *WEIGHT_FILES)]

    def name(self, rest: str) -> str:
        """The folder's name."""
        return Path(rest.rstrip("/")).name or "hf-model"

    def weights_into(self, model: Any) -> Any:
        """Never reached: check refuses --weights (the folder carries them)."""
        return model.model

    def load(self, rest: str, root: Path) -> Any:
        """The model (from its weights, or random when the folder has none) returning its logits."""
        folder, config_json, _ = self._read(rest, root)
        _offline()
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        arch = config_json["architectures"][0]
        cls = getattr(transformers, arch, None)
        if cls is None:
            raise ModelError(f"--model hf:{rest}: transformers {transformers.__version__} has no {arch}")
        try:
            if any((folder / n).is_file() for n in WEIGHT_FILES):
                model = cls.from_pretrained(str(folder), local_files_only=True)
            else:
                model = cls(transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True))
        except (OSError, ValueError) as e:
            raise ModelError(f"--model hf:{rest}: transformers cannot load {folder}: {str(e).splitlines()[0]}") \
                from None

        class Logits(torch.nn.Module):
            """The model's logits (segmentation logits resized to the input)."""

            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.model = inner

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = self.model(pixel_values=x, return_dict=True)
                logits = out.logits
                if logits.ndim == 4 and tuple(logits.shape[-2:]) != tuple(x.shape[-2:]):  # per-pixel logits
                    logits = torch.nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear",
                                                             align_corners=False)
                return logits

        return Logits(model.eval()).eval()

    def spec(self, rest: str, root: Path) -> Any:
        """The image processor's size, resize, rescale and normalisation; config.json's class names."""
        from edgeport.preprocess import InputSpec

        _, config, proc = self._read(rest, root)
        size = proc.get("crop_size") if proc.get("do_center_crop") else proc.get("size")
        size = size if isinstance(size, dict) else {"height": size, "width": size} if size else {}
        shorter = (proc.get("size") or {}).get("shortest_edge") if isinstance(proc.get("size"), dict) else None
        if "height" in size and "width" in size:
            h, w = int(size["height"]), int(size["width"])
        elif shorter:
            h = w = int(shorter)
        else:
            raise ModelError(f"--model hf:{rest}: preprocessor_config.json gives no input size; pass --input")
        crop = proc.get("crop_pct")
        resize, resize_size = "stretch", None
        if proc.get("do_center_crop") or (shorter and crop):
            resize = "shorter-crop"
            resize_size = int(round(min(h, w) / float(crop))) if crop else int(shorter or min(h, w))
        id2label = config.get("id2label") or {}
        labels = [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k))]
        task = _task(config["architectures"][0])
        scale = float(proc.get("rescale_factor", 1 / 255)) if proc.get("do_rescale", True) else 1.0
        mean = tuple(proc.get("image_mean") or (0.0, 0.0, 0.0)) if proc.get("do_normalize", True) else (0.0,) * 3
        std = tuple(proc.get("image_std") or (1.0, 1.0, 1.0)) if proc.get("do_normalize", True) else (1.0,) * 3
        return InputSpec(name="pixel_values", shape=(1, 3, h, w), resize=resize, resize_size=resize_size,
                         interpolation=_RESAMPLE.get(proc.get("resample", 2), "linear"), color="RGB",
                         scale=scale, mean=mean, std=std, task=task, labels=labels)


HUB = _HuggingFace()
