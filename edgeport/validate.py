"""`edgeport validate`: the parity gate between PyTorch and every bundle the host can run.

For each bundle the frames are the bundle's golden frames plus, when given, a dataset. The
reference is the project's PyTorch model with the project's preprocessing; the candidate is the
bundle's own artifact with the preprocessing written in its manifest, exactly as its runner on
the device would apply it. A wrong mean/std, a swapped channel order or a corrupted weight in a
bundle therefore shows as a numeric failure naming the bundle, its backend and the output.

Host runtimes: OpenVINO (IR), TFLite (LiteRT interpreter), TensorRT INT8 emulated in ONNX
Runtime on the bundle's Q/DQ model; a TensorRT FP16/FP32 bundle has its model.onnx checked in
ONNX Runtime (the engine itself is built and checked on the device by runner.py --selftest).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeport.backends import get_backend
from edgeport.backends.base import Artifacts, Runtime, TensorInfo
from edgeport.bundle import failed_gates, read_manifest, verify_bundle
from edgeport.config import ProjectConfig
from edgeport.errors import BundleError, ConfigError, EdgeportError
from edgeport.evaluate import LabelledSet
from edgeport.flags import dashed
from edgeport.model import default_name, file_sha256, source_fingerprint
from edgeport.preprocess import InputSpec, to_layout
from edgeport.progress import progress
from edgeport.runner.metrics import compare
from edgeport.tables import points
from edgeport.tasks import get as get_task
from edgeport.validate_report import BundleResult, Case, ValidateReport
from edgeport.zoo import EMBEDDED, embedded_name

log = logging.getLogger("edgeport")








# ---------------------------------------------------------------- bundles
def find_bundles(paths: list[str]) -> list[Path]:
    """Bundle folders from bundle paths and dist folders (their direct sub-folders)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "manifest.json").is_file():
            found.append(p)
        elif p.is_dir():
            # dist/failed/* too: a bundle that failed its build gates is reported as failed, never overlooked
            inner = sorted(m.parent for m in p.glob("*/manifest.json")) + \
                sorted(m.parent for m in p.glob("failed/*/manifest.json"))
            if not inner:
                raise BundleError(f"{p}: no bundle in it (a bundle is a folder with manifest.json; "
                                  "run `edgeport build` first)")
            found += inner
        else:
            raise BundleError(f"{p}: no such bundle or dist folder")
    return found


def artifacts_of(bundle: Path, manifest: dict[str, Any]) -> Artifacts:
    """The Artifacts a backend's ``open`` takes, rebuilt from a bundle's manifest."""
    files = {role: bundle / rel for role, rel in manifest["files_by_role"].items()}
    return Artifacts(manifest["backend"], manifest["target"], manifest["precision"], files,
                     [TensorInfo(**d) for d in manifest["inputs"]], [TensorInfo(**d) for d in manifest["outputs"]],
                     InputSpec.from_dict(manifest["preprocess"]), manifest.get("runtime", {}),
                     manifest.get("provenance", {}))


def open_bundle(bundle: Path, manifest: dict[str, Any]) -> tuple[Runtime, str, str]:
    """(runtime, backend label, what runs it) for a bundle on this host.

    A TensorRT FP16/FP32 bundle has no host runtime of its own; its model.onnx (what the engine is
    built from) runs in ONNX Runtime. BackendUnavailableError when a runtime is not installed here.
    """
    art = artifacts_of(bundle, manifest)
    name = manifest["backend"]
    backend = get_backend(name)
    other = backend.host_check(art)
    if other is not None:
        return other
    av = backend.available()
    av.require()
    label = f"{name} (emulated)" if art.info.get("emulated") else name
    return backend.open(art), label, ", ".join(f"{k} {v}" for k, v in av.versions.items())


def model_files_mb(bundle: Path, manifest: dict[str, Any]) -> float:
    """Size of the model files (not runner, golden or docs) in MB."""
    roles = manifest.get("files_by_role", {})
    return round(sum((bundle / rel).stat().st_size for role, rel in roles.items()
                     if role != "build_engine" and (bundle / rel).is_file()) / 1e6, 3)


# ---------------------------------------------------------------- reference
class Reference:
    """The project's PyTorch model, optimised as the export optimised it, with the project's preprocessing."""

    def __init__(self, cfg: ProjectConfig) -> None:
        import torch

        from edgeport.model import first_forward, load_model
        from edgeport.optimize import optimize

        self.cfg = cfg
        self.spec = cfg.input
        self.name = cfg.model.name or default_name(cfg.model.model)
        model = load_model(cfg.model.model, cfg.model.weights, cfg.root, seed=cfg.model.seed)
        example = torch.zeros(tuple(self.spec.shape), dtype=torch.float32)
        first_forward(model, example)
        # Never pruned: pruned bundles are held to the original model (their manifests say they were pruned), and
        # the pruned, recovered model's own outputs are their golden ones, recorded at build.
        self.model, _ = optimize(model, example, fold=cfg.optimize.fold_bn, prune_ratio=0.0,
                                 finetune_hook=None if cfg.optimize.prune else cfg.optimize.finetune, spec=self.spec)
        self.size_mb = round(sum(p.numel() * p.element_size() for p in self.model.parameters()) / 1e6, 3)
        self._cache: dict[str, dict[str, np.ndarray]] = {}

    def inputs(self, frames: list[np.ndarray]) -> np.ndarray:
        """Preprocessed inputs for BGR frames, with the project's spec."""
        return self.spec.apply_batch(frames)

    def outputs(self, frames: list[np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """PyTorch outputs by name for frames (cached by content)."""
        from edgeport.export import torch_outputs

        key = hashlib.sha256(b"".join(f.tobytes() for f in frames) + repr(names).encode()).hexdigest()
        if key not in self._cache:
            self._cache[key] = torch_outputs(self.model, self.inputs(frames), names)
        return self._cache[key]

    def run_inputs(self, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """PyTorch outputs for already preprocessed inputs (bundles without golden frames)."""
        from edgeport.export import torch_outputs

        return torch_outputs(self.model, x, names)

    @property
    def version(self) -> str:
        """'pytorch <version>'."""
        import torch

        return f"pytorch {torch.__version__}"


def _other_model(manifest: dict[str, Any], cfg: ProjectConfig, weights_sha256: str | None) -> str:
    """Why a bundle's model is not the reference's (source, weights, seed), or ''. ``weights_sha256`` is the
    reference's weights file's hash (hashed once for all bundles)."""
    m = manifest["model"]
    if m.get("source") != cfg.model.model:
        return "another model source"
    w = m.get("weights")
    if w and weights_sha256 and weights_sha256 != w["sha256"]:
        return f"the weights differ ({cfg.model.weights} vs the {Path(w['path']).name} it was built with)"
    if not w and not cfg.model.weights and m.get("seed", 0) != cfg.model.seed:
        return f"random-init weights of another seed ({m.get('seed')} vs {cfg.model.seed})"
    return ""


def config_from_manifests(paths: list[str], build_dir: str | None = None) -> ProjectConfig:
    """The reference as the bundles' manifests record it: model source, weights (sha256-checked), seed,
    preprocessing and optimisation. ConfigError when the bundles hold different models or the recorded
    weights are gone or changed."""
    from edgeport.config import ModelConfig, OptimizeConfig
    from edgeport.record import read_record

    bundles = find_bundles(paths or ["dist"])
    manifests = [(b, read_manifest(b)) for b in bundles]
    keys = {}
    models = []  # each bundle's model as its build recorded it (edgeport.record), else as its manifest says
    for b, m in manifests:
        record = read_record(m)
        model = {**m["model"], **record["model"]} if record else m["model"]
        models.append(model)
        keys.setdefault(json.dumps({k: model.get(k) for k in ("source", "weights", "seed", "spec", "optimize")},
                                   sort_keys=True), []).append(b.name)
    if len(keys) > 1:
        groups = "; ".join(", ".join(names) for names in keys.values())
        raise ConfigError(f"the bundles hold different models ({groups}); validate each group on its own or pass "
                          "--config")
    bundle, model = manifests[0][0], models[0]
    root = Path(model.get("root") or Path.cwd())
    weights = model.get("weights")
    if weights:
        path = Path(weights["path"])
        if not path.is_file():
            raise ConfigError(f"{bundle}: the weights it was built with, {path}, are not there; pass --weights FILE "
                              "(or the project's --config)")
        if file_sha256(path) != weights["sha256"]:
            raise ConfigError(f"{bundle}: {path} changed since the build (sha256 differs from the manifest's); pass "
                              "the weights it was built with, --weights FILE")
    recorded = model.get("source_fingerprint")
    if recorded and source_fingerprint(model["source"], root) != recorded:
        raise ConfigError(f"{bundle}: the model source {model['source']} changed since the build (in {root}); "
                          "rebuild, or pass the project's --config")
    cfg = ProjectConfig(root=root)
    cfg.model = ModelConfig(model=model["source"], weights=weights["path"] if weights else None,
                            name=model.get("name"), seed=int(model.get("seed", 0)))
    if model.get("spec"):
        cfg.input = InputSpec.from_dict(model["spec"])
    if model.get("optimize"):
        cfg.optimize = OptimizeConfig(**model["optimize"])
    if build_dir:
        cfg.build.build_dir = str(Path(build_dir).resolve())
    log.info("reference from %s's %s: %s%s (seed %s)", bundle.name,
             "build record" if read_record(manifests[0][1]) else "manifest (its build folder is not here)",
             model["source"], f" with {weights['path']}" if weights else "", model.get("seed", 0))
    return cfg


def _golden(bundle: Path, manifest: dict[str, Any]) -> tuple[list[np.ndarray], np.ndarray]:
    """(golden frames, golden inputs) of a bundle; frames may be empty (built from a .npy)."""
    import cv2

    frames, inputs = [], []
    for case in manifest.get("golden", {}).get("cases", []):
        inputs.append(np.load(bundle / case["input"]))
        if case.get("frame"):
            img = cv2.imread(str(bundle / case["frame"]), cv2.IMREAD_COLOR)
            if img is None:
                raise BundleError(f"{bundle}: golden frame {case['frame']} cannot be read")
            frames.append(img)
    if not inputs:
        raise BundleError(f"{bundle}: manifest lists no golden cases")
    return frames, np.concatenate(inputs, 0)


def _golden_outputs(bundle: Path, manifest: dict[str, Any], names: list[str]) -> dict[str, np.ndarray]:
    """The golden (PyTorch, at build) outputs of every golden case, by output name, in the bundle's layout."""
    cases = manifest.get("golden", {}).get("cases", [])
    try:
        return {n: np.concatenate([np.load(bundle / c["outputs"][n]) for c in cases], 0) for n in names}
    except (KeyError, OSError, ValueError) as e:
        raise BundleError(f"{bundle}: golden outputs cannot be read ({type(e).__name__}: {e})") from None


def _run_frames(rt: Runtime, frames: list[np.ndarray], spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """The artifact's outputs for frames, preprocessed with the bundle's own spec (as its runner does)."""
    from edgeport.runner.preprocess import preprocess

    name = rt.inputs[0].name
    outs: dict[str, list[np.ndarray]] = {}
    for f in frames:
        for k, v in rt.infer({name: preprocess(f, spec)[0]}).items():
            outs.setdefault(k, []).append(v)
    return {k: np.concatenate(v, 0) for k, v in outs.items()}


# ---------------------------------------------------------------- the gate
def run_validate(cfg: ProjectConfig, paths: list[str], *, images: str | None = None, labels: str | None = None,
                 max_images: int | None = None, max_drop: float | None = None, localize: bool = False,
                 bench: bool = False, bench_iters: int = 200, emulate: str | None = None,
                 frames: int = 8) -> ValidateReport:
    """Validate every bundle under ``paths`` against the project's PyTorch model; with ``emulate`` ("aarch64"),
    each ARM bundle also on emulated aarch64, on ``frames`` frames (edgeport.emulate)."""
    from edgeport.evaluate import load_labelled, task_metrics

    t_start = time.time()
    bundles = find_bundles(paths or [str(cfg.resolve(cfg.build.out))])
    manifests = [read_manifest(b) for b in bundles]
    machines = _machines(emulate, manifests, frames)  # before any bundle runs: a missing tool is one line
    weights = cfg.resolve(cfg.model.weights) if cfg.model.weights else None
    weights_sha256 = file_sha256(weights) if weights is not None and weights.is_file() else None
    for b, m in zip(bundles, manifests):
        why = _other_model(m, cfg, weights_sha256)
        if why:
            raise ConfigError(f"{b} holds model '{m['model'].get('name')}' ({m['model'].get('source')}), but the "
                              f"reference is '{cfg.model.name or default_name(cfg.model.model)}' "
                              f"({cfg.model.model}): {why}; pass the project's --config, or no --config at all "
                              "(the bundles' manifests then name the model)")
    ref = Reference(cfg)
    source = images or cfg.validation.val_images
    if source is None and embedded_name(cfg.model.model):
        source = EMBEDDED[embedded_name(cfg.model.model)][2]
    lab = labels if images else (labels or cfg.validation.val_labels)
    data: LabelledSet | None = None
    ref_metrics, ref_data = None, None
    if source:
        data = load_labelled(source, lab, ref.spec, max_images=max_images or cfg.validation.max_images,
                             root=None if images else cfg.root)
        if not data.frames:
            raise ConfigError(f"{source}: validation needs raw images (a folder, or synthetic://)")
        names = [o["name"] for o in manifests[0]["outputs"]]
        ref_data = ref.outputs(data.frames, names)
        ref_metrics = task_metrics(get_task(ref.spec.task).pack(ref_data, names, ref.spec), data, ref.spec.layout) \
            or None
        if ref_metrics:
            log.info("PyTorch on %s: %s", data.source, ", ".join(f"{k} {v:.2f}" for k, v in ref_metrics.items()
                                                                 if k != "count"))
    if max_images is not None and data is None:
        raise ConfigError("--max-images has no effect without a dataset: pass --val-images (or [validation] images)")
    if max_drop is not None and not ref_metrics:
        raise ConfigError(f"{dashed('max_drop')} has no effect without labelled validation data: pass "
                          "--val-images with --val-labels (segmentation) or class sub-folders (classification)")
    drop_limit = max_drop  # None: each bundle's recorded max_drop (the build's), else the project's
    results = []
    for bundle, manifest in progress(list(zip(bundles, manifests)), "validating bundles"):
        with np.errstate(all="ignore"):  # a damaged model's inf/NaN outputs fail their checks; no numpy warnings
            res = _validate_bundle(bundle, manifest, ref, cfg, data, ref_data, ref_metrics, drop_limit, localize,
                                   bench, bench_iters)
            if machines:
                res.cases += _emulated(bundle, manifest, machines, ref, cfg, data, frames)
        results.append(res)
    ref_latency = None
    if bench:
        import torch

        from edgeport.bench import measure

        x = torch.from_numpy(np.zeros(tuple(ref.spec.shape), np.float32))
        with torch.no_grad():
            t = measure({"pytorch": lambda: ref.model(x)}, iters=bench_iters, rounds=1, progress=False)["pytorch"]
        ref_latency = {"median_ms": t.median, "p99_ms": t.p99, "fps": 1000.0 / t.median}
    return ValidateReport(ref.name, ref.version, data.source if data is not None else None,
                          ref_metrics, results, time.time() - t_start, ref_latency, ref.size_mb)


def _machines(emulate: str | None, manifests: list[dict[str, Any]], frames: int) -> dict[str, Any]:
    """{core: the emulated machine} for the ARM bundles among ``manifests`` (edgeport.emulate), the root made
    first when there is none; {} without ``emulate``."""
    if emulate is None:
        return {}
    if emulate != "aarch64":
        raise ConfigError(f"--emulate {emulate}: only aarch64 is emulated")
    if frames < 1:
        raise ConfigError(f"--frames {frames}: at least 1 frame")
    from edgeport.emulate import check, rootfs
    from edgeport.emulate.machine import Machine

    cpus = sorted({check.cpu_of(m) for m in manifests if check.applies(m)})
    if not cpus:
        raise ConfigError("--emulate aarch64: none of these bundles is an aarch64 TFLite bundle "
                          "(raspberry-pi-5, raspberry-pi-4, arm64-linux, android-arm64)")
    rootfs.qemu()
    root = rootfs.ensure_root(say=lambda line: log.info("%s", line))
    return {cpu: Machine(root, cpu) for cpu in cpus}


def _emulated(bundle: Path, manifest: dict[str, Any], machines: dict[str, Any], ref: Reference, cfg: ProjectConfig,
              data: LabelledSet | None, frames: int) -> list[Case]:
    """The emulated aarch64 checks of one bundle (edgeport.emulate.check) on ``frames`` frames: of the validation
    set's half the build gated (evenly spaced), else the golden frames."""
    from edgeport.emulate import check
    from edgeport.evaluate import task_metrics
    from edgeport.runner.preprocess import preprocess

    if not check.applies(manifest):
        return []
    spec, names = manifest["preprocess"], [o["name"] for o in manifest["outputs"]]
    task = get_task(ref.spec.task)
    if data is not None:
        half, words = _gated_half((manifest.get("parity") or {}).get("accuracy") or {}, data)
        pool = half if half is not None else list(range(len(data)))
        idx = [pool[int(i)] for i in np.unique(np.linspace(0, len(pool) - 1, min(frames, len(pool))).round())]
        shown, where = [data.frames[i] for i in idx], f"{len(idx)} frames of {words}"
        sub = data.subset(idx) if data.labelled else None
    else:
        golden, _ = _golden(bundle, manifest)
        shown, where, sub = golden[:frames], f"{min(frames, len(golden))} golden frames", None
    x = np.concatenate([preprocess(f, spec)[0] for f in shown], 0)

    def score(outs: dict[str, np.ndarray]) -> dict[str, float] | None:
        return task_metrics(task.pack(outs, names, ref.spec), sub, ref.spec.layout) or None if sub else None

    precision = manifest["precision"]
    tol = task.tolerance(precision, _profile_tolerance(manifest, cfg, host=True))
    machine = machines[check.cpu_of(manifest)]
    return check.emulated_cases(bundle, manifest, machine, x, where, _in_layout(manifest, ref.spec.layout), score,
                                tol, ref.spec.task, lambda line: log.info("%s", line))


def _profile_tolerance(manifest: dict[str, Any], cfg: ProjectConfig, host: bool = False) -> dict[str, Any]:
    """The bundle's target profile's tolerances for its precision (``host``: of the device's run against the build
    host's), the defaults where the profile is not known here."""
    from edgeport.target import DEFAULT_HOST_TOLERANCES, DEFAULT_TOLERANCES, get_target

    precision = manifest["precision"]
    try:
        target = get_target(manifest["target"], cfg.root)
        return target.host_tolerances(precision) if host else target.tolerances(precision)
    except EdgeportError:
        return dict((DEFAULT_HOST_TOLERANCES if host else DEFAULT_TOLERANCES)[precision])


def _in_layout(manifest: dict[str, Any], layout: str) -> Any:
    """A function putting a bundle's outputs in ``layout`` (TFLite gives NHWC where PyTorch gives NCHW)."""
    layouts = {o["name"]: o.get("layout") or layout for o in manifest["outputs"]}

    def convert(outs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: to_layout(v, layouts.get(k, layout), layout) for k, v in outs.items()}

    return convert


def _validate_bundle(bundle: Path, manifest: dict[str, Any], ref: Reference, cfg: ProjectConfig,
                     data: LabelledSet | None, ref_data: dict[str, np.ndarray] | None,
                     ref_metrics: dict[str, float] | None, drop_limit: float | None, localize: bool, bench: bool,
                     bench_iters: int) -> BundleResult:
    from edgeport.evaluate import primary, task_metrics
    from edgeport.target import DEFAULT_TOLERANCES

    t0 = time.time()
    name = bundle.name
    precision = manifest["precision"]
    res = BundleResult(name, str(bundle), manifest["target"], manifest["backend"], precision, "-",
                       model_files_mb(bundle, manifest))
    problems = verify_bundle(bundle)
    res.cases.append(Case(name, manifest["backend"], precision, "files", "failed" if problems else "passed",
                          {"problems": problems}, "; ".join(problems)))
    if not problems:  # the backend's own checks of its files (TensorRT: Q/DQ placement)
        for check, ok, metrics, msg in get_backend(manifest["backend"]).bundle_checks(bundle, manifest):
            res.cases.append(Case(name, manifest["backend"], precision, check, "passed" if ok else "failed", metrics,
                                  msg))
    res.cases.append(_manifest_case(bundle, manifest))
    failed = failed_gates(manifest)
    if failed:
        res.cases.append(Case(name, manifest["backend"], precision, "build verdict", "failed", {"reasons": failed},
                              f"the build marked it FAILED: {'; '.join(failed)}"))
    try:
        rt, label, runtime = open_bundle(bundle, manifest)
    except EdgeportError as e:
        res.cases.append(Case(name, manifest["backend"], precision, "host run", "skipped", {}, str(e)))
        return res
    except Exception as e:  # a corrupted model file the runtime cannot even load
        res.cases.append(Case(name, manifest["backend"], precision, "load", "failed", {},
                              f"{manifest['backend']} cannot load the model: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}"))
        return res
    res.backend, res.runtime = label, runtime
    for c in res.cases:
        c.backend = label
    base_tol = _profile_tolerance(manifest, cfg)
    ran_in = get_backend(manifest["backend"]).host_precision(artifacts_of(bundle, manifest))
    if ran_in != precision:  # e.g. a TensorRT FP16 bundle's ONNX, run in FP32 here
        base_tol = dict(DEFAULT_TOLERANCES[ran_in])
    base_tol = get_task(ref.spec.task).tolerance(precision, base_tol)
    spec = manifest["preprocess"]
    ref_layout = ref.spec.layout
    names = [o["name"] for o in manifest["outputs"]]
    as_ref = _in_layout(manifest, ref_layout)

    differs = preprocess_diff(spec, ref.spec)
    with rt:
        frames, golden_inputs = _golden(bundle, manifest)
        if frames:
            ref_out = ref.outputs(frames, names)
            got = _run_frames(rt, frames, spec)
            where = f"{len(frames)} golden frames"
        else:
            ref_out = ref.run_inputs(to_layout(golden_inputs, spec["layout"], ref_layout), names)
            got = rt.run_batches(golden_inputs)
            where = f"{len(golden_inputs)} golden inputs (no frames: preprocessing not checked)"
        got = as_ref(got)
        pruned = bool((manifest["model"].get("optimize") or {}).get("prune"))
        if pruned:  # outputs against the pruned model's, recorded at build; the metric against the original
            ref_out = as_ref(_golden_outputs(bundle, manifest, names))
            where += " vs the pruned model's PyTorch outputs recorded at build"
        got_data = None
        if data is not None and ref_data is not None:
            got_data = as_ref(_run_frames(rt, data.frames, spec))
            if not pruned:  # the build's frames: its report half, as it gated them; other frames: all of them
                half, words = _gated_half((manifest.get("parity") or {}).get("accuracy") or {}, data)
                pick = half if half is not None else list(range(len(data)))
                ref_out = {k: np.concatenate([ref_out[k], ref_data[k][pick]], 0) for k in names}
                got = {k: np.concatenate([got[k], got_data[k][pick]], 0) for k in got}
                where += f" + {words}"
        for out in names:
            if out not in got:
                res.cases.append(Case(name, label, precision, out, "failed", {}, f"{label} gives no output '{out}'"))
                continue
            tol = cfg.validation.tolerance_for(out, precision, base_tol)
            m = compare(ref_out[out], got[out], ref.spec.task, tol)
            m.update({"frames": where, "tolerance": tol})
            msg = "" if m["ok"] else f"{label} {precision} output '{out}': {', '.join(m['failed'])} vs PyTorch"
            res.cases.append(Case(name, label, precision, out, "passed" if m["ok"] else "failed", m, msg))
        if ref_metrics and got_data is not None and ref_data is not None:
            first = names[0]
            task = get_task(ref.spec.task)
            g, r = task.pack(got_data, names, ref.spec), task.pack(ref_data, names, ref.spec)
            recorded = (manifest.get("parity") or {}).get("accuracy") or {}
            limit = drop_limit if drop_limit is not None else recorded.get("max_drop", cfg.quantize.max_drop)
            idx, where_metric = _gated_half(recorded, data)
            sub = data.subset(idx) if idx is not None else data
            g_s, r_s = (g[idx], r[idx]) if idx is not None else (g, r)
            res.metrics = task_metrics(g_s, sub, ref.spec.layout)
            reference = task_metrics(r_s, sub, ref.spec.layout) if idx is not None else ref_metrics
            key, value = primary(res.metrics)
            drop = reference[key] - value if value is not None else 0.0
            ok = drop <= limit
            whose = "the original (unpruned) model's" if pruned else "PyTorch's"
            acc = {"metrics": res.metrics, "reference": reference, "metric": key, "drop": drop, "max_drop": limit,
                   "agreement": task.agreement(r_s, g_s, ref.spec), "frames": where_metric}
            msg = "" if ok else (f"{label} {precision} output '{first}': {key} {value:.2f} is "
                                 f"{points(drop, limit)} points below {whose} {reference[key]:.2f} on {where_metric} "
                                 f"(max drop {limit:g})")
            res.cases.append(Case(name, label, precision, key, "passed" if ok else "failed", acc, msg))
        metric_failed = any(c.check not in names and "drop" in c.metrics and c.status == "failed" for c in res.cases)
        if localize and res.status == "failed" and \
                (metric_failed or any(c.check in names and c.status == "failed" for c in res.cases)):
            from edgeport.localize import localize_bundle, metric_costs

            frame_x = ref.inputs(frames[:1]) if frames else to_layout(golden_inputs[:1], spec["layout"], ref_layout)
            res.localize = localize_bundle(bundle, manifest, cfg, frame_x, base_tol)
            if metric_failed and data is not None and res.localize.get("steps"):
                res.localize.update(metric_costs(bundle, manifest, res.localize["steps"], data, ref.spec))
                res.localize["summary"] += "; " + res.localize["costs_summary"]
        if bench:
            from edgeport.bench import measure

            feed = {rt.inputs[0].name: golden_inputs[:1]}
            t = measure({name: lambda: rt.infer(feed)}, iters=bench_iters, rounds=1, progress=False)[name]
            res.latency = {"median_ms": t.median, "p99_ms": t.p99, "fps": 1000.0 / t.median}
    for c in res.cases:
        c.seconds = time.time() - t0
        if c.status == "failed" and differs and c.check not in ("files", "manifest"):
            c.message += f" (the manifest's preprocess differs from the project's: {'; '.join(differs)})"
    return res


def _manifest_case(bundle: Path, manifest: dict[str, Any]) -> Case:
    """The manifest against what its build recorded (edgeport.record): every field that differs is named, and the
    manifest's preprocessing must reproduce the golden inputs the build computed from the golden frames."""
    from edgeport.record import golden_differences, manifest_differences, read_record

    record = read_record(manifest)
    found = (manifest_differences(manifest, record) if record else []) + golden_differences(bundle, manifest)
    msg = ""
    if found:
        shown = "; ".join(found[:4]) + (f" (and {len(found) - 4} more)" if len(found) > 4 else "")
        msg = (f"manifest.json was changed after the build (tampered): {shown}; rebuild the bundle, or restore its "
               "manifest")
    return Case(bundle.name, manifest["backend"], manifest["precision"], "manifest", "failed" if found else "passed",
                {"differences": found, "record": "build record" if record else "golden cases only"}, msg)


def _gated_half(recorded: dict[str, Any], data: LabelledSet) -> tuple[list[int] | None, str]:
    """(indices, words) of the frames a bundle's metric is judged on: where ``data`` holds the very frames its build
    gated on (``recorded``: the manifest's accuracy record), the build's report half, the half nothing was tuned on,
    so that validate and the build judge the same figure; else every frame."""
    from edgeport.evaluate import split_halves

    if data.frames and len(data) > 1 and recorded.get("frames_sha256") == data.frames_digest():
        idx = split_halves(data, recorded.get("split_by", "blocks"))["report"]
        return idx, f"the report half of {data.source} ({len(idx)} images, as the build gated it)"
    return None, f"{data.source} ({len(data)} images)"


def preprocess_diff(bundle_spec: dict[str, Any], project: InputSpec) -> list[str]:
    """Preprocessing keys where a bundle's manifest and the project disagree (layout aside)."""
    mine = project.to_dict()
    out = []
    for key in ("resize", "interpolation", "color", "scale", "mean", "std", "pad_value", "resize_size"):
        a, b = bundle_spec.get(key), mine.get(key)
        numeric = isinstance(a, (list, int, float)) and isinstance(b, (list, int, float))
        if not (np.allclose(a, b) if numeric else a == b):
            out.append(f"{key} {a!r} vs {b!r}")
    return out






















