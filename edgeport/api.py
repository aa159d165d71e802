"""The Python API: every CLI command is one of these functions, with the same parameters."""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from edgeport import options
from edgeport.errors import ConfigError
from edgeport.tables import points
from edgeport.zoo import embedded_calibration, embedded_name


def build(model: str | None = None, **settings: Any) -> Any:
    """Build bundles for targets (all installed ones when none is given); returns a BuildReport.

    The keywords are the options of `edgeport build`, by the flags' names (a flag's dashes are
    underscores here; edgeport.options declares them all, ``inspect.signature(build)`` lists them). With labelled
    validation data (``val_images`` [+ ``val_labels``]) every artifact's task metric (mIoU or top-1) is measured
    beside the reference's, and INT8 uses accuracy control. A setting that cannot take effect for the selected
    targets is a ConfigError.
    Example: build("torchvision:resnet18", input="1x3x224x224", task="classification",
    calib="images/", target=["intel-cpu:int8"])
    """
    from edgeport.build.run import run_build

    given = options.given(options.BUILD, {"model": model, **settings})
    cfg = options.configure(options.BUILD, given)
    return run_build(cfg, list(cfg.build.target), cfg.build.precision, given)


build.__signature__ = options.signature(  # type: ignore[attr-defined]
    options.BUILD, [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)], [])


def export(model: str | None = None, *, target: list[str] | None = None, out: str | None = None,
           **settings: Any) -> dict[str, Any]:
    """Export the model to a checked, simplified ONNX (parity-tested against PyTorch).

    The opset is the strictest ceiling of ``target`` (17 when none is given); the other keywords are the options
    of `edgeport export` (edgeport.options).
    Example: export("torchvision:resnet18?num_classes=10", input="1x3x224x224", out="resnet18.onnx")
    """
    import shutil

    from edgeport.build.calibrate import calibration_stage
    from edgeport.build.export import GOLDEN_CASES, export_stage
    from edgeport.cache import TMP_PREFIX, folder_lock, sweep_stale, writable_folder
    from edgeport.calibration import SYNTHETIC
    from edgeport.calibration import check_source as check_calibration
    from edgeport.export import choose_opset
    from edgeport.model import check_source
    from edgeport.target import get_target

    cfg = options.configure(options.EXPORT, {"model": model, **settings})
    if cfg.optimize.prune == "auto":
        raise ConfigError("--prune auto chooses a ratio by its accuracy on validation data, which export does not "
                          "read: give a ratio (--prune 0.3), or use edgeport build")
    ceilings = [get_target(t.split(":")[0], cfg.root).opset_max for t in (target or [])]
    chosen = choose_opset(ceilings, cfg.export.opset)
    if out is not None and not out.endswith(".onnx"):
        raise ConfigError(f"--out {out}: an ONNX file name must end in .onnx")
    if out is not None and Path(out).is_dir():
        raise ConfigError(f"--out {out} is a folder; give an ONNX file name")
    check_source(cfg.model.model, cfg.model.weights, cfg.root)
    source = cfg.calibration.calib
    if source is None:
        embedded = embedded_name(cfg.model.model)
        source = embedded_calibration(embedded) if embedded else \
            f"{SYNTHETIC}?n={max(cfg.export.parity_samples, GOLDEN_CASES)}"
    check_calibration(source, cfg.root)
    build_path = writable_folder(cfg.resolve(cfg.build.build_dir), "--build-dir")
    with folder_lock(build_path):
        sweep_stale(build_path)
        samples, _ = calibration_stage(cfg, source, cfg.input, build_path, 1)
        stage, info, cached = export_stage(cfg, cfg.input, samples, chosen, build_path)
    dest = Path(out) if out else Path(f"{info['model']}.onnx")
    if dest.is_dir():  # the default name, known only now (a given --out was checked above)
        raise ConfigError(f"{dest} is a folder; give --out an ONNX file name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{TMP_PREFIX}{dest.name}.part")
    try:  # copied under a temporary name, then renamed: an interrupted export never leaves half an ONNX
        shutil.copyfile(stage.dir / "model.onnx", part)
        part.replace(dest)
    finally:
        part.unlink(missing_ok=True)
    return {"onnx": str(dest), "opset": chosen, "parity": info["parity"], "cached": cached}


export.__signature__ = options.signature(  # type: ignore[attr-defined]
    options.EXPORT, [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)],
    [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in ("target", "out")])
# validate's data options go to the gate itself (a dataset of the command line, or the bundles' recorded max_drop),
# not into the reference's configuration
_GATE_OPTIONS = ("val_images", "val_labels", "max_images", "max_drop")


def validate(paths: list[str] | None = None, *, localize: bool = False, bench: bool = False, bench_iters: int = 200,
             emulate: str | None = None, frames: int = 8, **settings: Any) -> Any:
    """Validate bundles (default: the project's dist folder) against the PyTorch model; a ValidateReport.

    Each bundle runs on its golden frames and, when given, on ``val_images`` (+ ``val_labels`` label
    maps for mIoU, or class sub-folders for top-1), preprocessed with its own manifest. The reference is
    the project's (``config``, ./edgeport.toml, or the model options); with none of them, what the bundles' builds
    recorded (edgeport.record): model source, weights (sha256-checked), seed and preprocessing.
    With ``emulate="aarch64"`` each ARM (TFLite aarch64) bundle is also installed and run on emulated aarch64, on
    ``frames`` frames, against the x86 run of the same model (edgeport.emulate).
    Example: validate(["dist"], val_images="camvid/val", val_labels="camvid/valannot", bench=True)
    """
    from edgeport.config import CONFIG_NAME
    from edgeport.flagcheck import check_val_labels
    from edgeport.validate import config_from_manifests, run_validate

    given = options.given(options.VALIDATE, settings)
    gate = {k: given.pop(k, None) for k in _GATE_OPTIONS}
    check_val_labels(gate["val_labels"], gate["val_images"])
    base = None
    if "config" not in given and "model" not in given and not (Path.cwd() / CONFIG_NAME).is_file():
        base = config_from_manifests(list(paths or []), given.get("build_dir"))
    cfg = options.configure(options.VALIDATE, given, cfg=base)
    return run_validate(cfg, list(paths or []), images=gate["val_images"], labels=gate["val_labels"],
                        max_images=gate["max_images"], max_drop=gate["max_drop"], localize=localize, bench=bench,
                        bench_iters=bench_iters, emulate=emulate, frames=frames)


validate.__signature__ = options.signature(  # type: ignore[attr-defined]
    options.VALIDATE, [inspect.Parameter("paths", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)],
    [inspect.Parameter("localize", inspect.Parameter.KEYWORD_ONLY, default=False),
     inspect.Parameter("bench", inspect.Parameter.KEYWORD_ONLY, default=False),
     inspect.Parameter("bench_iters", inspect.Parameter.KEYWORD_ONLY, default=200),
     inspect.Parameter("emulate", inspect.Parameter.KEYWORD_ONLY, default=None),
     inspect.Parameter("frames", inspect.Parameter.KEYWORD_ONLY, default=8)])


def targets() -> list[dict[str, Any]]:
    """Every device profile as a dict (name, backend, precisions, runtime, opset ceiling...)."""
    from edgeport.target import all_targets

    return [{"name": n, **t.to_dict()} for n, t in sorted(all_targets().items())]


def doctor() -> list[dict[str, Any]]:
    """Each backend and tool: installed or not, versions, why not, the install command."""
    from edgeport.backends import HOST_RUNTIMES, REGISTRY, availability
    from edgeport.backends.base import probe

    rows = []
    for name in [*REGISTRY, *HOST_RUNTIMES]:
        av = availability(name)
        rows.append({"name": name, "installed": av.installed, "versions": av.versions, "reason": av.reason,
                     "install": av.install})
    for name, mods, extra in (("pytorch", {"torch": "torch", "torchvision": "torchvision"}, "torch"),
                              ("onnx", {"onnx": "onnx", "onnxslim": "onnxslim"}, "onnx"),
                              ("pruning", {"torch": "torch", "torch_pruning": "torch-pruning"}, "torch,prune")):
        av = probe(name, extra, mods)
        rows.append({"name": name, "installed": av.installed, "versions": av.versions, "reason": av.reason,
                     "install": av.install})
    return rows


def inspect(path: str) -> dict[str, Any]:
    """Describe a bundle folder (manifest, verdict, file check) or an ONNX file (I/O, opset, edgeport metadata).

    ``problems`` lists what makes a bundle unusable: damaged files, or a build that failed its gates.
    """
    p = Path(path)
    if p.is_dir():
        from edgeport.bundle import failed_gates, read_manifest, verify_bundle

        m = read_manifest(p)
        damaged = verify_bundle(p)
        problems = damaged + [f"FAILED its build gates: {r}" for r in failed_gates(m)]
        return {"kind": "bundle", "path": str(p), "model": m["model"]["name"], "source": m["model"].get("source"),
                "seed": m["model"].get("seed"), "target": m["target"], "backend": m["backend"],
                "precision": m["precision"], "verdict": m.get("verdict"), "inputs": m["inputs"],
                "outputs": m["outputs"], "preprocess": m["preprocess"], "runtime": m["runtime"],
                "parity": m.get("parity"), "files": len(m["files"]), "build_key": m.get("build_key"),
                "edgeport": m.get("edgeport"), "damaged": damaged, "problems": problems}
    if p.suffix == ".onnx" and p.is_file():
        import onnx

        from edgeport.export import get_metadata

        try:
            proto = onnx.load(str(p), load_external_data=False)
            meta = get_metadata(p)
        except Exception as e:  # protobuf raises DecodeError and others for a file that is not ONNX
            raise ConfigError(f"{path} is not a readable ONNX model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None

        if not proto.graph.node and not proto.graph.output:  # an empty file parses as an empty model
            raise ConfigError(f"{path} is not an ONNX model: it holds no graph "
                              f"({'0 bytes' if p.stat().st_size == 0 else 'no nodes, no outputs'}); export it again")

        def dims(t: Any) -> list[Any]:
            return [d.dim_value or d.dim_param for d in t.type.tensor_type.shape.dim]

        inits = {i.name for i in proto.graph.initializer}
        return {"kind": "onnx", "path": str(p),
                "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
                "inputs": [{"name": i.name, "shape": dims(i)} for i in proto.graph.input if i.name not in inits],
                "outputs": [{"name": o.name, "shape": dims(o)} for o in proto.graph.output],
                "nodes": len(proto.graph.node), "ops": sorted({n.op_type for n in proto.graph.node}),
                "edgeport": meta, "problems": []}
    if not p.exists():
        raise ConfigError(f"{path} does not exist; expected a bundle folder or an .onnx file")
    raise ConfigError(f"{path}: expected a bundle folder or an .onnx file")


def inspect_text(res: dict[str, Any]) -> list[str]:
    """``inspect``'s result as aligned lines for a terminal."""
    def io(t: dict[str, Any]) -> str:
        parts = [t["name"], t.get("dtype", ""), str(t["shape"]), t.get("layout") or ""]
        if t.get("quant"):
            parts.append(f"(int8 scale {t['quant']['scale']:.4g}, zero point {t['quant']['zero_point']})")
        return " ".join(p for p in parts if p)

    rows: list[tuple[str, str]] = []
    if res["kind"] == "onnx":
        meta = res.get("edgeport") or {}
        rows += [("onnx", res["path"]), ("opset", ", ".join(f"{k} {v}" for k, v in res["opset"].items()))]
        rows += [("input", io(i)) for i in res["inputs"]] + [("output", io(o)) for o in res["outputs"]]
        ops = ", ".join(res["ops"][:12]) + (", ..." if len(res["ops"]) > 12 else "")
        rows.append(("nodes", f"{res['nodes']} ({ops})"))
        if meta:
            rows.append(("edgeport", f"model {meta.get('model')} from {meta.get('source')}, edgeport "
                                     f"{meta.get('edgeport')}"))
        return [f"{k:11} {v}" for k, v in rows]
    verdict = res.get("verdict") or {}
    status = verdict.get("status", "unknown")
    rows += [("bundle", res["path"]),
             ("model", f"{res['model']} ({res['source']}" + (f", seed {res['seed']})" if res.get("seed") is not None
                                                             else ")")),
             ("target", f"{res['target']} ({res['backend']}, {res['precision']})"),
             ("verdict", f"{status.upper() if status == 'failed' else status}: " +
              ("; ".join(verdict.get("reasons", [])) if status == "failed" else verdict.get("checked", "")))]
    rows += [("input", io(i)) for i in res["inputs"]] + [("output", io(o)) for o in res["outputs"]]
    pre = res["preprocess"]
    rows.append(("preprocess", f"{pre['resize']} to {pre['shape']} {pre['layout']}, {pre['color']}, scale "
                               f"{pre['scale']:.6g}, mean {pre['mean']}, std {pre['std']}, task {pre['task']}"))
    rows.append(("runtime", ", ".join(f"{k} {v}" for k, v in res["runtime"].items()) or "-"))
    parity = res.get("parity") or {}
    for name, m in (parity.get("artifact") or {}).items():
        rows.append(("parity", f"{name}: cosine {m['cosine']:.6f}, max_rel {m['max_rel']:.2e}, agreement "
                               f"{100 * m['agreement']:.2f}% vs PyTorch" + ("" if m["ok"] else " FAILED")))
    acc = parity.get("accuracy")
    if acc and acc.get("drop") is not None:
        lim = acc.get("max_drop")
        rows.append(("accuracy", f"{acc['metric']} {acc['metrics'][acc['metric']]:.2f} "
                                 f"({points(-acc['drop'], -lim if lim is not None else None, signed=True)} vs "
                                 f"FP32) on the report half of {acc['source']}"))
    rows.append(("files", f"{res['files']}, " + ("DAMAGED" if res["damaged"] else "all sha256 match")))
    rows.append(("built", f"edgeport {res.get('edgeport')}, build key {res.get('build_key')}"))
    lines = [f"{k:11} {v}" for k, v in rows]
    lines += [f"problem     {p}" for p in res["problems"]]
    return lines


def to_json(obj: Any) -> str:
    """JSON for --json outputs."""
    return json.dumps(obj, indent=2, default=str)
