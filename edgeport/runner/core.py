"""Runner core shared by every backend: sources, postprocessing, overlay, stats, self-test, CLI.

Python 3.6 syntax; numpy, cv2, the standard library and the bundle's runtime only. It is
assembled with preprocess.py, metrics.py, the scene generator and one backend's runner part
into a bundle's single runner.py (edgeport.bundle.assemble_runner); it reads only
manifest.json. The functions it uses from those files are defined before it there.
"""
import argparse
import json
import math
import os
import queue
import signal
import sys
import threading
import time

import cv2
import numpy as np

from edgeport.runner.manifest import RunnerError, load_manifest, refusal, schema_problem, verify_files
from edgeport.runner.metrics import compare
from edgeport.runner.preprocess import preprocess
from edgeport.runner.task import task_part
from edgeport.zoo.scene import render_scene, render_scene_boxes

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def open_runtime(manifest, bundle_dir, device=None, threads=None):
    """Replaced in runner.py by the bundle's backend part (defined after this file there)."""
    raise RunnerError("this runner has no backend part; rebuild the bundle")


# The open_runtime options the bundle's runtime honours; the backend part redefines it after this file.
RUNTIME_OPTIONS = ("device", "threads")
FFMPEG_PREFIXES = ("rtsp://", "rtsps://", "http://", "https://")
# Options only some tasks read (a task part lists the ones it honours in cli_options), with what they do.
TASK_OPTIONS = (("topk", "it lists the top classes of a classifier"),)


def _decode_threads(args):
    return 1 if args.decode_threads is None else args.decode_threads


def check_options(args, manifest):
    """RunnerError for an option that cannot take effect on this bundle or source (never silently ignored)."""
    backend = manifest.get("backend", "?")
    for option, value in (("device", args.device), ("threads", args.threads)):
        if value is not None and option not in RUNTIME_OPTIONS:
            raise RunnerError("--%s has no effect on a %s bundle (its runtime takes only: %s)"
                              % (option, backend, ", ".join("--" + o for o in RUNTIME_OPTIONS) or "neither"))
    task = manifest["preprocess"].get("task")
    honoured = task_part(task).cli_options
    for option, why in TASK_OPTIONS:
        if getattr(args, option) is not None and option not in honoured:
            raise RunnerError("--%s has no effect on a %s model (%s)" % (option, task, why))
    src = args.source or ""
    if args.decode_threads is not None and not (src.startswith(FFMPEG_PREFIXES) or os.path.isfile(src)):
        raise RunnerError("--decode-threads has no effect on %s (it sets FFmpeg's decoder threads for video files "
                          "and streams)" % src)


# ---------------------------------------------------------------- sources
class SourceLost(RunnerError):
    """A live source stopped delivering and could not be reopened."""


class SyntheticSource(object):
    """The embedded road-scene generator as a camera: synthetic://[seed][?width=&height=&fps=&frames=&objects=1]."""

    live = False

    def __init__(self, uri, width, height, fps):
        rest = uri[len("synthetic://"):]
        seed, _, query = rest.partition("?")
        opts = dict(kv.split("=", 1) for kv in query.split("&") if "=" in kv)
        self.seed = int(seed) if seed.isdigit() else 7
        self.w = width or int(opts.get("width", 640))
        self.h = height or int(opts.get("height", 480))
        self.fps = fps or float(opts.get("fps", 30))
        self.limit = int(opts.get("frames", 0))
        self.objects = opts.get("objects") == "1"  # pedestrians and signs too (what a detector looks for)
        self.i = 0
        self.corrupt = self.reconnects = 0

    def read(self):
        if self.limit and self.i >= self.limit:
            return None
        render = render_scene_boxes if self.objects else render_scene
        frame = render(self.seed, self.h, self.w, t=self.i / float(self.fps))[0]
        self.i += 1
        return frame

    def release(self):
        pass


def _valid(frame):
    return frame is not None and getattr(frame, "ndim", 0) == 3 and frame.shape[2] == 3 and frame.size > 0


class FolderSource(object):
    """A folder of images, in name order; undecodable files are skipped and counted."""

    EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
    live = False

    def __init__(self, path):
        self.files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(self.EXTS))
        if not self.files:
            raise RunnerError("image folder %s holds no images (%s)" % (path, ", ".join(self.EXTS)))
        self.i = 0
        self.corrupt = self.reconnects = 0

    def rewind(self):
        self.i, self.corrupt = 0, 0
        return True

    def read(self):
        while self.i < len(self.files):
            img = cv2.imread(self.files[self.i])
            self.i += 1
            if _valid(img):
                return img
            self.corrupt += 1
        return None

    def release(self):
        pass


def _open_capture(spec, api, timeout_ms, decode_threads=0):
    """cv2.VideoCapture with open/read timeouts and FFmpeg's decoder thread count where this OpenCV
    has them (4.6+ and 4.7+; JetPack 4.6 has 4.1 and gets neither)."""
    params = []
    if api is not None and timeout_ms and hasattr(cv2, "CAP_PROP_OPEN_TIMEOUT_MSEC"):
        params += [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
    if api == getattr(cv2, "CAP_FFMPEG", None) and decode_threads > 0 and hasattr(cv2, "CAP_PROP_N_THREADS"):
        params += [cv2.CAP_PROP_N_THREADS, decode_threads]
    if params:
        try:
            return cv2.VideoCapture(spec, api, params)
        except (TypeError, cv2.error):
            pass
    return cv2.VideoCapture(spec, api) if api is not None else cv2.VideoCapture(spec)


class CaptureSource(object):
    """cv2.VideoCapture on a camera, a video file, a stream or a GStreamer pipeline.

    Live sources (cameras, streams) that stop delivering are reopened with exponential backoff
    (0.5 s doubling to 8 s) up to ``reconnect`` times, then SourceLost ends the run. Video files
    skip undecodable frames (counted as corrupt); a file that ends before the frame count its
    container declares is reported as truncated. ``decode_threads`` is FFmpeg's decoder thread
    count (0: FFmpeg's choice, one per CPU with frame threading, which costs CPU time that
    inference needs and delays each frame of a stream by a frame per thread).
    """

    MAX_BAD_READS = 25

    def __init__(self, spec, api, live, width, height, fps, label=None, reconnect=5, timeout_ms=5000,
                 decode_threads=0):
        self.spec, self.api, self.live = spec, api, live
        self.decode_threads = decode_threads
        self.label = label or str(spec)
        self.size = (width, height, fps)
        self.reconnect, self.timeout_ms = reconnect, timeout_ms
        self.corrupt = self.reconnects = self.read_frames = 0
        self.truncated = None
        self.stopping = False
        self.cap = self._open()
        if self.cap is None:
            raise RunnerError(self._why_not())
        self.declared = 0 if live else int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)

    def _why_not(self):
        spec = self.spec
        if isinstance(spec, int) or str(spec).startswith("/dev/video"):
            dev = spec if not isinstance(spec, int) else "/dev/video%d" % spec
            if isinstance(dev, str) and not os.path.exists(dev):
                found = sorted(d for d in os.listdir("/dev") if d.startswith("video")) if os.path.isdir("/dev") else []
                return "camera %s does not exist (found: %s)" % (dev, ", ".join("/dev/" + d for d in found) or "none")
            return "cannot open camera %s (busy, or no permission: is the user in the 'video' group?)" % dev
        if self.label.startswith(("rtsp://", "http://", "https://")):
            return ("cannot open stream %s within %.0f s (unreachable, refused, or wrong path; check the address "
                    "with ffprobe or VLC)" % (self.label, self.timeout_ms / 1000.0))
        if not self.live:
            return "cannot open video %s (truncated or corrupt file, or no codec for it in this OpenCV)" % self.label
        return "cannot open source %s" % self.label

    def _open(self):
        cap = _open_capture(self.spec, self.api, self.timeout_ms if self.live else 0, self.decode_threads)
        if not cap.isOpened():
            cap.release()
            return None
        width, height, fps = self.size
        if self.live:
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
            if width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            if height:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
            if fps:
                cap.set(cv2.CAP_PROP_FPS, fps)
        return cap

    def read(self):
        bad = 0
        while not self.stopping:
            ok, frame = self.cap.read()
            if ok and _valid(frame):
                self.read_frames += 1
                return frame
            if self.live:
                if ok:  # delivered something that is not an image
                    self.corrupt += 1
                    continue
                self._reopen()
                continue
            # A file: a failed read is the end, a corrupt frame, or a truncation.
            pos = int(self.cap.get(cv2.CAP_PROP_POS_FRAMES) or 0)
            if self.declared and pos < self.declared and bad < self.MAX_BAD_READS:
                bad += 1
                self.corrupt += 1
                self.cap.grab()
                continue
            self.corrupt -= bad  # failed reads that led to the end were not frames
            if self.declared and self.read_frames + self.corrupt < self.declared:
                self.truncated = "video %s ended after %d of the %d frames its header declares: the file is " \
                                 "truncated or corrupt" % (self.label, self.read_frames, self.declared)
            return None
        return None

    def rewind(self):
        """Back to the first frame of a file (False when the container cannot seek: reopen it instead)."""
        if self.live or not self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
            return False
        self.corrupt = self.read_frames = 0
        self.truncated = None
        return int(self.cap.get(cv2.CAP_PROP_POS_FRAMES) or 0) == 0

    def _reopen(self):
        self.cap.release()
        delay = 0.5
        for attempt in range(1, self.reconnect + 1):
            if self.stopping:
                return
            sys.stderr.write("warning: %s stopped delivering frames; reopening (attempt %d/%d in %.1f s)\n"
                             % (self.label, attempt, self.reconnect, delay))
            time.sleep(delay)
            cap = self._open()
            if cap is not None:
                self.cap = cap
                self.reconnects += 1
                return
            delay = min(delay * 2, 8.0)
        raise SourceLost("%s was lost and could not be reopened after %d attempts" % (self.label, self.reconnect))

    def release(self):
        self.stopping = True
        self.cap.release()


def csi_pipeline(sensor, width, height, fps, flip=0):
    """nvarguscamerasrc pipeline for a Jetson CSI camera (raw Bayer on /dev/video0 is useless)."""
    return ("nvarguscamerasrc sensor-id=%d ! video/x-raw(memory:NVMM),width=1920,height=1080,framerate=%d/1 ! "
            "nvvidconv flip-method=%d ! video/x-raw,width=%d,height=%d,format=BGRx ! videoconvert ! "
            "video/x-raw,format=BGR ! appsink drop=1 max-buffers=1" % (sensor, int(fps or 30), flip,
                                                                        width or 1280, height or 720))


def has_gstreamer():
    info = cv2.getBuildInformation()
    for line in info.splitlines():
        if "GStreamer" in line:
            return "YES" in line
    return False


class LoopSource(object):
    """A video file or image folder replayed from the start whenever it ends (--loop: demos, soak tests).

    A pass that delivered no frame, or a truncated file, ends the run instead of looping forever.
    """

    live = False

    def __init__(self, opener):
        self.opener = opener
        self.inner = opener()
        self.got, self.corrupt_before = 0, 0

    @property
    def corrupt(self):
        return self.corrupt_before + getattr(self.inner, "corrupt", 0)

    @property
    def truncated(self):
        return getattr(self.inner, "truncated", None)

    def read(self):
        frame = self.inner.read()
        if frame is None and self.got and not self.truncated and not getattr(self.inner, "stopping", False):
            self.corrupt_before += getattr(self.inner, "corrupt", 0)
            # Rewinding keeps the decoder: reopening it every pass churns FFmpeg's allocations.
            if not (hasattr(self.inner, "rewind") and self.inner.rewind()):
                self.inner.release()
                self.inner = self.opener()
            self.got = 0
            frame = self.inner.read()
        if frame is not None:
            self.got += 1
        return frame

    def release(self):
        self.inner.release()


def open_source(uri, width=0, height=0, fps=0, reconnect=5, timeout=5.0, decode_threads=1, loop=False):
    """Open a frame source from its URI (see --help); ``decode_threads`` applies to FFmpeg sources, ``loop``
    replays a video file or an image folder endlessly."""
    if loop:
        if not (os.path.isfile(uri) or os.path.isdir(uri)):
            raise RunnerError("--loop replays a video file or an image folder; %s is neither" % uri)
        return LoopSource(lambda: open_source(uri, width, height, fps, reconnect, timeout, decode_threads))
    ms = int(timeout * 1000)
    if uri.startswith("synthetic://"):
        return SyntheticSource(uri, width, height, fps)
    if uri.startswith("csi://"):
        if not has_gstreamer():
            raise RunnerError("csi:// needs OpenCV built with GStreamer (JetPack's python3-opencv); this OpenCV "
                              "has none. Do not pip-install opencv on a Jetson")
        rest = uri[len("csi://"):]
        if rest and not rest.isdigit():
            raise RunnerError("csi:// takes a sensor number, e.g. csi://0")
        return CaptureSource(csi_pipeline(int(rest or 0), width, height, fps), cv2.CAP_GSTREAMER, True, 0, 0, 0,
                             label=uri, reconnect=reconnect, timeout_ms=ms)
    linux = sys.platform.startswith("linux")
    if uri.isdigit():
        return CaptureSource(int(uri), cv2.CAP_V4L2 if linux else None, True, width, height, fps,
                             label="camera %s" % uri, reconnect=reconnect, timeout_ms=ms)
    if uri.startswith("v4l2://") or uri.startswith("/dev/video"):
        dev = uri[len("v4l2://"):] if uri.startswith("v4l2://") else uri
        if dev.isdigit():
            dev = "/dev/video" + dev
        return CaptureSource(dev, cv2.CAP_V4L2 if linux else None, True, width, height, fps, label=dev,
                             reconnect=reconnect, timeout_ms=ms)
    if uri.startswith(("rtsp://", "rtsps://", "http://", "https://")):
        # Low latency: TCP transport, no input buffering in FFmpeg, a one-frame buffer in OpenCV.
        os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp|fflags;nobuffer|flags;low_delay")
        return CaptureSource(uri, cv2.CAP_FFMPEG, True, 0, 0, 0, label=uri, reconnect=reconnect, timeout_ms=ms,
                             decode_threads=decode_threads)
    if os.path.isdir(uri):
        return FolderSource(uri)
    if os.path.isfile(uri):
        return CaptureSource(uri, cv2.CAP_FFMPEG, False, 0, 0, 0, label=uri, decode_threads=decode_threads)
    raise RunnerError("source %s does not exist (camera index, /dev/videoN, v4l2://N, csi://N, rtsp://, http(s)://, "
                      "a video file, an image folder or synthetic://)" % uri)


class LatestFrame(object):
    """Capture thread that always hands over the newest frame; older ones are dropped and counted.

    For files, folders and synthetic:// nothing is dropped: the reader waits for the consumer.
    An error in the reader (a lost camera) is re-raised by get().
    """

    def __init__(self, source):
        self.source = source
        self.live = bool(getattr(source, "live", False))
        self.cond = threading.Condition()
        self.frame, self.seq, self.ended, self.error = None, 0, False, None
        self.dropped = 0
        self.read_s = 0.0  # time inside source.read(): decoding, or waiting for a camera
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            t = time.time()
            try:
                frame = self.source.read()
            except Exception as e:  # handed to the consumer
                frame, self.error = None, e
            self.read_s += time.time() - t
            with self.cond:
                if frame is None:
                    self.ended = True
                    self.cond.notify_all()
                    return
                if not self.live:
                    while self.frame is not None and not self.ended:
                        self.cond.wait(0.05)
                elif self.frame is not None:
                    self.dropped += 1
                self.frame = frame
                self.seq += 1
                self.cond.notify_all()
                if self.ended:
                    return

    def get(self, timeout=10.0):
        """The newest frame; None at the end of the source. Raises what the reader raised."""
        with self.cond:
            deadline = time.time() + timeout
            while self.frame is None and not self.ended:
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise RunnerError("no frame from the source for %.0f s" % timeout)
                self.cond.wait(remaining)
            frame, self.frame = self.frame, None
            self.cond.notify_all()
            if frame is None and self.error is not None:
                raise self.error
            return frame

    def stop(self):
        with self.cond:
            self.ended = True
            self.cond.notify_all()
        if hasattr(self.source, "stopping"):
            self.source.stopping = True
        self.thread.join(timeout=2)
        self.source.release()


# ---------------------------------------------------------------- asynchronous inference
class ThreadedAsync(object):
    """submit()/wait_all() over a synchronous runtime: one worker thread, a bounded queue.

    The default for runtimes without their own asynchronous API (TFLite, TensorRT here). Results
    reach ``callback(userdata, outputs[, latency_ms])`` from the worker, in submission order.
    A runtime with asynchronous requests subclasses it (OpenVINO's part): _start() launches
    one and returns the queue item, _finish() waits for it and returns the callback's
    arguments, _release() frees what _start() took.
    """

    def __init__(self, rt, callback, jobs=2):
        self.rt, self.callback = rt, callback
        self.q = queue.Queue(maxsize=max(1, jobs))
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _start(self, feeds, userdata):
        return feeds, userdata

    def _finish(self, item):
        feeds, userdata = item
        return userdata, self.rt.infer(feeds)

    def _release(self, item):
        pass

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                self.q.task_done()
                return
            try:
                self.callback(*self._finish(item))
            except Exception as e:  # raised in the caller's thread by the next submit or wait_all
                self.error = e
            self._release(item)
            self.q.task_done()

    def submit(self, feeds, userdata):
        if self.error is not None:
            raise self.error
        self.q.put(self._start(feeds, userdata))

    def wait_all(self):
        self.q.join()
        if self.error is not None:
            raise self.error

    def close(self):
        self.q.put(None)
        self.thread.join(timeout=2)


def make_async(rt, callback, jobs):
    """The runtime's own asynchronous engine when it has one, else a worker thread."""
    if hasattr(rt, "make_async"):
        return rt.make_async(callback, jobs)
    return ThreadedAsync(rt, callback, jobs)


# ---------------------------------------------------------------- running
def max_rss_mb():
    """The process's peak resident memory in MB (0 where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0), 1)


class LatencyStats(object):
    """Count, mean, min, max and percentiles of millisecond figures in fixed memory.

    A runner is a service that runs for days: keeping every latency (0.06 MB per 1,000 frames for
    two lists) grows without bound. Values go into log-spaced bins 1 % apart from 1 us to 1000 s
    (2,100 counters); a percentile is read back to within 0.5 % of the exact one, the extremes
    exactly.
    """

    LOW, RATIO, BINS = 1e-3, 1.01, 2100

    def __init__(self):
        self.counts = np.zeros(self.BINS, np.int64)
        self.count, self.total = 0, 0.0
        self.min, self.max = float("inf"), 0.0
        self._log_ratio = math.log(self.RATIO)

    def add(self, ms):
        ms = float(ms)
        i = int(math.log(max(ms, self.LOW) / self.LOW) / self._log_ratio)  # math, not numpy: per frame
        self.counts[min(max(i, 0), self.BINS - 1)] += 1
        self.count += 1
        self.total += ms
        self.min = min(self.min, ms)
        self.max = max(self.max, ms)

    def percentile(self, q):
        if not self.count:
            return 0.0
        if q <= 0:
            return self.min
        if q >= 100:
            return self.max
        rank = q / 100.0 * self.count
        i = int(np.searchsorted(np.cumsum(self.counts), rank, side="left"))
        mid = self.LOW * self.RATIO ** (i + 0.5)  # geometric middle of the bin
        return min(max(mid, self.min), self.max)

    @property
    def mean(self):
        return self.total / self.count if self.count else 0.0


def selftest(bundle_dir, manifest, runtime_factory, out=sys.stdout):
    """Check hashes, the preprocessing and the golden outputs; print a table; True when all pass.

    The golden outputs are the PyTorch reference's, checked under the precision's tolerance; where the
    build host ran this very runtime its outputs are checked too, under a tight tolerance, so an
    artifact that diverged on the way (or on this device) cannot pass by agreeing with itself.
    """
    rows = []
    bad = verify_files(bundle_dir, manifest)
    rows.append(("files sha256", not bad, "%d files" % len(manifest["files"]) if not bad else
                 "; ".join("%s: %s" % b for b in bad)))
    if bad:
        _print_table(rows, out)
        return False
    spec = manifest["preprocess"]
    golden = manifest["golden"]
    part = task_part(spec["task"])(manifest, None)
    pairs = {}  # "vs pytorch" / "vs build host": (tolerance, [(reference outputs, this runtime's)] per case)
    rt = runtime_factory()
    lsb = max(abs(float(spec["scale"]) / float(s)) for s in spec["std"]) * 1.01
    for case in golden["cases"]:
        x = np.load(os.path.join(bundle_dir, case["input"]))
        if case.get("frame"):
            frame = cv2.imread(os.path.join(bundle_dir, case["frame"]))
            mine, _ = preprocess(frame, spec)
            err = float(np.abs(mine - x).max())
            # One grey level of resize rounding between OpenCV builds is tolerated.
            rows.append(("preprocess %s" % case["frame"], err <= lsb, "max abs %.2g (limit %.2g)" % (err, lsb)))
        outs = rt.infer({manifest["inputs"][0]["name"]: x})
        stem = os.path.basename(case["input"])
        for what, key, tolerance in (("vs pytorch", "outputs", golden["tolerance"]),
                                     ("vs build host", "host_outputs", golden.get("host_tolerance"))):
            refs = dict((name, np.load(os.path.join(bundle_dir, rel))) for name, rel in (case.get(key) or {}).items())
            if refs:
                pairs.setdefault(what, (tolerance, []))[1].append((refs, outs))
            for name in sorted(refs):
                m = compare(refs[name], outs[name], spec["task"], tolerance[name])
                detail = "max_rel %.2e cos %.6f" % (m.get("max_rel", -1), m.get("cosine", -1))
                if "agreement" in m:
                    detail += " agree %.4f" % m["agreement"]
                if m["failed"]:
                    detail += " FAILED: " + ", ".join(m["failed"])
                rows.append(("%s %s %s" % (stem, name, what), m["ok"], detail))
    for what in sorted(pairs):
        rows += part.selftest_rows(what, pairs[what][1], pairs[what][0])
    _print_table(rows, out)
    return all(ok for _, ok, _ in rows)


def _print_table(rows, out):
    width = max(len(r[0]) for r in rows)
    for name, ok, detail in rows:
        out.write("%-*s  %s  %s\n" % (width, name, "PASS" if ok else "FAIL", detail))
    out.write("selftest: %s\n" % ("PASS" if all(r[1] for r in rows) else "FAIL"))
    out.flush()


class Outputs(object):
    """Window, video file and JSON lines; all optional."""

    def __init__(self, args):
        self.args = args
        self.show = not args.headless and bool(os.environ.get("DISPLAY") or sys.platform in ("win32", "darwin"))
        self.writer = None
        self.jsonf = sys.stdout if args.jsonl == "-" else (open(args.jsonl, "w") if args.jsonl else None)
        self.quit = False

    @property
    def draw(self):
        return self.show or bool(self.args.save)

    def emit(self, vis, record, fps_now):
        if vis is not None:
            cv2.putText(vis, "%.1f FPS  %.1f ms" % (fps_now, record["latency_ms"]), (8, vis.shape[0] - 8),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 255, 255), 1)
            if self.args.save:
                if self.writer is None:
                    ext = os.path.splitext(self.args.save)[1].lower()
                    fourcc = cv2.VideoWriter_fourcc(*("mp4v" if ext in (".mp4", ".m4v", ".mov") else "MJPG"))
                    self.writer = cv2.VideoWriter(self.args.save, fourcc, self.args.fps or 30.0,
                                                  (vis.shape[1], vis.shape[0]))
                    if not self.writer.isOpened():
                        raise RunnerError("cannot write video %s (no encoder for it in this OpenCV; try .avi)"
                                          % self.args.save)
                self.writer.write(vis)
            if self.show:
                cv2.imshow("edgeport", vis)
                if cv2.waitKey(1) & 0xFF in (27, ord("q")):
                    self.quit = True
        if self.jsonf:
            self.jsonf.write(json.dumps(record) + "\n")
            self.jsonf.flush()

    def close(self):
        if self.writer is not None:
            self.writer.release()
        if self.jsonf and self.jsonf is not sys.stdout:
            self.jsonf.close()
        if self.show:
            cv2.destroyAllWindows()


def run_loop(args, manifest, rt, quiet=False):
    """Capture (thread) -> preprocess -> infer (async) -> postprocess/draw/save/json, overlapped.

    Ends at the end of the source, at --max-frames or --duration, on SIGINT/SIGTERM, or when a
    live source is lost (SourceLost, after the summary is printed). Returns the summary dict.
    """
    spec = manifest["preprocess"]
    in_name = manifest["inputs"][0]["name"]
    source = open_source(args.source, args.width, args.height, args.fps, args.reconnect, args.timeout,
                         _decode_threads(args), args.loop)
    grabber = LatestFrame(source)
    stop = {"flag": False}

    def on_signal(signum, _frame):
        stop["flag"] = True

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, on_signal)
    out = Outputs(args)
    post = task_part(spec["task"])(manifest, args)
    done = queue.Queue()
    engine = make_async(rt, lambda userdata, outs, ms=None: done.put((userdata, outs, time.time(), ms)), args.requests)
    meta, ready = {}, {}
    lat, e2e = LatencyStats(), LatencyStats()
    state = {"next": 1, "emitted": 0, "pre_s": 0.0, "post_s": 0.0}
    t0 = time.time()

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
            t_post = time.time()
            vis = post(outs, frame, geom, record, out.draw)
            e2e_ms = (time.time() - t_cap) * 1000.0
            e2e.add(e2e_ms)
            record["e2e_ms"] = round(e2e_ms, 2)
            fps_now = state["emitted"] / max(time.time() - t0, 1e-6)
            out.emit(vis, record, fps_now)
            state["post_s"] += time.time() - t_post
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
            frame = grabber.get(max(args.timeout * (args.reconnect + 2) * 4, 10.0))
            if frame is None:
                break
            t_cap = time.time()
            if args.flip:
                frame = cv2.flip(frame, 1)
            x, geom = preprocess(frame, spec)
            seq += 1
            t_sub = time.time()
            state["pre_s"] += t_sub - t_cap
            meta[seq] = (frame, geom, t_cap, t_sub)
            engine.submit({in_name: x}, seq)
            drain(False)
        engine.wait_all()
        drain(True)
    except SourceLost as e:
        error = e
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


def inference_only_fps(rt, in_name, inputs, count, jobs):
    """FPS of the runtime alone: ``count`` submissions of the preprocessed ``inputs`` (cycled)
    through the same asynchronous engine and output copy the camera loop uses."""
    engine = make_async(rt, lambda userdata, outs, ms=None: None, jobs)
    try:
        for x in inputs[:10]:  # warm-up
            engine.submit({in_name: x}, -1)
        engine.wait_all()
        t = time.time()
        for i in range(count):
            engine.submit({in_name: inputs[i % len(inputs)]}, i)
        engine.wait_all()
        return count / max(time.time() - t, 1e-6)
    finally:
        if hasattr(engine, "close"):
            engine.close()


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
                         _decode_threads(args))
    inputs, count = [], 0
    try:
        while count < n:
            frame = source.read()
            if frame is None:
                break
            if len(inputs) < BENCH_DISTINCT:
                inputs.append(preprocess(frame, spec)[0])
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
    stages = []
    for r in range(rounds):
        figures["infer"].append(inference_only_fps(rt, in_name, inputs, count, args.requests))
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
                 for k in ("e2e_p50_ms", "capture_ms", "preprocess_ms", "postprocess_ms"))
    result = {"frames": count, "rounds": rounds, "requests": args.requests, "runtime": getattr(rt, "name", ""),
              "inference_threads": getattr(rt, "threads", 0) or None, "cpus": available_cpus(),
              "inference_only_fps": round(med["infer"], 1), "end_to_end_fps": round(med["e2e"], 1),
              "ratio": round(ratio, 3), "live_source": live}
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
    out.write("  per frame beside inference: capture %.2f ms, preprocess %.2f ms, postprocess %.2f ms\n"
              % (stage["capture_ms"], stage["preprocess_ms"], stage["postprocess_ms"]))
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


class Parser(argparse.ArgumentParser):
    """argparse with one error line (no usage block) and exit status 2; no abbreviated options (a typo such as
    --headles would otherwise run as --headless)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super(Parser, self).__init__(*args, **kwargs)

    def error(self, message):
        sys.stderr.write("error: %s (see python runner.py --help)\n" % message)
        sys.exit(EXIT_USAGE)


def at_least(minimum):
    """An argparse type: an int of at least ``minimum``."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a whole number" % text) from None
        if value < minimum:
            raise argparse.ArgumentTypeError("%d is below %d" % (value, minimum))
        return value
    return parse


def seconds(text):
    """An argparse type: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number of seconds" % text) from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError("%s is not 0 or more" % text)
    return value


def build_parser(manifest):
    cam = manifest.get("camera") or {}
    p = Parser(
        description="edgeport camera runner for %s (%s, %s)" % (manifest["model"]["name"], manifest["target"],
                                                                manifest["precision"]),
        epilog="examples:\n  python runner.py --selftest\n  python runner.py synthetic:// --headless "
               "--max-frames 100 --jsonl -\n  python runner.py video.mp4 --save out.mp4 --headless\n"
               "  python runner.py video.mp4 --bench --max-frames 500",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", default=cam.get("source", "0"),
                   help="0 | /dev/videoN | v4l2://N | csi://N | rtsp://... | http(s)://... | video file | "
                        "image folder | synthetic:// (default: %(default)s)")
    p.add_argument("--selftest", action="store_true", help="verify hashes and golden outputs, then exit")
    p.add_argument("--bench", action="store_true", help="end-to-end FPS on the source next to inference-only FPS "
                                                        "on the same frames (--max-frames, default 300)")
    p.add_argument("--headless", action="store_true", help="no window")
    p.add_argument("--save", help="write the annotated video here (.mp4 or .avi)")
    p.add_argument("--jsonl", metavar="FILE", help="write one JSON line per frame to this file ('-' for stdout)")
    p.add_argument("--max-frames", type=at_least(0), default=0, help="stop after N frames (default 0: no limit)")
    p.add_argument("--duration", type=seconds, default=0, help="stop after this many seconds (default 0: no limit)")
    p.add_argument("--loop", action="store_true", help="replay a video file or image folder endlessly")
    p.add_argument("--width", type=at_least(0), default=cam.get("width", 0))
    p.add_argument("--height", type=at_least(0), default=cam.get("height", 0))
    p.add_argument("--fps", type=seconds, default=cam.get("fps", 0), help="camera frame rate to ask for")
    p.add_argument("--flip", action="store_true", help="mirror frames horizontally")
    p.add_argument("--topk", type=at_least(1), help="classes listed per frame (classification; default 5)")
    p.add_argument("--threads", type=at_least(0), default=None,
                   help="CPU inference threads (default: the runtime's choice, but one CPU is left to capture "
                        "and drawing; 0: the runtime's choice)")
    p.add_argument("--decode-threads", type=at_least(0),
                   help="FFmpeg decoder threads for video files and streams (default 1: frame threading costs "
                        "CPU that inference needs and delays streams; 0: FFmpeg's choice)")
    p.add_argument("--bench-rounds", type=at_least(1), default=3,
                   help="--bench rounds; medians are reported (default 3)")
    p.add_argument("--requests", type=at_least(1),
                   default=int((manifest.get("runtime") or {}).get("async_requests", 2)),
                   help="inference requests in flight (default %(default)s)")
    p.add_argument("--reconnect", type=at_least(0), default=5,
                   help="reopen attempts for a lost live source (default 5)")
    p.add_argument("--timeout", type=seconds, default=5.0, help="seconds to open a stream or camera (default 5)")
    p.add_argument("--device", help="override the runtime device from the manifest (e.g. CPU)")
    p.add_argument("--force", action="store_true", help="use a bundle whose build failed its gates (debugging "
                                                        "only: it did not compute what the model computes)")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    return p


def main(argv=None, bundle_dir=None):
    bundle_dir = bundle_dir or os.path.dirname(os.path.abspath(__file__))
    verbose = "-v" in (argv or sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:])
    if not verbose and hasattr(cv2, "utils") and hasattr(cv2.utils, "logging"):
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # our own message says it once
    try:
        manifest = load_manifest(bundle_dir)
        problem = schema_problem(manifest)  # before anything reads the manifest's keys
        if problem:
            raise RunnerError(problem)
        args = build_parser(manifest).parse_args(argv)
        refused = refusal(manifest, args.force)
        if refused:
            raise RunnerError(refused)
        check_options(args, manifest)
        bad = verify_files(bundle_dir, manifest)
        if args.selftest:
            ok = selftest(bundle_dir, manifest, lambda: open_runtime(manifest, bundle_dir, args.device))
            return EXIT_OK if ok else EXIT_FAIL
        if bad:
            raise RunnerError("bundle files fail their sha256 check (%s); rebuild or re-copy the bundle"
                              % "; ".join("%s: %s" % b for b in bad))
        threads = leave_one_cpu() if args.threads is None else (args.threads or None)
        rt = open_runtime(manifest, bundle_dir, args.device, threads)
        if args.bench:
            bench(args, manifest, rt, open_all=lambda: open_runtime(manifest, bundle_dir, args.device, None))
        else:
            run_loop(args, manifest, rt)
        return EXIT_OK
    except RunnerError as e:
        sys.stderr.write("error: %s\n" % e)
        return EXIT_USAGE
    except Exception as e:  # one line for the user, the traceback with -v
        if verbose:
            raise
        sys.stderr.write("error: %s: %s (run with -v for the traceback)\n" % (type(e).__name__, e))
        return EXIT_FAIL
