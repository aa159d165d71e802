"""The export stage: load, optimise (prune, recover), export the ONNX and check it against PyTorch; cached."""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgeport import __version__
from edgeport.build.calibrate import Supervised
from edgeport.build.compile import dist_version
from edgeport.build.prune import recover_pruned
from edgeport.cache import Stage
from edgeport.calibration import CalibrationSet
from edgeport.config import ProjectConfig
from edgeport.model import default_name, file_sha256, source_fingerprint
from edgeport.preprocess import InputSpec
from edgeport.tasks import get as get_task

ORIGINAL_ONNX = "original.onnx"  # the unpruned model, exported beside the pruned one when pruning
GOLDEN_CASES = 4  # the golden cases of every bundle: the first samples of the export's reference
log = logging.getLogger("edgeport")


def model_record(cfg: ProjectConfig) -> dict[str, Any]:
    """Where the model comes from, hashed once per build: the export's cache key and every manifest's record."""
    weights = cfg.resolve(cfg.model.weights) if cfg.model.weights else None
    return {"source": cfg.model.model, "seed": cfg.model.seed, "root": str(cfg.root),
            "source_fingerprint": source_fingerprint(cfg.model.model, cfg.root),
            "weights": {"path": str(weights), "sha256": file_sha256(weights)} if weights else None}

def export_stage(cfg: ProjectConfig, spec: InputSpec, samples: CalibrationSet, opset: int,
                  build_dir: Path, record: dict[str, Any] | None = None,
                  recover_images: CalibrationSet | None = None,
                  recovered: tuple[dict[str, Any], dict[str, Any], list[float]] | None = None,
                  supervised: Supervised | None = None) -> tuple[Stage, dict[str, Any], bool]:
    """Load, optimise (prune, recover: or load ``recovered``, (state_dict, record), weights --prune auto already
    recovered), export the ONNX (and the original's, when pruning) and check parity; cached by its settings."""
    record = record or model_record(cfg)
    settings = {
        "model": record["source_fingerprint"], "seed": cfg.model.seed,
        "weights": record["weights"]["sha256"] if record["weights"] else None,
        "spec": spec.to_dict(), "optimize": dataclasses.asdict(cfg.optimize),
        "export": dataclasses.asdict(cfg.export), "opset": opset, "samples": samples.sha256,
        "torch": dist_version("torch"), "onnx": dist_version("onnx"), "onnxslim": dist_version("onnxslim"),
        "edgeport": __version__, "name": cfg.model.name or default_name(cfg.model.model),  # the ONNX carries it
        "recover_images": recover_images.sha256 if recover_images is not None else None,
        "supervised": supervised[2] if supervised is not None else None,
    }
    stage = Stage(build_dir, "export", settings)

    def run(tmp: Path) -> dict[str, Any]:
        import torch

        from edgeport.backends.onnxruntime.backend import BACKEND as ORT
        from edgeport.export import check_parity, export_onnx, torch_outputs
        from edgeport.model import first_forward, load_model
        from edgeport.optimize import optimize

        log.info("loading model %s", cfg.model.model)
        model = load_model(cfg.model.model, cfg.model.weights, cfg.root, seed=cfg.model.seed)
        example = torch.from_numpy(samples.data[:1].copy())
        first = first_forward(model, example)
        carried = getattr(model, "edgeport_task_options", None)  # what a wrapped head knows (anchors, coder)
        full = get_task(spec.task).with_model_options(spec, carried) if carried else spec
        _check_outputs(full, first)
        original = copy.deepcopy(model) if cfg.optimize.prune else None  # the reference every figure is held to
        recover = None
        if original is not None and cfg.optimize.recover_steps and not cfg.optimize.finetune:
            recover = functools.partial(recover_pruned, cfg, spec, original, recover_images or samples, tmp, recovered,
                                        supervised)
        model, opt = optimize(model, example, fold=cfg.optimize.fold_bn, prune_ratio=cfg.optimize.prune,
                              finetune_hook=cfg.optimize.finetune, spec=spec, recover=recover,
                              prune_options={"ignore": cfg.optimize.prune_ignore,
                                             "type_ratios": cfg.optimize.prune_type_ratios})
        name = cfg.model.name or default_name(cfg.model.model)
        meta = {"model": name, "source": cfg.model.model, "preprocess": spec.to_dict(), "edgeport": __version__}
        log.info("exporting ONNX at opset %d", opset)
        onnx_path = tmp / "model.onnx"
        output_names = export_onnx(model, example, onnx_path, opset=opset, input_name=spec.name,
                                   dynamic_batch=cfg.export.dynamic_batch, simplify=cfg.export.simplify,
                                   metadata=meta)
        if original is not None:  # the unpruned model, for the accuracy reference (the validation stage scores it)
            export_onnx(original, example, tmp / ORIGINAL_ONNX, opset=opset, input_name=spec.name,
                        dynamic_batch=cfg.export.dynamic_batch, simplify=cfg.export.simplify, metadata=meta)
        x = samples.data[: max(cfg.export.parity_samples, GOLDEN_CASES)]
        ref = torch_outputs(model, x, output_names)
        _check_input_dependence(cfg, x, ref)
        with ORT.open_onnx(onnx_path) as rt:
            got = rt.run_batches(x)
        parity = check_parity(ref, got, cfg.export.tolerance, "ONNX Runtime vs PyTorch")
        np.savez(tmp / "reference.npz", inputs=x, **{f"out:{k}": v for k, v in ref.items()})
        return {"model": name, "outputs": output_names, "parity": parity, "optimize": opt.to_dict(),
                "onnx_sha256": file_sha256(onnx_path), "opset": opset,
                "task_options": full.task_options if carried else None}

    info, cached = stage.run(run)
    return stage, info, cached

def _check_outputs(spec: InputSpec, out: Any) -> None:
    """ConfigError when the model's outputs do not fit the task's settings (class names, decoder), before export."""
    from edgeport.export import named_outputs

    shapes = {name: list(getattr(v, "shape", ())) for name, v in named_outputs(out)}
    get_task(spec.task).check_outputs(spec, shapes)

def _check_input_dependence(cfg: ProjectConfig, x: np.ndarray, ref: dict[str, np.ndarray]) -> None:
    """ModelError when no output can serve as a reference (tiny, or independent of the input)."""
    from edgeport.errors import ModelError
    from edgeport.export import input_dependence

    problems = input_dependence(x, ref)
    if not problems:
        return
    if len(problems) < len(ref):  # e.g. a constant anchors output beside real ones
        for why in problems.values():
            log.warning("%s; its parity figures mean little", why)
        return
    if cfg.model.weights:
        todo = (f"check that --weights {cfg.model.weights} holds the trained weights and that --input, --mean, "
                "--std and --color match how the model was trained")
    else:
        todo = (f"{cfg.model.model} has no trained weights here (random init, seed {cfg.model.seed}); pass them "
                "with --weights FILE (a state_dict or training checkpoint)")
    raise ModelError(f"{'; '.join(problems.values())}: parity and INT8 cannot be judged against such a "
                     f"reference; {todo}")
