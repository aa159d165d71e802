#!/usr/bin/env python3
"""Build this bundle's TensorRT engine on the Jetson, and cache it.

Runs on the device (Python 3.6+; tensorrt from JetPack, numpy; pycuda or cuda-python only to
name the GPU). The engine is cached in engines/ under a key of the TensorRT version, the GPU
name, the precision and the ONNX's sha256, and rebuilt when any of them changes; a timing cache
beside it makes rebuilds fast. Workspace and precision come from manifest.json.

INT8 has two forms in the bundle: model_qdq.onnx (explicit quantization, Q/DQ nodes; TensorRT
8.5+ and 10.x) and, for TensorRT 8.x, model.onnx + calib.cache (implicit quantization through an
IInt8EntropyCalibrator2 that only reads the cache). ``--mode`` picks one; by default 8.2-8.4 use
the cache and 8.5+ the Q/DQ model.

    python3 build_engine.py            # build unless cached; prints the equivalent trtexec command
    python3 build_engine.py --rebuild  # rebuild even when cached
    python3 build_engine.py --mode cache
"""
import argparse
import hashlib
import json
import os
import sys
import time

ENGINE_DIR = "engines"


def _load_manifest(bundle_dir):
    with open(os.path.join(bundle_dir, "manifest.json")) as f:
        return json.load(f)


def trt_version(trt):
    """TensorRT's version as a tuple of ints, e.g. (8, 2, 1)."""
    return tuple(int(p) for p in trt.__version__.split(".")[:3])


def gpu_name():
    """The GPU's name (pycuda, then cuda-python, then the Jetson's device-tree model)."""
    try:
        import pycuda.driver as cuda
        cuda.init()
        return cuda.Device(0).name()
    except Exception:
        pass
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = props.name
            return name.decode().rstrip("\x00") if isinstance(name, bytes) else str(name)
    except Exception:
        pass
    try:
        with open("/proc/device-tree/model") as f:
            return f.read().strip("\x00\n ")
    except OSError:
        return "unknown-gpu"


def default_mode(version, manifest):
    """'qdq' or 'cache' for INT8 on this TensorRT; None for FP16/FP32."""
    if manifest["precision"] != "int8":
        return None
    files = manifest["files_by_role"]
    if version < (8, 5) and "calib_cache" in files:
        return "cache"
    return "qdq" if "qdq" in files else "cache"


def engine_key(version, gpu, manifest, mode):
    """Changes when the TensorRT version, the GPU, the precision, the mode or the ONNX changes."""
    onnx_role = "qdq" if mode == "qdq" else "model"
    onnx_sha = manifest["files"][manifest["files_by_role"][onnx_role]]
    text = "|".join([".".join(str(v) for v in version), gpu, manifest["precision"], str(mode), onnx_sha])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def trtexec_command(manifest, mode, engine_path, version):
    """The equivalent trtexec command line, for users who prefer it."""
    files = manifest["files_by_role"]
    onnx = files["qdq"] if mode == "qdq" else files["model"]
    ws = int(manifest["runtime"].get("workspace_mb", 1024))
    cmd = ["/usr/src/tensorrt/bin/trtexec", "--onnx=%s" % onnx, "--saveEngine=%s" % engine_path,
           "--timingCacheFile=%s" % os.path.join(ENGINE_DIR, "timing.cache")]
    cmd.append("--memPoolSize=workspace:%dM" % ws if version >= (8, 4) else "--workspace=%d" % ws)
    if manifest["precision"] in ("fp16", "int8"):
        cmd.append("--fp16")
    if manifest["precision"] == "int8":
        cmd.append("--int8")
        if mode == "cache":
            cmd.append("--calib=%s" % files["calib_cache"])
    return " ".join(cmd)


def _calibrator(trt, cache_bytes):
    """An IInt8EntropyCalibrator2 that never calibrates: TensorRT reads the bundle's cache."""

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return None  # no data: the cache must hold every scale

        def read_calibration_cache(self):
            return cache_bytes

        def write_calibration_cache(self, cache):
            return None

    return CacheCalibrator()


def build(bundle_dir, manifest=None, rebuild=False, mode=None, verbose=False, out=sys.stderr):
    """Path of a ready engine for this bundle on this device; builds it when not cached."""
    import tensorrt as trt

    manifest = manifest or _load_manifest(bundle_dir)
    version = trt_version(trt)
    mode = mode or default_mode(version, manifest)
    gpu = gpu_name()
    key = engine_key(version, gpu, manifest, mode)
    engine_dir = os.path.join(bundle_dir, ENGINE_DIR)
    engine_path = os.path.join(engine_dir, "%s-%s.engine" % (manifest["precision"], key))
    if os.path.isfile(engine_path) and not rebuild:
        return engine_path
    if not os.path.isdir(engine_dir):
        os.makedirs(engine_dir)
    files = manifest["files_by_role"]
    rt = manifest["runtime"]
    logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if version < (10, 0):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = os.path.join(bundle_dir, files["qdq"] if mode == "qdq" else files["model"])
    with open(onnx_path, "rb") as f:
        if not parser.parse(f.read()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError("TensorRT %s cannot parse %s: %s" % (trt.__version__, onnx_path, errors))
    config = builder.create_builder_config()
    workspace = int(rt.get("workspace_mb", 1024)) << 20
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    else:
        config.max_workspace_size = workspace
    precision = manifest["precision"]
    if precision in ("fp16", "int8"):
        if getattr(builder, "platform_has_fast_fp16", True):  # deprecated in 10.5
            config.set_flag(trt.BuilderFlag.FP16)
        else:
            out.write("warning: this GPU has no fast FP16; layers stay FP32\n")
    if precision == "int8":
        if not getattr(builder, "platform_has_fast_int8", True):
            out.write("warning: %s has no fast INT8 (e.g. the Nano's Maxwell GPU); TensorRT will pick FP16/FP32 "
                      "kernels where INT8 ones are missing\n" % gpu)
        config.set_flag(trt.BuilderFlag.INT8)
        if mode == "cache":
            with open(os.path.join(bundle_dir, files["calib_cache"]), "rb") as f:
                config.int8_calibrator = _calibrator(trt, f.read())
    dla = int(rt.get("dla_core", -1))
    if dla >= 0 and builder.num_DLA_cores > dla:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    timing_path = os.path.join(engine_dir, "timing.cache")
    timing_bytes = b""
    if os.path.isfile(timing_path):
        with open(timing_path, "rb") as f:
            timing_bytes = f.read()
    timing = config.create_timing_cache(timing_bytes)
    config.set_timing_cache(timing, False)
    out.write("building the %s engine with TensorRT %s on %s (%s); minutes on a Jetson, once\n"
              % (precision, trt.__version__, gpu, mode or precision))
    out.write("equivalent: %s\n" % trtexec_command(manifest, mode, os.path.relpath(engine_path, bundle_dir), version))
    t = time.time()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT could not build the engine (run with --verbose for the builder log)")
    tmp = engine_path + ".part"
    with open(tmp, "wb") as f:
        f.write(serialized)
    os.replace(tmp, engine_path)
    with open(timing_path + ".part", "wb") as f:
        f.write(config.get_timing_cache().serialize())
    os.replace(timing_path + ".part", timing_path)
    with open(engine_path + ".json", "w") as f:
        json.dump({"tensorrt": trt.__version__, "gpu": gpu, "precision": precision, "mode": mode,
                   "seconds": round(time.time() - t, 1)}, f, indent=2)
    out.write("engine: %s (%.0f s)\n" % (engine_path, time.time() - t))
    return engine_path


def main(argv=None):
    p = argparse.ArgumentParser(description="Build and cache this bundle's TensorRT engine on the device.",
                                epilog="examples:\n  python3 build_engine.py\n  python3 build_engine.py --rebuild "
                                       "--mode cache\n  python3 build_engine.py --print-trtexec",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rebuild", action="store_true", help="rebuild even when a cached engine matches")
    p.add_argument("--force", action="store_true", help="build for a bundle whose build failed its gates")
    p.add_argument("--mode", choices=["qdq", "cache"], help="INT8 form (default: cache below 8.5, else qdq)")
    p.add_argument("--print-trtexec", action="store_true", help="only print the equivalent trtexec command")
    p.add_argument("--verbose", action="store_true", help="TensorRT's INFO log")
    args = p.parse_args(argv)
    bundle_dir = os.path.dirname(os.path.abspath(__file__))
    manifest = _load_manifest(bundle_dir)
    verdict = manifest.get("verdict") or {}
    if verdict.get("status") == "failed" and not args.force:
        sys.stderr.write("error: this bundle FAILED its build gates (%s); it must not ship. Fix the build, or pass "
                         "--force\n" % "; ".join(verdict.get("reasons") or []))
        return 2
    try:
        import tensorrt as trt
    except ImportError:
        sys.stderr.write("error: TensorRT's Python module is missing: on a Jetson it comes with JetPack "
                         "(python3-libnvinfer); this is not a TensorRT device\n")
        return 2
    version = trt_version(trt)
    mode = args.mode or default_mode(version, manifest)
    if args.print_trtexec:
        key = engine_key(version, gpu_name(), manifest, mode)
        print(trtexec_command(manifest, mode, os.path.join(ENGINE_DIR, "%s-%s.engine" % (manifest["precision"], key)),
                              version))
        return 0
    try:
        path = build(bundle_dir, manifest, args.rebuild, mode, args.verbose)
    except RuntimeError as e:
        sys.stderr.write("error: %s\n" % e)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
