"""Runner part: --bench (end-to-end FPS against inference-only FPS) and the CPU thread policy.

Python 3.6 syntax; numpy, cv2, the standard library and the bundle's runtime only: assembled into each bundle's
single runner.py (edgeport.bundle.RUNNER_PARTS, in order), where every part's names are one module's.
"""
import json
import os
import sys
import time

import cv2
import numpy as np

from edgeport.runner.engine import make_async, thread_cpu
from edgeport.runner.loop import run_loop
from edgeport.runner.manifest import RunnerError
from edgeport.runner.preprocess import preprocess
from edgeport.runner.sources import _decode_threads, open_source

BENCH_DISTINCT = 64  # distinct preprocessed frames kept for the inference-only passes (cycled)


def available_cpus():
    """CPUs this process may run on (taskset and cgroup cpusets included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def leave_one_cpu(cpus=None):
    """Thread policy for CPU inference in the camera loop: the runtime's own choice, but never
    every CPU, so capture, preprocessing and drawing keep one (``--threads`` default).

    Returns a function from the runtime's default thread count to the count to use. On a host
    where the runtime already leaves CPUs free (OpenVINO uses physical cores, not SMT
    siblings) it changes nothing.
    """
    cpus = cpus or available_cpus()

    def policy(default):
        if not default or cpus < 2:
            return default
        return max(1, min(int(default), cpus - 1))
    return policy


def inference_only_fps(rt, in_name, inputs, count, jobs, cpu=None):
    """FPS of the runtime alone: ``count`` submissions of the preprocessed ``inputs`` (cycled)
    through the same asynchronous engine and output copy the camera loop uses. With a list
    ``cpu``, the process's CPU milliseconds per frame during the pass (every runtime thread) are
    appended to it."""
    engine = make_async(rt, lambda userdata, outs, ms=None: None, jobs)
    try:
        for x in inputs[:10]:  # warm-up
            engine.submit({in_name: x}, -1)
        engine.wait_all()
        t, c = time.time(), time.process_time()
        for i in range(count):
            engine.submit({in_name: inputs[i % len(inputs)]}, i)
        engine.wait_all()
        if cpu is not None:
            cpu.append((time.process_time() - c) * 1000.0 / count)
        return count / max(time.time() - t, 1e-6)
    finally:
        if hasattr(engine, "close"):
            engine.close()


def encode_cpu_ms(frame, times=30):
    """CPU milliseconds to JPEG-encode one frame for --serve's stream (quality 80), the mean of ``times``."""
    c = thread_cpu()
    for _ in range(times):
        cv2.imencode(".jpg", frame, [int(cv2.IMWRITE_JPEG_QUALITY), 80])
    return (thread_cpu() - c) * 1000.0 / times


def pipeline_ideal(stages, cpus, infer_fps):
    """(ideal FPS, what bounds it) of the camera pipeline from per-frame CPU milliseconds ``stages`` (decode,
    preprocess, inference, postprocess): all stages together on ``cpus`` CPUs, the capture thread's decoding
    alone, the main thread's preprocessing and postprocessing alone, and the engine's measured inference-only
    FPS, whichever is lowest."""
    total = sum(stages.values())
    main = stages["preprocess"] + stages["postprocess"]
    bounds = [("all stages on %d CPU%s" % (cpus, "" if cpus == 1 else "s"), 1000.0 * cpus / max(total, 1e-6)),
              ("the capture thread (decode)", 1000.0 / max(stages["decode"], 1e-6)),
              ("the main thread (preprocess + postprocess)", 1000.0 / max(main, 1e-6)),
              ("the engine (inference only)", infer_fps)]
    name, fps = min(bounds, key=lambda b: b[1])
    return fps, name


def bench(args, manifest, rt, out=sys.stdout, open_all=None):
    """--bench: end-to-end FPS on the source next to inference-only FPS of the same engine.

    ``--bench-rounds`` rounds, each an inference-only pass and an end-to-end run over the same
    number of frames, alternated so that drift on a busy host hits both; medians are reported.
    When the runner left CPUs to capture (--threads), ``open_all()`` gives the runtime with its
    own thread choice, and the same two figures are measured for it, so the user sees what the
    policy costs the engine and gains the pipeline.
    """
    spec = manifest["preprocess"]
    in_name = manifest["inputs"][0]["name"]
    n = args.max_frames or 300
    source = open_source(args.source, args.width, args.height, args.fps, args.reconnect, args.timeout,
                         _decode_threads(args), max_pixels=int(args.max_pixels * 1e6))
    inputs, count = [], 0
    try:
        while count < n:
            frame = source.read()
            if frame is None:
                break
            if len(inputs) < BENCH_DISTINCT:
                inputs.append(preprocess(frame, spec)[0])
            if not count:
                first = frame
            count += 1
    finally:
        source.release()
    if not inputs:
        raise RunnerError("source %s gave no frames to benchmark" % args.source)
    live = bool(getattr(source, "live", False))
    all_rt = open_all() if open_all is not None and getattr(rt, "threads", 0) else None
    if all_rt is not None and getattr(all_rt, "threads", 0) == rt.threads:
        all_rt = None  # the policy changed nothing here
    args.max_frames = count
    rounds = max(1, int(args.bench_rounds))
    figures = {"infer": [], "e2e": [], "infer_all": [], "e2e_all": []}
    infer_cpu = []
    stages = []
    for r in range(rounds):
        figures["infer"].append(inference_only_fps(rt, in_name, inputs, count, args.requests, infer_cpu))
        summary = run_loop(args, manifest, rt, quiet=True)
        figures["e2e"].append(summary["fps"])
        stages.append(summary)
        if all_rt is not None:
            figures["infer_all"].append(inference_only_fps(all_rt, in_name, inputs, count, args.requests))
            figures["e2e_all"].append(run_loop(args, manifest, all_rt, quiet=True)["fps"])
        sys.stderr.write("bench round %d/%d: inference only %.1f FPS, end to end %.1f FPS\n"
                         % (r + 1, rounds, figures["infer"][-1], figures["e2e"][-1]))
    med = dict((k, float(np.median(v)) if v else None) for k, v in figures.items())
    ratio = med["e2e"] / med["infer"]
    stage = dict((k, round(float(np.median([s[k] for s in stages])), 3))
                 for k in ("e2e_p50_ms", "capture_ms", "preprocess_ms", "postprocess_ms", "decode_cpu_ms",
                           "preprocess_cpu_ms", "postprocess_cpu_ms"))
    cpu = {"decode": stage["decode_cpu_ms"], "preprocess": stage["preprocess_cpu_ms"],
           "inference": float(np.median(infer_cpu)), "postprocess": stage["postprocess_cpu_ms"]}
    encode = encode_cpu_ms(first)
    ideal, bound = pipeline_ideal(cpu, available_cpus(), med["infer"])
    result = {"frames": count, "rounds": rounds, "requests": args.requests, "runtime": getattr(rt, "name", ""),
              "inference_threads": getattr(rt, "threads", 0) or None, "cpus": available_cpus(),
              "inference_only_fps": round(med["infer"], 1), "end_to_end_fps": round(med["e2e"], 1),
              "ratio": round(ratio, 3), "live_source": live,
              "cpu_ms": dict((k, round(v, 3)) for k, v in cpu.items()), "encode_cpu_ms": round(encode, 3),
              "ideal_fps": round(ideal, 1), "ideal_bound": bound, "efficiency": round(med["e2e"] / ideal, 3)}
    result.update(stage)
    if all_rt is not None:
        result.update({"all_threads": all_rt.threads, "inference_only_fps_all_threads": round(med["infer_all"], 1),
                       "end_to_end_fps_all_threads": round(med["e2e_all"], 1)})
    out.write("bench on %s: %d frames x %d rounds (medians), %d async jobs, %s\n"
              % (args.source, count, rounds, args.requests, result["runtime"]))
    threads = ""
    if result["inference_threads"]:
        threads = "  (the runner's engine: %d inference thread%s, %d CPUs here)" % (
            result["inference_threads"], "" if result["inference_threads"] == 1 else "s", result["cpus"])
    out.write("  inference only  %8.1f FPS%s\n" % (med["infer"], threads))
    out.write("  end to end      %8.1f FPS  (%.0f%% of inference only; capture, preprocessing, "
              "postprocessing%s)\n" % (med["e2e"], 100 * ratio, " and drawing" if args.save else ""))
    out.write("  per frame beside inference: capture %.2f ms, preprocess %.2f ms, postprocess %.2f ms (wall)\n"
              % (stage["capture_ms"], stage["preprocess_ms"], stage["postprocess_ms"]))
    out.write("  stage          CPU ms/frame\n")
    for name in ("decode", "preprocess", "inference", "postprocess"):
        out.write("  %-14s %12.3f%s\n" % (name, cpu[name], "  (every runtime thread)" if name == "inference" else ""))
    out.write("  %-14s %12.3f  (only while --serve has a stream client)\n" % ("stream encode", encode))
    out.write("  ideal on this host: %.1f FPS, bound by %s\n" % (ideal, bound))
    out.write("  efficiency: end to end %.1f FPS = %.2f of ideal\n" % (med["e2e"], med["e2e"] / ideal))
    if all_rt is not None:
        out.write("  with all %d threads to inference (--threads 0): inference only %.1f FPS, end to end %.1f FPS\n"
                  % (all_rt.threads, med["infer_all"], med["e2e_all"]))
        if med["e2e_all"] > med["e2e"]:
            out.write("  hint: --threads 0 is faster end to end on this device\n")
    if live:
        out.write("  note: a live source delivers at its own frame rate, which bounds end-to-end FPS\n")
    out.write("bench: %s\n" % json.dumps(result))
    out.flush()
    return result
