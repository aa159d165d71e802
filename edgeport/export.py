"""ONNX export: opset from the strictest target, simplified, checked, parity-tested."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np

from edgeport.errors import ConversionError, ParityError

log = logging.getLogger("edgeport")

# torch.onnx's TorchScript exporter covers opsets 7..20; the dynamo exporter starts at 18.
MIN_OPSET, MAX_OPSET = 11, 20
METADATA_KEY = "edgeport.manifest"


def choose_opset(ceilings: list[int], requested: int | None = None) -> int:
    """The opset to export at: the strictest ceiling, or ``requested`` if none is exceeded."""
    ceiling = min(ceilings) if ceilings else 17
    if requested is None:
        return min(ceiling, MAX_OPSET)
    if requested > ceiling:
        raise ConversionError(f"--opset {requested} exceeds the selected targets' ceiling {ceiling} "
                              "(TensorRT 8.2 parses up to 13, 8.5/8.6 up to 17)")
    if requested < MIN_OPSET:
        raise ConversionError(f"--opset {requested} is below {MIN_OPSET}, the lowest edgeport exports")
    return requested


def _unsupported_op(text: str) -> str | None:
    m = re.search(r"operator '?([\w:.]+)'? to ONNX opset version (\d+)", text)
    if m:
        return f"{m.group(1)} (opset {m.group(2)})"
    m = re.search(r"(aten::\w+|aten\.\w+(?:\.\w+)?)", text)
    return m.group(1) if m else None


def export_onnx(model: Any, example: Any, path: Path, *, opset: int, input_name: str,
                dynamic_batch: bool = False, simplify: bool = True,
                metadata: dict[str, Any] | None = None) -> list[str]:
    """Export ``model`` to ``path``; returns the output names. ConversionError names a failing op."""
    import onnx
    import torch

    with torch.no_grad():
        output_names = [name for name, _ in named_outputs(model(example))]
    dynamic_axes = {n: {0: "batch"} for n in [input_name, *output_names]} if dynamic_batch else None
    buf = io.StringIO()
    try:
        with warnings.catch_warnings(), redirect_stdout(buf), redirect_stderr(buf), quiet_fds() as native:
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), input_names=[input_name], output_names=output_names,
                              opset_version=opset, dynamo=False, dynamic_axes=dynamic_axes,
                              do_constant_folding=True)
    except Exception as e:
        text = f"{e}\n{buf.getvalue()}\n{native.read()}"
        op = _unsupported_op(text)
        where = user_frame(e)
        at = f" at {where}" if where else ""
        if op:
            raise ConversionError(f"ONNX export at opset {opset} failed{at}: op {op} is not supported by the ONNX "
                                  "exporter; replace it in the model, or raise the opset if every target allows "
                                  "it") from e
        raise ConversionError(f"ONNX export at opset {opset} failed{at}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300]} (-v shows the traceback)") from e
    proto = onnx.load(str(path))
    if simplify:
        proto = _simplify(proto)
    try:
        onnx.checker.check_model(proto, full_check=False)
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as e:
        raise ConversionError(f"exported ONNX fails the checker: {str(e).splitlines()[0]}") from e
    if metadata:
        set_metadata(proto, metadata)
    onnx.save(proto, str(path))
    return output_names


def user_frame(error: BaseException) -> str | None:
    """'file.py:LINE in Module.forward' for the innermost frame of ``error``'s traceback that is the user's code
    (not torch, not the standard library, not edgeport), or None when the error never reached it."""
    import torch

    skip = [str(Path(torch.__file__).parent), str(Path(__file__).parent), str(Path(os.__file__).parent)]
    found = None
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        filename = frame.f_code.co_filename
        if not filename.startswith("<") and not any(filename.startswith(s) for s in skip):
            owner = frame.f_locals.get("self")
            name = frame.f_code.co_name
            if isinstance(owner, torch.nn.Module):
                name = f"{type(owner).__name__}.{name}"
            found = f"{filename}:{tb.tb_lineno} in {name}"
        tb = tb.tb_next
    return found


@contextlib.contextmanager
def quiet_fds() -> Iterator[Any]:
    """Send what native code writes to fds 1 and 2 into a temporary file (torch dumps IR graphs there)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    captured = io.StringIO()
    with tempfile.TemporaryFile("w+") as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            tmp.seek(0)
            captured.write(tmp.read())
            captured.seek(0)


def _simplify(proto: Any) -> Any:
    try:
        import onnxslim
    except ImportError:
        log.warning("onnxslim is not installed; the ONNX is left unsimplified")
        return proto
    buf = io.StringIO()
    with redirect_stdout(buf), redirect_stderr(buf):
        try:
            return onnxslim.slim(proto)
        except Exception as e:  # keep the unsimplified graph rather than fail the build
            log.warning("onnxslim failed (%s); keeping the unsimplified graph", str(e).splitlines()[0])
            return proto


def set_metadata(proto: Any, metadata: dict[str, Any]) -> None:
    """Store the manifest (JSON) in the ONNX metadata props."""
    for prop in list(proto.metadata_props):
        if prop.key == METADATA_KEY:
            proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, sort_keys=True)


def get_metadata(path: Path) -> dict[str, Any] | None:
    """The manifest stored by set_metadata, or None."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return None


def named_outputs(out: Any) -> list[tuple[str, Any]]:
    """A forward's outputs in the order the ONNX exporter flattens them, with the names edgeport gives them: a
    tensor is ``output``; a list or tuple of several ``output0``, ``output1``, ...; a dict (torchvision's
    segmentation models return ``{"out": ...}``) keeps its keys, so no wrapper is needed."""
    if isinstance(out, dict):
        named, taken = [], set()
        for key, value in out.items():
            name = re.sub(r"[^A-Za-z0-9_]", "_", str(key)) or "output"
            name = name if name not in taken else f"{name}_{len(named)}"
            taken.add(name)
            named.append((name, value))
        return named
    if isinstance(out, (list, tuple)):
        if len(out) == 1:
            return [("output", out[0])]
        return [(f"output{i}", o) for i, o in enumerate(out)]
    return [("output", out)]


def torch_outputs(model: Any, batch: np.ndarray, output_names: list[str]) -> dict[str, np.ndarray]:
    """Run the PyTorch model one sample at a time (static batch 1) and stack the outputs."""
    import torch

    outs: dict[str, list[np.ndarray]] = {n: [] for n in output_names}
    with torch.no_grad():
        for i in range(len(batch)):
            out = named_outputs(model(torch.from_numpy(batch[i:i + 1])))
            for name, (_, o) in zip(output_names, out):
                outs[name].append(o.float().numpy())
    return {n: np.concatenate(v, 0) for n, v in outs.items()}


def check_parity(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], tolerance: float,
                 what: str) -> dict[str, dict[str, float]]:
    """Max abs error (absolute and over the output range) and cosine per output.

    Every output is checked before raising; the error names each failing output.
    """
    from edgeport.runner.metrics import compare

    results, failures = {}, []
    for name, ref in reference.items():
        m = compare(ref, candidate[name], None, {"max_rel": tolerance})
        results[name] = {k: m[k] for k in ("max_abs", "max_rel", "cosine")}
        if not m["ok"]:
            failures.append(f"{name}: max error {m['max_abs']:.3g} = {m['max_rel']:.2e} of range > {tolerance:g}")
    if failures:
        raise ParityError(f"{what} parity failed: " + "; ".join(failures))
    return results


# Below these an output cannot serve as a reference: float16 flushes values under 6e-8 to zero and
# INT8 scales follow the range, and an output that hardly changes with the input makes every
# agreement figure meaningless (seen on random-init torchvision models: mobilenet_v3_small's logits
# peak at 2e-9, googlenet's vary by 1e-7 of their size across frames).
MIN_OUTPUT_MAGNITUDE = 1e-6
MIN_INPUT_DEPENDENCE = 1e-4


def input_dependence(inputs: np.ndarray, outputs: dict[str, np.ndarray]) -> dict[str, str]:
    """{output: why it cannot serve as a reference} for outputs that are vanishingly small or barely
    depend on the input across the sample frames; empty when every output is usable."""
    n = len(inputs)
    if n < 2 or float(np.abs(inputs - inputs[:1]).max()) == 0.0:
        return {}  # one frame, or identical frames: nothing to say about the model
    problems = {}
    for name, out in outputs.items():
        out = np.asarray(out, np.float64)
        size = float(np.abs(out).max())
        spread = float(np.abs(out - out.mean(0, keepdims=True)).max())
        if size < MIN_OUTPUT_MAGNITUDE:
            problems[name] = (f"output '{name}' is at most {size:.2g} in magnitude on {n} calibration frames "
                              "(float16 flushes such values to zero and INT8 cannot represent them)")
        elif spread < MIN_INPUT_DEPENDENCE * size:
            problems[name] = (f"output '{name}' barely depends on the input: across {n} calibration frames it "
                              f"varies by {spread:.2g} against values up to {size:.2g} "
                              f"({spread / size:.1g} of its size; at least {MIN_INPUT_DEPENDENCE:g} is needed)")
    return problems
