"""Runner part: the camera loop (capture thread -> preprocess -> asynchronous inference -> postprocess and outputs).

Python 3.6 syntax; numpy, cv2, the standard library and the bundle's runtime only: assembled into each bundle's
single runner.py (edgeport.bundle.RUNNER_PARTS, in order), where every part's names are one module's.
"""
import json
import queue
import signal
import sys
import threading
import time

import cv2

from edgeport.runner.engine import LatencyStats, make_async, max_rss_mb, thread_cpu
from edgeport.runner.manifest import RunnerError
from edgeport.runner.outputs import Outputs
from edgeport.runner.preprocess import preprocess
from edgeport.runner.sources import LatestFrame, SourceLost, _decode_threads, open_source
from edgeport.runner.task import task_part


def run_loop(args, manifest, rt, quiet=False, service=None):
    """Capture (thread) -> preprocess -> infer (async) -> postprocess/draw/save/json, overlapped.

    With ``service`` (--serve), frames are drawn while it has watchers and published to it, and its
    POST /infer images go through the same engine between camera frames.

    Ends at the end of the source, at --max-frames or --duration, on SIGINT/SIGTERM, or when a
    live source is lost (SourceLost, after the summary is printed). Returns the summary dict.
    """
    spec = manifest["preprocess"]
    in_name = manifest["inputs"][0]["name"]
    source = open_source(args.source, args.width, args.height, args.fps, args.reconnect, args.timeout,
                         _decode_threads(args), args.loop, int(args.max_pixels * 1e6))
    try:  # what can fail is made before the capture thread starts: no thread is left running on an error
        out = Outputs(args)
        post = task_part(spec["task"])(manifest, args)
    except BaseException:
        source.release()
        raise
    grabber = LatestFrame(source)
    stop = {"flag": False}

    def on_signal(signum, _frame):
        stop["flag"] = True

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, on_signal)
    done = queue.Queue()

    def on_result(userdata, outs, ms=None):
        if isinstance(userdata, int):
            done.put((userdata, outs, time.time(), ms))
        else:  # a POST /infer job of the service
            userdata.done(outs, ms)

    engine = make_async(rt, on_result, args.requests)
    meta, ready = {}, {}
    lat, e2e = LatencyStats(), LatencyStats()
    state = {"next": 1, "emitted": 0, "pre_s": 0.0, "post_s": 0.0, "pre_cpu": 0.0, "post_cpu": 0.0}
    t0 = time.time()
    submit_lock = service.engine_lock if service is not None else threading.Lock()
    if service is not None:
        service.bind_loop(lat=lat, e2e=e2e, state=state, grabber=grabber, source=source, t0=t0)
        service.attach_engine(engine, in_name, task_part(spec["task"])(manifest, args))
        service.set_ready("source", True, args.source)

    def drain(block):
        while True:
            try:
                seq, outs, t_done, ms = done.get(block and len(meta) > len(ready), 1.0)
            except queue.Empty:
                if block and len(meta) > len(ready):
                    continue
                break
            ready[seq] = (outs, t_done, ms)
        while state["next"] in ready:  # emit in capture order
            seq = state["next"]
            outs, t_done, ms = ready.pop(seq)
            frame, geom, t_cap, t_sub = meta.pop(seq)
            if ms is None:  # the engine did not measure it
                ms = (t_done - t_sub) * 1000.0
            lat.add(ms)
            record = {"frame": seq, "timestamp": round(t_cap, 3), "latency_ms": round(ms, 2)}
            t_post, c_post = time.time(), thread_cpu()
            vis = post(outs, frame, geom, record, out.draw)
            e2e_ms = (time.time() - t_cap) * 1000.0
            e2e.add(e2e_ms)
            record["e2e_ms"] = round(e2e_ms, 2)
            fps_now = state["emitted"] / max(time.time() - t0, 1e-6)
            out.emit(vis, record, fps_now)
            if service is not None and service.wants_frames():  # the service draws it, in a client's thread
                service.publish(vis, record, None if vis is not None else (outs, frame, geom, fps_now))
            state["post_s"] += time.time() - t_post
            state["post_cpu"] += thread_cpu() - c_post
            state["emitted"] += 1
            state["next"] += 1

    error = None
    seq = 0
    try:
        while not stop["flag"] and not out.quit:
            if args.max_frames and seq >= args.max_frames:
                break
            if args.duration and time.time() - t0 >= args.duration:
                break
            if service is not None:
                service.beat()
            frame = grabber.get(max(args.timeout * (args.reconnect + 2) * 4, 10.0))
            if frame is None:
                break
            t_cap, c_pre = time.time(), thread_cpu()
            if args.flip:
                frame = cv2.flip(frame, 1)
            x, geom = preprocess(frame, spec)
            seq += 1
            t_sub = time.time()
            state["pre_s"] += t_sub - t_cap
            state["pre_cpu"] += thread_cpu() - c_pre
            meta[seq] = (frame, geom, t_cap, t_sub)
            with submit_lock:  # the service's POST /infer submits too
                engine.submit({in_name: x}, seq)
            drain(False)
        engine.wait_all()
        drain(True)
    except SourceLost as e:
        error = e
        if service is not None:
            service.set_ready("source", False, "lost: %s" % e)
        engine.wait_all()
        drain(True)
    finally:
        grabber.stop()
        if hasattr(engine, "close"):
            engine.close()
        out.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    elapsed = max(time.time() - t0, 1e-6)
    per_frame = 1000.0 / max(state["emitted"], 1)
    summary = {"source": args.source, "frames": state["emitted"], "seconds": round(elapsed, 3),
               "fps": round(state["emitted"] / elapsed, 2),
               "latency_p50_ms": round(lat.percentile(50), 2), "latency_p99_ms": round(lat.percentile(99), 2),
               "e2e_p50_ms": round(e2e.percentile(50), 2), "e2e_p99_ms": round(e2e.percentile(99), 2),
               "dropped": grabber.dropped, "corrupt": getattr(source, "corrupt", 0),
               "reconnects": getattr(source, "reconnects", 0), "stopped_by_signal": stop["flag"],
               "capture_ms": round(grabber.read_s * per_frame, 3),
               "preprocess_ms": round(state["pre_s"] * per_frame, 3),
               "postprocess_ms": round(state["post_s"] * per_frame, 3),
               "decode_cpu_ms": round(grabber.read_cpu * per_frame, 3),
               "preprocess_cpu_ms": round(state["pre_cpu"] * per_frame, 3),
               "postprocess_cpu_ms": round(state["post_cpu"] * per_frame, 3),
               "inference_threads": getattr(rt, "threads", 0) or None}
    rss = max_rss_mb()
    if rss:
        summary["max_rss_mb"] = rss
    if not quiet:
        sys.stderr.write("summary: %s\n" % json.dumps(summary))
    if error is not None:
        raise error
    if not state["emitted"] and not stop["flag"] and not getattr(source, "truncated", None):
        bad = getattr(source, "corrupt", 0)
        raise RunnerError("%s gave no frame%s" % (args.source, " (%d undecodable: none could be read)" % bad
                                                   if bad else ""))
    truncated = getattr(source, "truncated", None)
    if truncated:
        raise RunnerError(truncated)
    return summary
