"""Activation ranges (amax of |x| per tensor), measured on the calibration set, shared by the INT8 backends
(TensorRT's Q/DQ model and calibration cache, TFLite's narrowed ranges).

The FP32 ONNX runs in ONNX Runtime with its intermediate tensors exposed, one image at a time (histograms are
streamed, never all activations at once). A tensor read only by a Relu is not exposed and takes the Relu's range:
TensorRT fuses that Relu into the layer before it, and what a quantizer of the tensor would clip on its negative
side the Relu zeroes anyway (so the calibration cache gives such a tensor its Relu's scale). The methods are the
collectors of edgeport.quantize.collectors; ``percentile`` is the default, chosen by emulated INT8 accuracy on real
data (docs/benchmarks/ranges.md has the figures).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from edgeport.config import RANGE_METHODS
from edgeport.quantize.collectors import _Entropy, _Max, _Mse, _Percentile, _Scratch, _WithRelu, _WithSpan

METHODS = RANGE_METHODS


CODE_VERSION = 7  # bumped whenever a method's numbers change, so cached ranges are measured again


def _float_tensors(model: Any, ranks: dict[str, int] | None = None) -> list[str]:
    """Graph inputs and every node output whose inferred type is float32 (``ranks``, when given, receives each
    tensor's inferred rank, 0 where unknown)."""
    import onnx

    bulky = [(i, i.raw_data) for i in model.graph.initializer if len(i.raw_data) > 4096]
    for init, _ in bulky:  # shape inference reads the weights' shapes only: serializing their bytes is the cost
        init.ClearField("raw_data")
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    finally:
        for init, data in bulky:
            init.raw_data = data
    infos = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in infos}
    if ranks is not None:
        ranks.update({vi.name: len(vi.type.tensor_type.shape.dim) if vi.type.tensor_type.HasField("shape") else 0
                      for vi in infos})
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    for node in model.graph.node:
        if node.op_type in ("Constant", "Shape"):
            continue
        for out in node.output:
            if out and types.get(out) == onnx.TensorProto.FLOAT and out not in names:
                names.append(out)
    return names


def _plan(model: Any, names: list[str]) -> tuple[dict[str, str], dict[str, str], dict[str, list[str]]]:
    """Which float tensors need not be exposed, and where their ranges come from:

    * ``same`` {tensor: Relu output}: a tensor read by one Relu and nothing else takes the Relu's range. Its
      negative side is never seen by anything: TensorRT fuses the Relu into the layer before it and quantizes
      the fused output, and a range of the Relu's is what a quantizer of that tensor would keep anyway (what
      it clips, the Relu zeroes). Left unexposed, ONNX Runtime keeps its own Conv+Relu fusion;
    * ``derived`` {Relu output: its input}: a Relu whose input is exposed for other readers takes its
      statistics from the input's read;
    * ``unions`` {Concat output: its inputs}: a concatenation holds exactly its inputs' values, so its
      collector is fed each input's read instead of reading the Concat again (what that saves:
      docs/benchmarks/ranges.md).
    """
    inits = {i.name for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    source = {i.name for i in model.graph.input if i.name not in inits}
    readers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node)
    measured = set(names)
    same: dict[str, str] = {}
    for node in model.graph.node:
        t = node.input[0] if node.input else ""
        if (node.op_type == "Relu" and t in measured and t not in outputs and t not in source
                and len(readers.get(t, [])) == 1 and node.output[0] in measured):
            same[t] = node.output[0]
    derived: dict[str, str] = {}
    for node in model.graph.node:
        t, r = node.input[0] if node.input else "", node.output[0] if node.output else ""
        if (node.op_type == "Relu" and t in measured and t not in same and t not in derived
                and r in measured and r not in outputs and r not in same):
            derived[r] = t
    unions: dict[str, list[str]] = {}
    for node in model.graph.node:
        u = node.output[0] if node.output else ""
        if (node.op_type == "Concat" and u in measured and u not in outputs and u not in same
                and all(i in measured and i not in same and i not in derived for i in node.input)):
            unions[u] = list(node.input)
    derived = {r: t for r, t in derived.items() if t not in unions}  # an input not read: the Relu is exposed
    return same, derived, unions


NONNEGATIVE_OPS = frozenset({"Relu", "Sigmoid", "Softmax"})


# Ops whose output is >= 0 when their data inputs are (cubic Resize can overshoot, so Resize is checked by mode).
KEEPS_SIGN = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Reshape", "Flatten",
                        "Transpose", "Identity", "Squeeze", "Unsqueeze", "Slice", "Split", "Concat", "DepthToSpace",
                        "SpaceToDepth", "Resize", "Upsample"})


def nonnegative_tensors(model: Any) -> set[str]:
    """Tensors that cannot hold a negative value by the graph alone: a Relu's, Sigmoid's or Softmax's output,
    and what a sign-keeping op (pooling, reshaping, concatenation, linear or nearest Resize) makes of such
    tensors. Their statistics skip what only a negative value could change (the minimum, |x|)."""
    out: set[str] = set()
    for node in model.graph.node:  # ONNX nodes are in topological order
        if not node.output:
            continue
        if node.op_type in NONNEGATIVE_OPS:
            out.add(node.output[0])
        elif node.op_type in KEEPS_SIGN:
            if node.op_type in ("Resize", "Upsample"):
                mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
                if mode not in (b"nearest", b"linear", b"bilinear"):
                    continue
            data = [i for i in node.input if i] if node.op_type == "Concat" else node.input[:1]
            if data and all(i in out for i in data):
                out.update(o for o in node.output if o)
    return out


class _Instrumented:
    """The FP32 ONNX in ONNX Runtime with its float tensors exposed as outputs, written into buffers that are
    reused from image to image (fresh output arrays cost a page fault per 4 KiB, as much as the model's own
    pass on the CamVid model).

    Not every tensor is exposed (``_plan``): a tensor read only by a Relu takes the Relu's range (``same``),
    a Relu whose input is exposed anyway is measured from its input's read (``derived``), and a Concat from
    its inputs' reads (``unions``). Fewer bytes are read, and ONNX Runtime keeps its Conv+Relu fusions.

    ``maxima``: for a pass that needs only each tensor's largest |x| (``max``, and the first pass of the
    histogram methods), a tensor that cannot be negative (``nonnegative_tensors``) and has a channel axis is not
    exposed but reduced inside the graph by a GlobalMaxPool, which ONNX Runtime runs on its blocked layout;
    only its per-channel maxima come out (``run`` gives them under the tensor's name): the same maxima to the
    bit, for a fraction of the bytes. Signed tensors stay exposed (an Abs or Neg before the pool was no faster
    than reading them).

    ONNX Runtime's optimisations stay on (its NCHWc convolutions make the instrumented pass faster); values
    differ from the unoptimised graph's by float rounding only. One image per run (batches were no faster).
    ``threads``: ONNX Runtime's threads (0: its default, one per core); ``fork()`` gives another instance for
    another worker thread (the same session, which runs concurrent calls, with its own bound buffers: a
    session per worker costs its set-up and runs no faster), ``for_maxima()`` the ``maxima`` form of the same
    analysis. What each of these choices measured: docs/benchmarks/ranges.md."""

    def __init__(self, onnx_path: Path | None, threads: int = 0, _from: _Instrumented | None = None,
                 maxima: bool = False) -> None:
        import onnx
        import onnxruntime as ort

        self.threads, self.maxima = threads, maxima
        if _from is not None:
            self.names, self.same, self.derived, self.unions = _from.names, _from.same, _from.derived, _from.unions
            self.nonnegative, self._proto, self._ranks = _from.nonnegative, _from._proto, _from._ranks
        else:
            model = onnx.load(str(onnx_path))
            self._ranks: dict[str, int] = {}
            self.names = _float_tensors(model, self._ranks)
            self.same, self.derived, self.unions = _plan(model, self.names)
            self.nonnegative = nonnegative_tensors(model)
            self._proto = model
        if _from is not None and _from.maxima == maxima:  # a fork: the same session, its own binding and buffers
            self._model, self.pooled, self.session = _from._model, _from.pooled, _from.session
        else:
            self._model, self.pooled = self._instrument()
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.intra_op_num_threads = threads
            self.session = ort.InferenceSession(self._model, opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        read = set(self.names) | set(self.pooled)
        self.wanted = [o.name for o in self.session.get_outputs() if o.name in read]
        self._binding: Any = None
        self._x = np.empty(0, np.float32)
        self._outs: dict[str, np.ndarray] = {}

    def _instrument(self) -> tuple[bytes, dict[str, str]]:
        """The model with the tensors to read as outputs, and {GlobalMaxPool output: its tensor}."""
        import onnx
        from onnx import helper

        model = self._proto  # instrumented in place, serialized, then restored (no copy of the weights)
        existing = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}  # read as they are
        n_nodes, n_outputs = len(model.graph.node), len(model.graph.output)
        pooled: dict[str, str] = {}
        for n in self.names:
            if n in existing or n in self.same or n in self.derived or n in self.unions:
                continue
            out = n
            if self.maxima and n in self.nonnegative and self._ranks.get(n, 0) >= 3:
                out = f"{n}_edgeport_max"
                model.graph.node.append(helper.make_node("GlobalMaxPool", [n], [out], name=f"{n}_edgeport_max"))
                pooled[out] = n
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(out))
        try:
            return model.SerializeToString(), pooled
        finally:
            del model.graph.node[n_nodes:]
            del model.graph.output[n_outputs:]

    def fork(self) -> _Instrumented:
        """Another instance of the same instrumented model for another thread: its own bound buffers."""
        return _Instrumented(None, self.threads, _from=self, maxima=self.maxima)

    def for_maxima(self) -> _Instrumented:
        """The same analysis, instrumented for a pass that needs only each tensor's largest |x|."""
        return _Instrumented(None, self.threads, _from=self, maxima=True)

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """{tensor: its value (its per-channel maxima, when pooled)} for one input; the arrays are overwritten
        by the next call."""
        import onnxruntime as ort

        if self._binding is None:
            outs = dict(zip(self.wanted, self.session.run(self.wanted, {self.input: x})))
            # C order: ONNX Runtime copies a bound input that is not, and later images would never reach it
            self._x = np.empty(x.shape, np.float32)
            self._binding = self.session.io_binding()
            self._binding.bind_cpu_input(self.input, self._x)
            for name, v in outs.items():
                self._outs[self.pooled.get(name, name)] = buffer = np.empty_like(v)
                self._binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(buffer))
            outs = {self.pooled.get(n, n): v for n, v in outs.items()}
        else:
            np.copyto(self._x, x)
            self.session.run_with_iobinding(self._binding)
            outs = dict(self._outs)
        if self.input in self.names:
            outs[self.input] = x
        return outs


def _workers(footprint: int = 0) -> int:
    """Worker threads for a pass: one per core (at most 4), and no more instances than a quarter of the memory
    available holds when each takes ``footprint`` bytes of its own (an interpreter that keeps every tensor of a
    large graph: docs/benchmarks/ranges.md)."""
    n = max(1, min(4, os.cpu_count() or 1))
    available = _available_memory()
    if footprint > 0 and available:
        n = max(1, min(n, available // 4 // footprint))
    return n


def _available_memory() -> int:
    """Bytes of memory available to new allocations (Linux's MemAvailable), 0 where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def collect_ranges(onnx_path: Path, data: np.ndarray, method: str = "max",
                   progress_desc: str = "measuring activation ranges",
                   largest: dict[str, float] | None = None, known: dict[str, float] | None = None) -> dict[str, float]:
    """{tensor name: amax} over ``data`` (N, ...) preprocessed inputs, by ``method``.

    ``max``: the largest |x| (one pass); ``percentile``: the 99.99th percentile of |x|, an exact order
    statistic (one pass); ``entropy``: TensorRT's KL-divergence threshold over a 2048-bin histogram of
    [0, max] (two passes: the maxima, then the histograms; the threshold searches run in parallel);
    ``mse``: the threshold of least expected squared error over the same histograms (two passes).
    The passes that need only maxima (``max``, the histogram methods' first) pool what cannot be negative
    inside the graph (``_Instrumented``, ``maxima``). One worker thread per core runs the single-threaded
    session over its share of the images (image i goes to worker i mod workers; each worker binds its own
    buffers) and keeps its own statistics, which are merged at the end: the same numbers whatever the timing
    (maxima, counts and order statistics do not depend on the order). ``largest``, with ``percentile``,
    receives the ``max`` ranges from the same pass; ``known``, the ``max`` ranges already measured, spares
    the histogram methods their first pass.
    """
    if method not in METHODS:
        raise ValueError(f"unknown range method {method!r}")
    inst = _Instrumented(onnx_path, threads=1 if _workers() > 1 else 0, maxima=method == "max")
    histograms = method in ("entropy", "mse") and known is None
    return measure(inst, data, method, progress_desc, maxima=inst.for_maxima() if histograms else None,
                   largest=largest, known=known)


def measure(inst: Any, data: np.ndarray, method: str, progress_desc: str, steps: Any = None,
            spans: dict[str, tuple[float, float]] | None = None, maxima: Any = None,
            largest: dict[str, float] | None = None, known: dict[str, float] | None = None) -> dict[str, float]:
    """{tensor name: amax} by ``method`` (see ``collect_ranges``) from any model that shows its tensors:
    ``inst.run(x)`` gives {name: value} for one input (or its (name, value) pairs one at a time, possibly views
    valid until the next run), ``inst.names`` every tensor measured, ``inst.derived``
    {Relu output: its input} for outputs measured from their input's read (the TFLite converter's float model
    is read this way too), optionally ``inst.unions`` {tensor: the tensors whose values it holds, all read}
    and ``inst.same`` {tensor: the tensor whose range it takes} (see ``_plan``), and ``inst.fork()``
    (optional) another independent instance, so that each worker thread runs its own (``inst.footprint``, when
    given, the bytes each holds: fewer workers where memory is short, ``_workers``). ``steps(range, desc)``
    iterates the images, reporting progress (default: a bar). ``spans``, when given, receives each measured
    tensor's signed (min, max), taken in the first pass. ``maxima``: another form of ``inst`` for the first
    pass of the histogram methods, which needs only each tensor's largest |x| (``_Instrumented.for_maxima``).
    ``largest``, with ``percentile``, receives what ``max`` would give, from the same pass: the largest of the
    values each collector keeps is the largest it saw. ``known``: the ``max`` ranges of the same model and
    images, already measured: the histogram methods take their bins' ranges from them and skip their first
    pass.
    """
    if largest is not None and (method != "percentile" or spans is not None):
        raise ValueError("the largest values come only from a percentile pass without spans")
    if known is not None and (method not in ("entropy", "mse") or spans is not None):
        raise ValueError("known maxima serve only the histogram methods' bins, without spans")
    if spans is not None and (getattr(inst, "pooled", None) or maxima is not None):
        raise ValueError("signed spans need every tensor read whole")
    with_relu = set(inst.derived.values())
    unions: dict[str, list[str]] = getattr(inst, "unions", {})
    # a tensor that cannot be negative skips its minimum and |x|, unless its signed span is asked for
    positive = set() if spans is not None else getattr(inst, "nonnegative", set())
    insts = [inst] + ([inst.fork() for _ in range(_workers(getattr(inst, "footprint", 0)) - 1)]
                      if getattr(inst, "fork", None) else [])
    with ThreadPoolExecutor(max_workers=max(len(insts), _workers())) as pool:
        if method == "max":
            first = _pass(insts, unions, data, pool, lambda name, per_image: _Max(name in positive), progress_desc,
                          steps)
            found = _results(inst, first, pool)
        elif method == "percentile":
            def make(name: str, per_image: int) -> Any:
                if name in with_relu:
                    c: Any = _WithRelu(per_image * len(data))
                else:  # the percentile of x is that of |x| where x >= 0
                    c = _Percentile(per_image * len(data), signed=name in positive)
                return c if spans is None else _WithSpan(c)

            first = _pass(insts, unions, data, pool, make, progress_desc, steps)
            found = _results(inst, first, pool)
            if largest is not None:
                largest.update({n: c.largest() for n, c in first.items()})
                largest.update({r: first[t].relu_largest() for r, t in inst.derived.items() if t in first})
        else:
            if known is None:
                firsts = insts if maxima is None else [maxima] + [maxima.fork() for _ in insts[1:]]
                first = _pass(firsts, unions, data, pool, lambda name, per_image: _Max(name in positive),
                              f"{progress_desc} (maxima)", steps)
                amax = {n: c.result() for n, c in first.items()}
                amax.update({r: first[t].relu() for r, t in inst.derived.items() if t in first})
            else:
                amax = known
            relu_of = {t: r for r, t in inst.derived.items()}
            kind = _Entropy if method == "entropy" else _Mse
            hists = _pass(insts, unions, data, pool, lambda name, per_image: kind(
                amax[name], amax[relu_of[name]] if name in with_relu else None, name in positive),
                f"{progress_desc} (histograms)", steps)
            found = _results(inst, hists, pool)
    if spans is not None:
        spans.update({n: c.span() for n, c in first.items()})
    for got in (found, largest) if largest is not None else (found,):
        for t in getattr(inst, "same", {}):
            r = t
            while r in inst.same:  # a chain of Relus ends at one that is measured
                r = inst.same[r]
            got[t] = got.get(r, 0.0)
    if largest is not None:
        largest.update({n: float(largest.get(n, 0.0)) for n in inst.names})
    return {n: float(found.get(n, 0.0)) for n in inst.names}


def _results(inst: Any, collectors: dict[str, Any], pool: ThreadPoolExecutor) -> dict[str, float]:
    """{tensor: amax} from each exposed tensor's collector and, for a derived Relu output, from its input's
    (the threshold searches run in parallel)."""
    jobs = [(n, c.result) for n, c in collectors.items()]
    jobs += [(relu, collectors[src].relu) for relu, src in inst.derived.items() if src in collectors]
    return dict(zip([n for n, _ in jobs], pool.map(lambda job: job[1](), jobs)))


def _pass(insts: list[Any], unions: dict[str, list[str]], data: np.ndarray, pool: ThreadPoolExecutor, make: Any,
          desc: str, steps: Any = None) -> dict[str, Any]:
    """One pass over ``data``, every exposed tensor fed to its collector (made by ``make(name, values per
    image)``) and to those of the ``unions`` it is part of; {name: collector}. Image i goes to worker i mod
    len(insts), which runs it on its own instance and feeds its own collectors (no hand-over between threads);
    the workers' collectors are merged in worker order at the end. A tensor's values reach a collector in image
    order within a worker, and maxima, counts and order statistics do not depend on how the images were shared:
    the result does not depend on timing."""
    import queue

    from edgeport.progress import progress

    steps = steps or progress
    feeds: list[queue.Queue[int | None]] = [queue.Queue(maxsize=2) for _ in insts]
    owned: list[dict[str, Any]] = [{} for _ in insts]
    failed: list[BaseException] = []

    part_of: dict[str, list[str]] = {}
    for u, parts in unions.items():
        for t in parts:
            part_of.setdefault(t, []).append(u)

    def feed(k: int, i: int, scratch: _Scratch) -> None:
        """Image ``i`` through worker ``k``'s instance into its collectors. What ``run`` gives may be views into
        the instance's own buffers, valid until its next run: none outlives this call."""
        collectors = owned[k]
        outs = insts[k].run(np.ascontiguousarray(data[i:i + 1], dtype=np.float32))
        if not collectors and unions:
            collectors.update({u: make(u, sum(outs[t].size for t in parts)) for u, parts in unions.items()})
        for name, v in outs.items() if isinstance(outs, dict) else outs:
            if name not in collectors:
                collectors[name] = make(name, v.size)
            collectors[name].add(v.ravel(), scratch)
            for u in part_of.get(name, ()):
                collectors[u].add(v.ravel(), scratch)

    def work(k: int) -> None:
        scratch = _Scratch()
        while (i := feeds[k].get()) is not None:
            if failed:
                continue  # drain, so the feeder never blocks
            try:
                feed(k, i, scratch)
            except BaseException as e:  # re-raised by the feeding thread
                failed.append(e)

    running = [pool.submit(work, k) for k in range(len(insts))]
    try:
        for i in steps(range(len(data)), desc):
            feeds[i % len(insts)].put(i)
            if failed:
                break
    finally:
        for f in feeds:
            f.put(None)
        for r in running:
            r.result()
    if failed:
        raise failed[0]
    merged = owned[0]
    for other in owned[1:]:
        for name, c in other.items():
            merged[name].merge(c)
    return merged
