"""Optimisation before export: Conv/BN folding, structured channel pruning, fine-tuning hook."""
from __future__ import annotations

import importlib
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgeport.errors import ConfigError, ConversionError, ModelError

log = logging.getLogger("edgeport")


@dataclass
class ModelStats:
    """Size and cost of a model on one input."""

    params: int
    macs: int
    latency_ms: float

    def __str__(self) -> str:
        return f"{self.params / 1e6:.3f} M params, {self.macs / 1e6:.1f} M MACs, {self.latency_ms:.2f} ms"


@dataclass
class OptimizeReport:
    """What optimisation did, for the build log and the manifest."""

    folded_bn: int = 0
    fold_max_error: float = 0.0
    before: ModelStats | None = None
    after: ModelStats | None = None
    prune_ratio: float = 0.0
    finetuned: str | None = None
    recovery: dict[str, Any] | None = None  # edgeport.recover.RecoveryReport.to_dict()

    def to_dict(self) -> dict[str, Any]:
        """Manifest form."""
        return {
            "folded_bn": self.folded_bn, "fold_max_error": self.fold_max_error,
            "prune_ratio": self.prune_ratio, "finetuned": self.finetuned, "recovery": self.recovery,
            "before": vars(self.before) if self.before else None,
            "after": vars(self.after) if self.after else None,
        }


def measure(model: Any, example: Any, runs: int = 20) -> ModelStats:
    """Parameters, MACs (torch-pruning's counter when present) and median CPU latency."""
    import torch

    params = sum(p.numel() for p in model.parameters())
    macs = 0
    try:
        import torch_pruning as tp

        macs, _ = tp.utils.count_ops_and_params(model, example)
    except ImportError:
        pass
    times = []
    with torch.no_grad():
        model(example)
        for _ in range(runs):
            t = time.perf_counter()
            model(example)
            times.append((time.perf_counter() - t) * 1e3)
    return ModelStats(int(params), int(macs), statistics.median(times))


def fold_bn(model: Any, example: Any, tolerance: float = 1e-4) -> tuple[Any, int, float]:
    """Fold every BatchNorm that follows a Conv into it; returns (model, count, rel error).

    Uses torch.fx's fuse (eval mode). A model fx cannot trace is returned unchanged
    (the ONNX exporter's constant folding still folds BN then). The folded model is
    checked against the original on ``example``; a difference past ``tolerance`` of the
    output range is an internal error, never silently accepted.
    """
    import torch
    from torch.fx.experimental.optimization import fuse

    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if n_bn == 0:
        return model, 0, 0.0
    try:
        fused = fuse(model)
    except Exception as e:  # fx tracing fails on data-dependent control flow
        log.info("BN folding skipped: torch.fx cannot trace the model (%s)", str(e).splitlines()[0])
        return model, 0, 0.0
    left = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    with torch.no_grad():
        ref, out = _first(model(example)), _first(fused(example))
    span = float(ref.max() - ref.min()) or 1.0
    err = float((ref - out).abs().max()) / span
    if err > tolerance:
        unstable = float32_error(model, example)
        if unstable > tolerance:  # the model, not the folding: every backend would miss it as much
            raise ModelError(f"the model is numerically unstable in float32: its output differs from the same "
                             f"model's in float64 by {unstable:.2e} of its range (tolerance {tolerance:g}), so no "
                             "backend can reproduce it; untrained weights with exploding activations do this: "
                             "load trained weights (--weights) or re-initialise them")
        raise ConversionError(f"BN folding changed the output by {err:.2e} of its range (tolerance "
                              f"{tolerance:g}); rerun with fold_bn = false and report this model")
    return fused, n_bn - left, err


def float32_error(model: Any, example: Any) -> float:
    """How far the model's float32 output on ``example`` is from the same model's in float64, over the output
    range: float rounding alone. Past a parity tolerance the model is ill-conditioned (an untrained network
    whose activations grow to 1e6 amplifies rounding into 30 % of the output), and no comparison with it means
    anything."""
    import copy

    import torch

    with torch.no_grad():
        ref = _first(model(example)).double()
        try:
            wide = _first(copy.deepcopy(model).double()(example.double()))
        except Exception:  # a model that cannot run in float64 (scripted, custom kernels): nothing to say
            return 0.0
    span = float(wide.max() - wide.min()) or 1.0
    return float((ref - wide).abs().max()) / span


def _first(out: Any) -> Any:
    from edgeport.export import named_outputs

    return named_outputs(out)[0][1]


def _head_layers(model: Any, example: Any) -> list[Any]:
    """Layers whose output channels are the model's outputs: never pruned."""
    import torch

    with torch.no_grad():
        out = _first(model(example))
    n_out = out.shape[1]
    heads = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.out_features == n_out:
            heads.append(m)
        elif isinstance(m, torch.nn.Conv2d) and m.out_channels == n_out:
            heads.append(m)
    return heads[-1:] if heads else []


def _first_conv(model: Any) -> list[Any]:
    """The first convolution: it sees the image's 3 channels, and thinning its output costs most per MAC saved."""
    import torch

    return next(([m] for m in model.modules() if isinstance(m, torch.nn.Conv2d)), [])


def prune(model: Any, example: Any, ratio: float, ignore: list[str] | None = None,
          type_ratios: dict[str, float] | None = None) -> Any:
    """Structured channel pruning (torch-pruning, group L2 magnitude); the head and the first convolution keep
    their output channels, and so do the layers whose names match a regular expression of ``ignore``. A layer
    whose type (``Conv2d``, ``Linear``, ...) is in ``type_ratios`` is pruned by that ratio instead of ``ratio``.
    ConfigError for a pattern or type that matches no layer (never silently nothing)."""
    import re

    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"--prune {ratio}: expected a fraction between 0 and 1, e.g. 0.3")
    try:
        import torch_pruning as tp
    except ImportError:
        raise ConfigError("--prune needs torch-pruning: pip install 'edgeport[prune]'") from None
    named = [(n, m) for n, m in model.named_modules() if n]
    kept = _head_layers(model, example) + _first_conv(model)
    for pattern in ignore or []:
        hits = [m for n, m in named if re.search(pattern, n)]
        if not hits:
            raise ConfigError(f"[optimize] prune_ignore {pattern!r} matches no layer; the layers are named like "
                              f"{', '.join(n for n, _ in named[:4])}")
        kept += hits
    per_layer = {}
    for kind, r in (type_ratios or {}).items():
        hits = [m for _, m in named if type(m).__name__ == kind]
        if not hits:
            raise ConfigError(f"[optimize] prune_type_ratios: no layer of type {kind!r}; the model has "
                              f"{', '.join(sorted({type(m).__name__ for _, m in named}))}")
        per_layer.update({m: float(r) for m in hits})
    try:
        pruner = tp.pruner.BasePruner(
            model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio, pruning_ratio_dict=per_layer or None, ignored_layers=kept, round_to=8,
        )
        pruner.step()
    except Exception as e:
        raise ConversionError(f"pruning failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return model


def finetune(model: Any, hook: str, spec: Any) -> Any:
    """Call the user's ``module:function(model, spec)``; it returns the model (or None to keep it)."""
    mod_name, _, fn_name = hook.partition(":")
    if not mod_name or not fn_name:
        raise ConfigError(f"--finetune {hook!r}: expected module:function")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--finetune {hook!r}: {e}") from None
    try:
        out = fn(model, spec)
    except Exception as e:
        raise ModelError(f"fine-tuning hook {hook} raised {type(e).__name__}: {e}") from e
    result = out if out is not None else model
    result.eval()
    return result


def optimize(model: Any, example: Any, *, fold: bool = True, prune_ratio: float = 0.0,
             finetune_hook: str | None = None, spec: Any = None,
             recover: Callable[[Any], dict[str, Any]] | None = None,
             prune_options: dict[str, Any] | None = None) -> tuple[Any, OptimizeReport]:
    """Run the selected optimisations; stats before/after are measured when pruning. After pruning, the user's
    fine-tuning hook runs if given, else ``recover(pruned model)`` (label-free distillation, edgeport.recover) if
    given; what it returns goes into the report. ``prune_options``: ``prune``'s ignore and type_ratios."""
    import torch

    report = OptimizeReport(prune_ratio=prune_ratio, finetuned=finetune_hook)
    scripted = isinstance(model, torch.jit.ScriptModule) or type(model).__name__ == "GraphModule" and \
        hasattr(model, "_in_spec")
    if prune_ratio:
        if scripted:
            raise ConfigError("--prune needs an nn.Module; TorchScript and torch.export models cannot be pruned")
        report.before = measure(model, example)
        model = prune(model, example, prune_ratio, **(prune_options or {}))
        if sum(p.numel() for p in model.parameters()) == report.before.params:
            raise ConfigError(f"--prune {prune_ratio:g} removed nothing: no layer of this model can lose channels "
                              "(its head and first convolution keep theirs, as do layers matched by prune_ignore; "
                              "channels go in groups of 8); drop --prune")
        if finetune_hook:
            model = finetune(model, finetune_hook, spec)
        elif recover is not None:
            report.recovery = recover(model)
        report.after = measure(model, example)
        log.info("pruned %.0f%%: %s -> %s", prune_ratio * 100, report.before, report.after)
    elif finetune_hook:
        model = finetune(model, finetune_hook, spec)
    if fold and not scripted:
        model, report.folded_bn, report.fold_max_error = fold_bn(model, example)
    return model, report
