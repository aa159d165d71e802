"""`edgeport validate --localize`: the first layer where a bundle's artifact departs from the FP32 graph.

Every intermediate tensor of the FP32 ONNX is computed in ONNX Runtime and compared with the
tensor of the same name in the artifact, as its backend gives them (``layer_outputs``: OpenVINO
keeps ONNX tensor names on its IR outputs, the Q/DQ model of a TensorRT bundle keeps them on the
original nodes; onnx2tf renames and re-lays-out every TFLite tensor, so TFLite is not covered).
Tensors are walked in the ONNX graph's topological order; the first one beyond tolerance is named,
together with the layer that adds the most error by itself (often the one to keep in higher precision).

When only the task metric fails (every output within tolerance, the metric more than max_drop
below FP32), ``metric_costs`` says which layers cost the metric: for a TensorRT bundle, each of the
layers that add the most error is taken out of INT8 alone (its Q/DQ inputs rewired to the float
tensors) and the labelled set is scored again; the metric each one wins back is its cost.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeport.backends import get_backend
from edgeport.config import ProjectConfig
from edgeport.model import file_sha256
from edgeport.runner.metrics import compare
from edgeport.tasks import get as get_task


def _fp32_onnx(bundle: Path, manifest: dict[str, Any], cfg: ProjectConfig) -> Path | None:
    """The FP32 ONNX this bundle was built from: in the project's build cache, matched by sha256."""
    want = manifest["model"].get("onnx_sha256")
    for p in sorted(cfg.resolve(cfg.build.build_dir).glob("export/*/model.onnx")):
        if file_sha256(p) == want:
            return p
    return None


def ort_tensors(path: Path, x: np.ndarray) -> tuple[dict[str, np.ndarray],
                                                   list[tuple[str, str, list[str], list[str]]]]:
    """(every float tensor by name, [(node name, op type, inputs, outputs)] in graph order) for one input."""
    per_image, nodes = ort_tensors_each(path, x)
    return per_image[0], nodes


def ort_tensors_each(path: Path, x: np.ndarray) -> tuple[list[dict[str, np.ndarray]],
                                                        list[tuple[str, str, list[str], list[str]]]]:
    """``ort_tensors`` for each image of ``x`` (N, ...), through one session."""
    import onnx
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    known = {v.name: v for v in [*model.graph.value_info, *model.graph.output]}
    present = {o.name for o in model.graph.output}
    nodes = []
    for node in model.graph.node:
        nodes.append((node.name or node.output[0], node.op_type, list(node.input), list(node.output)))
        for out in node.output:
            vi = known.get(out)
            if out and out not in present and vi is not None and \
                    vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
                model.graph.output.append(vi)
                present.add(out)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    feed = sess.get_inputs()[0].name
    return [dict(zip(names, (np.asarray(v) for v in sess.run(names, {feed: x[i:i + 1]})))) for i in range(len(x))], \
        nodes


def localize_bundle(bundle: Path, manifest: dict[str, Any], cfg: ProjectConfig, x: np.ndarray,
                    tol: dict[str, Any]) -> dict[str, Any]:
    """Where the bundle's artifact first departs from the FP32 ONNX, for the NCHW input ``x``."""
    backend = get_backend(manifest["backend"])
    if not backend.names_layers_as_onnx:
        return {"summary": f"--localize does not cover {backend.name} bundles: their tensors do not keep the ONNX "
                           "graph's names"}
    onnx_path = _fp32_onnx(bundle, manifest, cfg)
    if onnx_path is None:
        return {"summary": "--localize needs the FP32 ONNX this bundle was built from (sha256 "
                           f"{manifest['model'].get('onnx_sha256', '?')[:12]}) in {cfg.build.build_dir}/; "
                           "run `edgeport build` for this project first"}
    ref, nodes = ort_tensors(onnx_path, x)
    got, hint = backend.layer_outputs(bundle, manifest, x, list(ref))
    check = {"max_rel": tol.get("max_rel"), "min_cosine": tol.get("min_cosine")}
    steps = []
    cos_of: dict[str, float] = {}
    first = None
    for name, op, ins, outs in nodes:
        for t in outs:
            if t not in ref or t not in got or ref[t].shape != got[t].shape:
                continue
            m = compare(ref[t], got[t], None, check)
            cos_of[t] = m["cosine"]
            before = min([cos_of[i] for i in ins if i in cos_of] or [1.0])
            step = {"node": name, "op": op, "tensor": t, "cosine": m["cosine"], "max_rel": m["max_rel"],
                    "added": (1.0 - m["cosine"]) - (1.0 - before)}
            steps.append(step)
            if first is None and not m["ok"]:
                first = step
    if not steps:
        return {"summary": "--localize found no tensor names shared by the ONNX and the artifact"}
    worst = max(steps, key=lambda s: s["added"])
    if first is None:
        summary = (f"the graph computes what the FP32 ONNX computes on the same input ({len(steps)} tensors "
                   "within tolerance), so the difference comes before the model: check the bundle's preprocess "
                   f"(most error is added by {worst['op']} '{worst['node']}', cosine {worst['cosine']:.6f})")
    else:
        summary = (f"first diverging layer: {first['op']} '{first['node']}' (tensor '{first['tensor']}', cosine "
                   f"{first['cosine']:.6f}, max error {first['max_rel']:.2e} of range); most error added by "
                   f"{worst['op']} '{worst['node']}'; " + hint.format(name=worst["node"]))
    return {"summary": summary, "first": first, "worst": worst, "compared": len(steps), "onnx": str(onnx_path),
            "steps": steps}



def _without_qdq(model: Any, node_name: str) -> Any:
    """A copy of a Q/DQ model whose node ``node_name`` reads float tensors (its DequantizeLinear inputs bypassed,
    activation and weight): that layer alone out of INT8."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    producer = {o: n for n in copy.graph.node for o in n.output}
    for node in copy.graph.node:
        if node.name != node_name:
            continue
        for k, t in enumerate(node.input):
            dq = producer.get(t)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]
    return copy


def metric_costs(bundle: Path, manifest: dict[str, Any], steps: list[dict[str, Any]], data: Any, spec: Any,
                 top: int = 5) -> dict[str, Any]:
    """The task metric each of the ``top`` layers adding the most error costs (module docstring); TensorRT
    bundles only (a Q/DQ model can take one layer out of INT8 without a rebuild)."""
    import onnx
    import onnxruntime as ort

    from edgeport.evaluate import pack, primary, task_metrics

    qdq = get_backend(manifest["backend"]).qdq_model(bundle, manifest)
    if qdq is None:
        return {"costs": [], "costs_summary": "per-layer metric cost is measured for bundles with a Q/DQ model only "
                                              "(TensorRT INT8)"}
    model = onnx.load(str(qdq))
    weighted = {n.name for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")}
    candidates = [s for s in sorted(steps, key=lambda s: -s["added"]) if s["node"] in weighted][:top]

    def score(m: Any) -> float:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        names = [o.name for o in sess.get_outputs()]
        runs = [sess.run(None, {name: data.inputs[i:i + 1]}) for i in range(len(data))]
        out = pack({n: np.concatenate([r[k] for r in runs]) for k, n in enumerate(names)}, data)
        return float(primary(task_metrics(out, data, spec.layout))[1] or 0.0)

    base = score(model)
    key = get_task(spec.task).label
    costs = sorted(({"node": c["node"], "op": c["op"], "cost": score(_without_qdq(model, c["node"])) - base}
                    for c in candidates), key=lambda c: -c["cost"])
    text = ", ".join(f"{c['op']} '{c['node']}' {c['cost']:+.2f}" for c in costs[:3])
    return {"costs": costs, "metric_int8": base,
            "costs_summary": f"layers that cost the most {key} (each taken out of INT8 alone, {len(data)} images): "
                             f"{text or 'none measured'}"}
