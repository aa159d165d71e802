"""Model intake: every form of --model, plus --weights, into an nn.Module in eval mode.

Forms:
    edgeport:roadseg                      the embedded default (road segmentation)
    edgeport:roaddet                      the embedded detector (cars, pedestrians, signs)
    torchvision:resnet18?num_classes=10   torchvision builder with keyword arguments
    path/to/file.py:factory               a callable in a Python file returning an nn.Module
    package.module:factory                the same, importable by name
    model.pt                              TorchScript
    model.pt2                             torch.export program
    ultralytics:best.pt                   an Ultralytics YOLOv8/YOLO11 detect checkpoint (edgeport.intake)
    hf:path/to/folder                     a local Hugging Face transformers checkpoint folder
    timm:resnet18?num_classes=10          a timm model
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Any

from edgeport.config import resolve_path
from edgeport.errors import ModelError
from edgeport.intake import find as find_hub
from edgeport.intake import fingerprint as hub_fingerprint
from edgeport.intake import local_path
from edgeport.intake import query as split_query
from edgeport.intake import require as require_hub
from edgeport.zoo import EMBEDDED, embedded_files, embedded_name

_MODULE_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w.]*$")


def file_sha256(path: Path, chunk: int = 1 << 20, limit: int | None = None) -> str:
    """sha256 hex digest of a file, or of its first ``limit`` bytes."""
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as f:
        while block := f.read(chunk if left is None else min(chunk, left)):
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest()


def source_fingerprint(source: str, root: Path | None = None) -> str:
    """A hash that changes when the model source changes, computed without importing torch."""
    h = hashlib.sha256(source.encode())
    root = root or Path.cwd()
    kind, target = classify(source)
    if kind == "hub":
        h.update(hub_fingerprint(source, root).encode())
    elif kind in ("file", "torchscript", "export"):
        path = Path(target.split(":")[0]) if kind == "file" else Path(target)
        path = path if path.is_absolute() else root / path
        if path.is_file():
            h.update(file_sha256(path).encode())
    elif kind == "module":
        spec = _module_spec(target, root)
        if spec is not None and spec.origin and Path(spec.origin).is_file():
            h.update(file_sha256(Path(spec.origin)).encode())
    elif kind == "default" and embedded_name(source):  # the files, not the module: importing it imports torch
        for part in embedded_files(target):
            if part.is_file():
                h.update(file_sha256(part).encode())
    return h.hexdigest()[:16]


def _module_spec(target: str, root: Path | None = None) -> Any:
    """importlib's spec of ``package.module`` (looking in ``root`` first, as _factory does), or None."""
    added = root is not None and str(root) not in sys.path
    if added:
        sys.path.insert(0, str(root))
    try:
        return importlib.util.find_spec(target.split(":")[0])
    except (ImportError, ValueError):
        return None
    finally:
        if added:
            sys.path.remove(str(root))


def _embedded(source: str) -> str:
    """The embedded model's name; ModelError naming the embedded models for any other edgeport: name."""
    name = embedded_name(source)
    if name is None:
        raise ModelError(f"--model {source!r}: the embedded models are "
                         f"{', '.join('edgeport:' + n for n in EMBEDDED)}")
    return name


def classify(source: str) -> tuple[str, str]:
    """(kind, rest) for a --model string; ModelError when it fits no form."""
    if find_hub(source) is not None:
        return "hub", source
    if source.startswith("edgeport:"):
        return "default", source.split(":", 1)[1]
    if source.startswith("torchvision:"):
        return "torchvision", source.split(":", 1)[1]
    if source.endswith(".pt2"):
        return "export", source
    if source.endswith((".pt", ".pth", ".torchscript")) and ":" not in source:
        return "torchscript", source
    if ".py:" in source:
        return "file", source
    if _MODULE_RE.match(source):
        return "module", source
    raise ModelError(f"--model {source!r}: expected torchvision:<name>[?k=v], path/file.py:factory, "
                     "package.module:factory, a TorchScript .pt, a torch.export .pt2, ultralytics:best.pt, "
                     "hf:DIR or timm:NAME")


def check_source(source: str, weights: str | None, root: Path | None = None) -> None:
    """ModelError for a --model or --weights that cannot work, found without importing torch, so a build
    fails on it before any expensive stage runs."""
    root = root or Path.cwd()
    kind, rest = classify(source)
    if kind == "default":
        _embedded(source)
    if kind == "hub":
        hub, rest = find_hub(source)  # type: ignore[misc]
        hub.check(rest, root, weights)
        require_hub(hub)
    if kind in ("file", "torchscript", "export"):
        path = resolve_path(rest.rpartition(":")[0] if kind == "file" else rest, root)
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist")
    elif kind == "module" and _module_spec(rest.rpartition(":")[0], root) is None:
        raise ModelError(f"--model {source!r}: no module named '{rest.rpartition(':')[0]}' (looked in {root} and on "
                         "sys.path)")
    if weights and not resolve_path(weights, root).is_file():
        raise ModelError(f"weights file {resolve_path(weights, root)} does not exist")


def default_name(source: str) -> str:
    """A short model name for bundles and reports."""
    kind, rest = classify(source)
    if kind == "hub":
        hub, rest = find_hub(source)  # type: ignore[misc]
        return hub.name(rest)
    if kind in ("default", "torchvision"):
        return rest.split("?")[0]
    if kind in ("file", "module"):
        return rest.split(":")[-1].split(".")[-1]
    return Path(rest).stem


DEFAULT_SEED = 0


def load_model(source: str, weights: str | None = None, root: Path | None = None, seed: int = DEFAULT_SEED) -> Any:
    """Build the nn.Module named by ``source``, load ``weights``, and put it in eval mode.

    The module is constructed under ``torch.manual_seed(seed)`` (the global RNG state is restored
    afterwards), so a model without trained weights (``torchvision:NAME``, a factory without a
    checkpoint) gets the same random weights in every process: the build's reference and a later
    ``edgeport validate`` compute the same function.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _load_model(source, weights, root or Path.cwd())


def _load_model(source: str, weights: str | None, root: Path) -> Any:
    import torch

    kind, rest = classify(source)
    if kind == "hub":
        hub, rest = find_hub(source)  # type: ignore[misc]
        hub.check(rest, root, weights)
        require_hub(hub)
        model = hub.load(rest, root)
        if weights:
            load_weights(hub.weights_into(model), local_path(weights, root))
            weights = None
    elif kind == "default":
        module, _, factory = EMBEDDED[_embedded(source)][0].partition(":")
        model = getattr(importlib.import_module(module), factory)(pretrained=weights is None)
    elif kind == "torchvision":
        model = _torchvision(rest)
    elif kind in ("file", "module"):
        model = _factory(kind, rest, root)
    else:
        path = Path(rest) if Path(rest).is_absolute() else root / rest
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist")
        try:
            if kind == "torchscript":
                model = torch.jit.load(str(path), map_location="cpu")
            else:
                model = _inference_only(torch.export.load(str(path)).module())
        except Exception as e:  # torch raises many types for bad archives
            raise ModelError(f"cannot load {path}: {str(e).splitlines()[0]}") from e
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"--model {source!r} gave a {type(model).__name__}, not a torch.nn.Module")
    if weights:
        load_weights(model, Path(weights) if Path(weights).is_absolute() else root / weights)
    # torch.export modules refuse .eval(); their graph is already in inference form.
    try:
        model.eval()
    except (NotImplementedError, RuntimeError):
        pass
    return model


def _inference_only(module: Any) -> Any:
    """A torch.export program's module, whose train()/eval() raise (its graph is already in inference form), made
    to take a mode change as a no-op: the ONNX exporter sets the mode of what it exports."""
    import types

    def train(self: Any, mode: bool = True) -> Any:
        return self

    module.train = types.MethodType(train, module)
    return module


def _torchvision(rest: str) -> Any:
    name, kwargs = split_query(rest)
    if kwargs.get("weights") not in (None, "None"):
        raise ModelError(f"torchvision:{rest}: edgeport never downloads weights; drop 'weights=' and pass "
                         "a local file with --weights")
    kwargs["weights"] = None
    if kwargs.get("weights_backbone") not in (None, "None"):
        raise ModelError(f"torchvision:{rest}: edgeport never downloads weights; drop 'weights_backbone=' and pass "
                         "a local file with --weights")
    try:
        import torchvision
    except ImportError as e:
        raise ModelError(f"torchvision cannot be imported ({e}); pip install 'edgeport[torch]'") from None
    available = torchvision.models.list_models()
    if name not in available:
        from edgeport.errors import close_match

        raise ModelError(f"torchvision has no model '{name}'{close_match(name, available)}")
    builder = torchvision.models.get_model_builder(name)
    if "weights_backbone" in inspect.signature(builder).parameters:  # detectors: never an ImageNet download
        kwargs["weights_backbone"] = None
    try:
        model = builder(**kwargs)
    except TypeError as e:
        raise ModelError(f"torchvision:{rest}: {e}") from None
    from edgeport.zoo.tvdet import HeadExport, wraps

    return HeadExport(model) if wraps(model) else model


def _factory(kind: str, rest: str, root: Path) -> Any:
    where, _, attr = rest.rpartition(":")
    if kind == "file":
        path = Path(where) if Path(where).is_absolute() else root / where
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist")
        mod_name = "edgeport_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[mod_name] = module
        sys.path.insert(0, str(path.parent))
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as e:
            raise ModelError(f"{path} fails to import: {type(e).__name__}: {e}") from e
        finally:
            sys.path.remove(str(path.parent))
    else:
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ModelError(f"cannot import module '{where}' for --model {rest!r}: {e}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            from edgeport.errors import close_match

            raise ModelError(f"{where} has no '{attr}'{close_match(part, names)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"{where}:{attr} is not callable")
    try:
        return obj()
    except Exception as e:
        raise ModelError(f"{where}:{attr}() raised {type(e).__name__}: {e}") from e


_CKPT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights", "ema")


def extract_state_dict(obj: Any) -> dict[str, Any]:
    """The state_dict inside a checkpoint (plain, or under a usual key), 'module.' stripped."""
    import torch

    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _CKPT_KEYS:
            if key in obj:
                return extract_state_dict(obj[key])
        raise ModelError(f"checkpoint holds no state_dict (keys: {', '.join(map(str, list(obj)[:8]))}); "
                         f"expected tensors or one of {', '.join(_CKPT_KEYS)}")
    if not isinstance(obj, dict):
        raise ModelError(f"checkpoint is a {type(obj).__name__}, not a state_dict")
    prefixes = ("module.", "_orig_mod.")
    out = {}
    for k, v in obj.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def load_weights(model: Any, path: Path) -> None:
    """Load a state_dict or training checkpoint; a mismatch names keys and shapes."""
    import torch

    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, KeyError, RuntimeError... for bad files
        raise ModelError(f"cannot read weights {path}: {_weights_error(e)}") from e
    state = extract_state_dict(obj)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_few(unexpected)}")
        if shapes:
            parts.append(f"shape differs {len(shapes)}: {_few(shapes)}")
        raise ModelError(f"weights {path.name} do not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def first_forward(model: Any, example: Any) -> Any:
    """The model's output on ``example``; ModelError naming the exception when the user's forward raises."""
    import torch

    try:
        with torch.no_grad():
            return model(example)
    except Exception as e:  # the user's code: any exception is theirs to fix
        msg = _first_fact(str(e)) or "no message"
        raise ModelError(f"the model's forward raised {type(e).__name__} on an input of shape "
                         f"{list(example.shape)}: {msg} (check --input, N x C x H x W, against what the model "
                         "takes; -v shows the traceback)") from e


def _weights_error(e: Exception) -> str:
    """What is wrong with a checkpoint torch.load refused, without torch's advice to load it with
    weights_only=False (that runs code from the file)."""
    text = str(e)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return (f"it holds a pickled {m.group(1)} object, and edgeport loads weights with weights_only=True, "
                "which never runs code from a file; save the weights with torch.save(model.state_dict(), path)")
    return ("not a PyTorch state_dict or checkpoint (torch.save output); "
            f"torch.load says: {type(e).__name__} {_first_fact(text)}")


def _first_fact(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    facts = [ln for ln in lines if "weights_only" not in ln and "Weights only" not in ln
             and "documentation" not in ln and "file an issue" not in ln]
    return (facts[0] if facts else (lines[0] if lines else ""))[:200]


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
