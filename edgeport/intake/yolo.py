"""``ultralytics:PATH.pt`` (a trained YOLOv8/YOLO11 detect checkpoint) and ``ultralytics:yolo11n.yaml?nc=3``
(an untrained model of that architecture; ``imgsz=`` sets its input size, 640 without it).

The Detect head gives its decoded boxes and its class scores as two tensors (its own forward concatenates
them) and the wrapper turns the boxes (cx, cy, w, h in input pixels) into x1, y1, x2, y2 in [0, 1] of the
input: two outputs as edgeport's ``boxes`` decoder takes them. Pixel coordinates and [0, 1] scores in one
tensor would share one INT8 scale, and the scores would round to zero. Class names, input size, letterbox
(pad 114), RGB and /255 come from the checkpoint. An Ultralytics checkpoint is a pickle of the model object:
loading it runs code from the file, so load only checkpoints you trust (Ultralytics' own loader does the same).
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgeport.errors import ModelError
from edgeport.intake.common import local_path, query

DEFAULT_IMGSZ = 640
_CONFIG_DIR: list[str] = []


def _quiet_offline() -> None:
    """Ultralytics' switches, set before its import: no settings file in the user's home (a temporary folder,
    removed at exit), no console banner, no network."""
    if not _CONFIG_DIR and "YOLO_CONFIG_DIR" not in os.environ:
        path = tempfile.mkdtemp(prefix="edgeport-ultralytics-")
        atexit.register(shutil.rmtree, path, True)
        _CONFIG_DIR.append(path)
        os.environ["YOLO_CONFIG_DIR"] = path
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_OFFLINE", "True")



def _split_head(head: Any) -> None:
    """Make the Detect head return (boxes in input pixels as cx, cy, w, h; class scores) as two tensors: its own
    forward concatenates them into one, and an INT8 tensor holding pixel coordinates and [0, 1] scores gives the
    scores one step of hundreds of pixels."""
    import types

    def forward(self: Any, x: list[Any]) -> tuple[Any, Any]:
        preds = self.forward_head(x, **self.one2many)
        return self._get_decode_boxes(preds), preds["scores"].sigmoid()

    head.forward = types.MethodType(forward, head)


def _wrapper(model: Any, hw: tuple[int, int]) -> Any:
    import torch

    class YoloDetect(torch.nn.Module):
        """An Ultralytics detection model whose head gives normalised x1y1x2y2 boxes and scores apart."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.model = inner
            self.register_buffer("size", torch.tensor([hw[1], hw[0]], dtype=torch.float32), persistent=False)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            boxes, scores = self.model(x)
            scale = self.size.view(1, 2, 1)
            centre, extent = boxes[:, 0:2, :] / scale, boxes[:, 2:4, :] / scale
            corners = torch.cat((centre - extent / 2, centre + extent / 2), 1)
            return {"boxes": corners.transpose(1, 2), "scores": scores.transpose(1, 2)}

    return YoloDetect(model)


class _Yolo:
    prefix = "ultralytics"
    package = "ultralytics"
    extra = "ultralytics"
    forms = "ultralytics:PATH.pt (a trained detect checkpoint) or ultralytics:yolo11n.yaml?nc=3[&imgsz=320]"
    int8_preset = "mixed"  # Ultralytics' OpenVINO INT8 export: asymmetric activations (SiLU dips below zero)

    def check(self, rest: str, root: Path, weights: str | None) -> None:
        """ModelError for a missing checkpoint, an unknown form, or --weights beside a checkpoint."""
        name, kwargs = query(rest)
        if name.endswith(".pt"):
            path = local_path(name, root)
            if not path.is_file():
                raise ModelError(f"Ultralytics checkpoint {path} does not exist")
            if kwargs:
                raise ModelError(f"--model ultralytics:{rest}: a checkpoint takes no settings "
                                 f"({', '.join(kwargs)}): it carries its classes and input size")
            if weights:
                raise ModelError(f"--weights with ultralytics:{name}: the checkpoint carries its weights; drop "
                                 "--weights")
        elif name.endswith((".yaml", ".yml")):
            unknown = sorted(set(kwargs) - {"nc", "imgsz"})
            if unknown:
                raise ModelError(f"--model ultralytics:{rest}: unknown setting {unknown[0]!r}; a model yaml takes "
                                 "nc= (classes) and imgsz= (input size)")
            for key in ("nc", "imgsz"):
                if key in kwargs and (not isinstance(kwargs[key], int) or kwargs[key] < 1
                                      or (key == "imgsz" and kwargs[key] % 32)):
                    raise ModelError(f"--model ultralytics:{rest}: {key}={kwargs[key]!r} must be a whole number"
                                     + (" divisible by 32" if key == "imgsz" else " of at least 1"))
        else:
            raise ModelError(f"--model ultralytics:{rest}: expected {self.forms}")

    def files(self, rest: str, root: Path) -> list[Path]:
        """The checkpoint (a yaml is named by the source and the package's version)."""
        name, _ = query(rest)
        return [local_path(name, root)] if name.endswith(".pt") else []

    def name(self, rest: str) -> str:
        """'yolo11n' for ultralytics:runs/best.pt's architecture is not known without loading: the file's stem."""
        return Path(query(rest)[0]).stem

    def _inner(self, rest: str, root: Path) -> tuple[Any, dict[str, Any]]:
        """(the Ultralytics model, {'names': [...], 'imgsz': int})."""
        _quiet_offline()
        import torch

        name, kwargs = query(rest)
        if name.endswith(".pt"):
            from ultralytics.nn.tasks import DetectionModel  # noqa: F401 (the pickle's classes)

            path = local_path(name, root)
            try:
                ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
            except Exception as e:  # a bad pickle raises many types
                raise ModelError(f"cannot load Ultralytics checkpoint {path}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}") from e
            model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
            if model is None or not isinstance(model, torch.nn.Module):
                raise ModelError(f"{path} is not an Ultralytics checkpoint (no 'model' entry holding a module)")
            args = ckpt.get("train_args") or getattr(model, "args", None) or {}
            imgsz = args.get("imgsz", DEFAULT_IMGSZ) if isinstance(args, dict) else DEFAULT_IMGSZ
            imgsz = imgsz[0] if isinstance(imgsz, (list, tuple)) else imgsz
            model = model.float()
        else:
            from ultralytics.nn.tasks import DetectionModel

            try:
                model = DetectionModel(name, nc=kwargs.get("nc"), verbose=False)
            except (FileNotFoundError, KeyError, ValueError) as e:
                raise ModelError(f"--model ultralytics:{rest}: Ultralytics cannot build {name!r}: {e}") from None
            imgsz = kwargs.get("imgsz", DEFAULT_IMGSZ)
        head = model.model[-1] if hasattr(model, "model") else None
        kind = type(head).__name__
        if kind != "Detect":
            raise ModelError(f"--model ultralytics:{rest}: a {kind} head; edgeport takes Ultralytics detect models "
                             "(YOLOv8, YOLO11 trained with task=detect)")
        names = getattr(model, "names", None) or {}
        labels = [str(names[i]) if i in names else f"class{i}" for i in range(head.nc)] \
            if isinstance(names, dict) else [str(n) for n in names]
        if all(label == str(i) for i, label in enumerate(labels)):  # an untrained model's names are its indices
            labels = [f"class{i}" for i in range(head.nc)]
        return model, {"names": labels, "imgsz": int(imgsz)}

    def load(self, rest: str, root: Path) -> Any:
        """The model, its head's boxes and scores apart (the one-to-many branch for NMS decoding), BN folded."""
        model, info = self._inner(rest, root)
        head = model.model[-1]
        if getattr(head, "one2one_cv2", None) is not None and getattr(head, "cv2", None) is not None:
            head.end2end = False  # NMS-free heads keep their one-to-many branch: decoded and NMSed as any YOLO
        elif getattr(head, "end2end", False):
            raise ModelError(f"--model ultralytics:{rest}: an end-to-end (NMS-free) head without its one-to-many "
                             "branch; export the checkpoint before fusing it")
        if not hasattr(head, "forward_head") or not hasattr(head, "_get_decode_boxes"):
            raise ModelError(f"--model ultralytics:{rest}: this Ultralytics version's Detect head has no "
                             "forward_head/_get_decode_boxes; edgeport takes ultralytics 8.4")
        model = model.eval().fuse(verbose=False)  # BN into the convs as Ultralytics' exporter does (torch.fx
        _split_head(model.model[-1])  # cannot trace the model's layer routing, so edgeport's own folding cannot)
        size = info["imgsz"]
        return _wrapper(model, (size, size)).eval()

    def weights_into(self, model: Any) -> Any:
        """The Ultralytics model inside the wrapper (--weights: a state_dict of DetectionModel(yaml))."""
        return model.model

    def spec(self, rest: str, root: Path) -> Any:
        """Letterbox to imgsz (pad 114), RGB, /255, the checkpoint's class names, the ``boxes`` decoder."""
        from edgeport.preprocess import InputSpec

        _, info = self._inner(rest, root)
        size = info["imgsz"]
        return InputSpec(name="images", shape=(1, 3, size, size), resize="letterbox", pad_value=114, color="RGB",
                         mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), task="detection", labels=info["names"],
                         task_options={"decoder": "boxes"})


HUB = _Yolo()
