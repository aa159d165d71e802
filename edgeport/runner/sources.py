"""Runner part: frame sources (camera, CSI, stream, file, folder, synthetic) and the capture thread that always
hands over the newest frame.

Python 3.6 syntax; numpy, cv2, the standard library and the bundle's runtime only: assembled into each bundle's
single runner.py (edgeport.bundle.RUNNER_PARTS, in order), where every part's names are one module's.
"""
import os
import sys
import threading
import time

import cv2

from edgeport.runner.engine import thread_cpu
from edgeport.runner.images import DEFAULT_MAX_PIXELS, ImageTooLarge, megapixels, read_image
from edgeport.runner.manifest import RunnerError
from edgeport.zoo.scene import render_scene, render_scene_boxes

FFMPEG_PREFIXES = ("rtsp://", "rtsps://", "http://", "https://")


def _decode_threads(args):
    return 1 if args.decode_threads is None else args.decode_threads



class SourceLost(RunnerError):
    """A live source stopped delivering and could not be reopened."""


class SyntheticSource(object):
    """The embedded road-scene generator as a camera: synthetic://[seed][?width=&height=&fps=&frames=&objects=1]."""

    live = False

    KEYS = ("width", "height", "fps", "frames", "objects")

    def __init__(self, uri, width, height, fps, max_pixels=DEFAULT_MAX_PIXELS):
        rest = uri[len("synthetic://"):]
        seed, _, query = rest.partition("?")
        opts = {}
        for kv in query.split("&") if query else []:
            key, eq, value = kv.partition("=")
            if key not in self.KEYS or not eq:
                raise RunnerError("%s: %r is not a parameter of synthetic:// (it takes %s, e.g. "
                                  "synthetic://?width=320&height=240)" % (uri, kv, ", ".join(self.KEYS)))
            opts[key] = value
        if seed and not seed.isdigit():
            raise RunnerError("%s: the seed %r is not a whole number (synthetic://SEED?...)" % (uri, seed))
        self.seed = int(seed) if seed else 7
        # The URI's own parameters win over --width/--height/--fps and the bundle's camera defaults.
        self.w = self._number(uri, opts, "width", int, width or 640, 16)
        self.h = self._number(uri, opts, "height", int, height or 480, 16)
        self.fps = self._number(uri, opts, "fps", float, fps or 30, 0.001)
        self.limit = self._number(uri, opts, "frames", int, 0, 0)
        if opts.get("objects", "0") not in ("0", "1"):
            raise RunnerError("%s: objects=%s: give 0 or 1" % (uri, opts["objects"]))
        self.objects = opts.get("objects") == "1"  # pedestrians and signs too (what a detector looks for)
        if max_pixels and self.w * self.h > max_pixels:
            raise RunnerError("%s: %dx%d (%s) is over the limit of %s (--max-pixels)"
                              % (uri, self.w, self.h, megapixels(self.w * self.h), megapixels(max_pixels)))
        self.i = 0
        self.corrupt = self.reconnects = 0

    @staticmethod
    def _number(uri, opts, key, kind, default, minimum):
        if key not in opts:
            return default
        try:
            value = kind(opts[key])
        except ValueError:
            value = None
        if value is None or not value >= minimum or value != value or value == float("inf"):
            raise RunnerError("%s: %s=%s: give a %s of at least %g" % (
                uri, key, opts[key], "whole number" if kind is int else "number", minimum))
        return value

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

    def __init__(self, path, max_pixels=DEFAULT_MAX_PIXELS):
        self.files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(self.EXTS))
        if not self.files:
            raise RunnerError("image folder %s holds no images (%s)" % (path, ", ".join(self.EXTS)))
        self.max_pixels = max_pixels
        self.i = 0
        self.corrupt = self.reconnects = 0

    def rewind(self):
        self.i, self.corrupt = 0, 0
        return True

    def read(self):
        while self.i < len(self.files):
            path = self.files[self.i]
            self.i += 1
            try:
                img = read_image(path, self.max_pixels, what=path)
            except ImageTooLarge as e:
                sys.stderr.write("warning: skipped %s (--max-pixels)\n" % e)
                img = None
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
                 decode_threads=0, max_pixels=DEFAULT_MAX_PIXELS):
        self.spec, self.api, self.live = spec, api, live
        self.max_pixels = max_pixels
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
        w, h = int(self.cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0), int(self.cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
        if max_pixels and w * h > max_pixels:
            self.cap.release()
            raise RunnerError("%s delivers %dx%d frames (%s), over the limit of %s (--max-pixels); ask for a "
                              "smaller size (--width/--height) or raise --max-pixels"
                              % (self.label, w, h, megapixels(w * h), megapixels(max_pixels)))
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


def open_source(uri, width=0, height=0, fps=0, reconnect=5, timeout=5.0, decode_threads=1, loop=False,
                max_pixels=DEFAULT_MAX_PIXELS):
    """Open a frame source from its URI (see --help); ``decode_threads`` applies to FFmpeg sources, ``loop``
    replays a video file or an image folder endlessly; no source hands over frames of more than ``max_pixels``."""
    if loop:
        if not (os.path.isfile(uri) or os.path.isdir(uri)):
            raise RunnerError("--loop replays a video file or an image folder; %s is neither" % uri)
        return LoopSource(lambda: open_source(uri, width, height, fps, reconnect, timeout, decode_threads,
                                              max_pixels=max_pixels))
    ms = int(timeout * 1000)
    if uri.startswith("synthetic://"):
        return SyntheticSource(uri, width, height, fps, max_pixels)
    if uri.startswith("csi://"):
        if not has_gstreamer():
            raise RunnerError("csi:// needs OpenCV built with GStreamer (JetPack's python3-opencv); this OpenCV "
                              "has none. Do not pip-install opencv on a Jetson")
        rest = uri[len("csi://"):]
        if rest and not rest.isdigit():
            raise RunnerError("csi:// takes a sensor number, e.g. csi://0")
        return CaptureSource(csi_pipeline(int(rest or 0), width, height, fps), cv2.CAP_GSTREAMER, True, 0, 0, 0,
                             label=uri, reconnect=reconnect, timeout_ms=ms, max_pixels=max_pixels)
    linux = sys.platform.startswith("linux")
    if uri.isdigit():
        return CaptureSource(int(uri), cv2.CAP_V4L2 if linux else None, True, width, height, fps,
                             label="camera %s" % uri, reconnect=reconnect, timeout_ms=ms, max_pixels=max_pixels)
    if uri.startswith("v4l2://") or uri.startswith("/dev/video"):
        dev = uri[len("v4l2://"):] if uri.startswith("v4l2://") else uri
        if dev.isdigit():
            dev = "/dev/video" + dev
        return CaptureSource(dev, cv2.CAP_V4L2 if linux else None, True, width, height, fps, label=dev,
                             reconnect=reconnect, timeout_ms=ms, max_pixels=max_pixels)
    if uri.startswith(("rtsp://", "rtsps://", "http://", "https://")):
        # Low latency: TCP transport, no input buffering in FFmpeg, a one-frame buffer in OpenCV.
        os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp|fflags;nobuffer|flags;low_delay")
        return CaptureSource(uri, cv2.CAP_FFMPEG, True, 0, 0, 0, label=uri, reconnect=reconnect, timeout_ms=ms,
                             decode_threads=decode_threads, max_pixels=max_pixels)
    if os.path.isdir(uri):
        return FolderSource(uri, max_pixels)
    if os.path.isfile(uri):
        return CaptureSource(uri, cv2.CAP_FFMPEG, False, 0, 0, 0, label=uri, decode_threads=decode_threads,
                             max_pixels=max_pixels)
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
        self.read_cpu = 0.0  # CPU time of the same: what decoding costs
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            t, c = time.time(), thread_cpu()
            try:
                frame = self.source.read()
            except Exception as e:  # handed to the consumer
                frame, self.error = None, e
            self.read_s += time.time() - t
            self.read_cpu += thread_cpu() - c
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
