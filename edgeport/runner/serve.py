"""Runner part: the runner as a small HTTP service (``--serve [HOST:]PORT``).

Endpoints: ``/`` (a page with the live annotated stream and the legend), ``/stream.mjpg``,
``/snapshot.jpg``, ``/healthz`` (the main loop's heartbeat age), ``/readyz`` (engine loaded, selftest
passed, source open), ``/metrics`` (Prometheus text), ``POST /infer`` (an uploaded JPEG/PNG -> the
same JSON record as a ``--jsonl`` line) and, for detection bundles, DeepStack's
``POST /v1/vision/detection``. Every client gets the newest frame at its own pace: a slow one misses
frames, the camera loop never waits for it; the JPEG of a frame is encoded once, by the first client
that wants it, and only while somebody watches.

Safe by default: it binds 127.0.0.1 unless a host is given, and beyond loopback only with a token (or an explicit
``--no-token``); at most ``max_clients`` requests at once, the probes aside (503 beyond); uploads up to ``max_body``
bytes and ``max_pixels`` pixels, the pixels read from the image's header before it is decoded (413 beyond either);
a bad image is 400 with a message; with a token (``--token`` or EDGEPORT_TOKEN) every
endpoint but the health probes needs ``Authorization: Bearer TOKEN`` (401 without), and a browser opens
``/?token=TOKEN`` once, which sets a cookie. A handler's error is answered 500 and logged; it never
reaches the camera loop.

Python 3.6 syntax; numpy, cv2, the standard library and the bundle's runtime only: assembled into each bundle's
single runner.py (edgeport.bundle.RUNNER_PARTS, in order), where every part's names are one module's.
"""
import html
import os
import re
import socket
import subprocess
import sys
import threading
import time

import cv2
import numpy as np

from edgeport.runner.engine import LatencyStats, make_async, resident_bytes
from edgeport.runner.http import INFER_TIMEOUT, PAGE, Handler, Server
from edgeport.runner.images import DEFAULT_MAX_PIXELS
from edgeport.runner.manifest import RunnerError
from edgeport.runner.outputs import draw_overlay
from edgeport.runner.preprocess import preprocess
from edgeport.runner.task import task_part

TOKEN_ENV = "EDGEPORT_TOKEN"
SERVE_MAX_CLIENTS = 8
SERVE_MAX_BODY = 10 * 1024 * 1024
SWITCH_INTERVAL = 0.0005  # seconds (Python's default is 0.005)
STREAM_FPS = 15.0  # the live view's rate: enough to watch, cheap beside a fast camera loop


def parse_bind(text):
    """(host, port) of ``[HOST:]PORT``; the host defaults to 127.0.0.1. ValueError with what is wrong."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError("%r: expected [HOST:]PORT with a port from 0 (any free one) to 65535, e.g. 8080 or "
                         "0.0.0.0:8080" % text)
    return host, int(port)


def is_loopback(host):
    return host in ("localhost", "::1") or host.startswith("127.")


class InferJob(object):
    """One /infer request travelling through the camera loop's engine (its callback tells the two apart)."""

    def __init__(self):
        self.event = threading.Event()
        self.outs, self.ms = None, None

    def done(self, outs, ms=None):
        self.outs = dict((k, np.array(v, copy=True)) for k, v in outs.items())
        self.ms = ms
        self.event.set()




def tegrastats_figures(line):
    """{metric: value} from one tegrastats line: GPU load (GR3D_FREQ, percent) and input power in watts
    (VDD_IN on Orin/Xavier, POM_5V_IN on Nano/TX2); what the line lacks is left out."""
    out = {}
    m = re.search(r"GR3D_FREQ (\d+)%", line)
    if m:
        out["gpu_load_percent"] = float(m.group(1))
    m = re.search(r"(?:VDD_IN|POM_5V_IN) (\d+)(?:mW)?/", line)
    if m:
        out["power_watts"] = float(m.group(1)) / 1000.0
    return out


class Tegrastats(object):
    """The newest tegrastats figures, read by a thread from ``tegrastats --interval 1000`` on a Jetson."""

    def __init__(self, command=("tegrastats", "--interval", "1000")):
        self.figures, self.proc = {}, None
        try:
            self.proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         universal_newlines=True)
        except OSError:  # not a Jetson
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.figures = tegrastats_figures(line)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()




class Service(object):
    """What the camera loop publishes and the HTTP handlers read; one per runner."""

    def __init__(self, manifest, args, host, port, token=None, max_clients=SERVE_MAX_CLIENTS,
                 max_body=SERVE_MAX_BODY, stream_fps=STREAM_FPS, err=sys.stderr, max_pixels=DEFAULT_MAX_PIXELS):
        self.manifest, self.args, self.host, self.port = manifest, args, host, port
        self.token = token or None
        self.max_clients, self.max_body, self.err = max_clients, max_body, err
        self.max_pixels = max_pixels
        self.stream_interval = 1.0 / stream_fps if stream_fps else 0.0
        self.cond = threading.Condition()
        self.frame, self.raw, self.seq, self.jpeg, self.jpeg_seq, self.frame_time = None, None, 0, None, 0, 0.0
        self.encode_lock = threading.Lock()
        self.clients, self.streams, self.snapshot_until = 0, 0, 0.0
        self.heartbeat = time.time()
        self.started = time.time()
        self.ready = {"engine": (False, "not loaded"), "selftest": (False, "not run"), "source": (False, "not open")}
        self.loop = {}  # the camera loop's live figures (bind_loop)
        self.requests = {}  # (path, code) -> count
        self.infer_latency = LatencyStats()
        self.engine, self.engine_lock, self.post = None, threading.Lock(), None
        self.stopping = False
        self.server, self.thread, self.tegra = None, None, None

    # ---- the camera loop's side
    def start(self):
        """Bind and serve in a thread; RunnerError when the address cannot be bound."""
        if not self.token and not is_loopback(self.host):
            self.err.write("warning: serving on %s:%d beyond loopback without a token: anyone who reaches it sees "
                           "the camera (pass --token or set %s)\n" % (self.host, self.port, TOKEN_ENV))
        handler = type("Handler", (Handler,), {"service": self})
        try:
            self.server = Server((self.host, self.port), handler)
        except (OSError, socket.error) as e:
            raise RunnerError("cannot serve on %s:%d (%s); choose another port with --serve"
                              % (self.host, self.port, e.strerror or e)) from None
        self.port = self.server.server_address[1]
        # Handler threads are short bursts of Python; with the default 5 ms GIL switch interval a burst can hold
        # the camera loop (a few hundred microseconds a frame) back for several frames.
        sys.setswitchinterval(SWITCH_INTERVAL)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        self.thread.start()
        if os.path.exists("/usr/bin/tegrastats") or os.path.exists("/usr/sbin/tegrastats"):
            self.tegra = Tegrastats()
        self.err.write("serving on http://%s:%d/ (stream /stream.mjpg, metrics /metrics, POST /infer)\n"
                       % (self.host if ":" not in self.host else "[%s]" % self.host, self.port))
        self.err.flush()

    def stop(self):
        self.stopping = True
        with self.cond:
            self.cond.notify_all()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.tegra is not None:
            self.tegra.stop()

    def set_ready(self, key, ok, detail=""):
        self.ready[key] = (bool(ok), detail)

    def beat(self):
        self.heartbeat = time.time()

    def bind_loop(self, **figures):
        """The loop's live objects (latency stats, the capture thread, the source, its counters)."""
        self.loop = figures

    def attach_engine(self, engine, in_name, post):
        """/infer goes through the camera loop's engine (one runtime, submissions serialised)."""
        self.engine, self.in_name, self.post = engine, in_name, post

    def wants_frames(self):
        """True when the loop should draw this frame for us: a snapshot waits, or a stream client watches and the
        last frame drawn for the stream is 1/stream_fps old; the camera loop runs at its own rate, the stream at
        most at stream_fps (drawing and encoding every frame of a fast loop would slow it)."""
        now = time.time()
        if now < self.snapshot_until:
            return True
        return self.streams > 0 and now - self.frame_time >= self.stream_interval

    def publish(self, vis, record, raw=None):
        """A frame for the live view: ``vis`` when the loop drew it anyway (a window, --save), else ``raw``
        (outputs, frame, geometry, FPS), which the first client that wants it draws, off the loop's thread."""
        with self.cond:
            self.frame, self.raw = vis, (raw, dict(record)) if vis is None else None
            self.seq, self.frame_time = self.seq + 1, time.time()
            self.cond.notify_all()

    # ---- the handlers' side
    def jpeg_after(self, seq, timeout):
        """(JPEG bytes, seq) of the newest frame newer than ``seq``, drawn and encoded once for every client;
        (None, seq) when none came within ``timeout``."""
        deadline = time.time() + timeout
        with self.cond:
            while self.seq <= seq and not self.stopping:
                left = deadline - time.time()
                if left <= 0:
                    return None, seq
                self.cond.wait(left)
            if self.stopping:
                return None, seq
            seq, frame, raw = self.seq, self.frame, self.raw
        return self._encoded(seq, frame, raw), seq

    def jpeg_now(self, timeout):
        """The JPEG of a frame published within the last stream interval, else of the next one."""
        with self.cond:
            if self.seq and time.time() - self.frame_time < max(self.stream_interval, 0.1):
                seq, frame, raw = self.seq, self.frame, self.raw
            else:
                self.snapshot_until = time.time() + timeout
                return self.jpeg_after(self.seq, timeout)[0]
        return self._encoded(seq, frame, raw)

    def _encoded(self, seq, frame, raw):
        """Draw (when the loop did not) and encode frame ``seq`` once; outside the loop's lock, so the camera
        loop never waits for a client."""
        with self.encode_lock:
            if self.jpeg_seq != seq:
                vis = frame
                if vis is None:
                    (outs, image, geom, fps_now), record = raw
                    vis = self.post(outs, image.copy(), geom, record, True)
                    draw_overlay(vis, fps_now, record["latency_ms"])
                ok, buf = cv2.imencode(".jpg", vis, [int(cv2.IMWRITE_JPEG_QUALITY), 80])
                self.jpeg, self.jpeg_seq = (buf.tobytes() if ok else None), seq
            return self.jpeg

    def infer(self, image):
        """The JSON record of one decoded BGR image, through the loop's engine."""
        if self.engine is None:
            raise RunnerError("the engine is not running yet")
        x, geom = preprocess(image, self.manifest["preprocess"])
        job = InferJob()
        t = time.time()
        with self.engine_lock:
            self.engine.submit({self.in_name: x}, job)
        if not job.event.wait(INFER_TIMEOUT):
            raise RunnerError("inference did not answer within %.0f s" % INFER_TIMEOUT)
        ms = job.ms if job.ms is not None else (time.time() - t) * 1000.0
        self.infer_latency.add(ms)
        record = {"frame": 0, "timestamp": round(t, 3), "latency_ms": round(ms, 2)}
        self.post(job.outs, image, geom, record, False)
        record["e2e_ms"] = round((time.time() - t) * 1000.0, 2)
        return record

    def readiness(self):
        ok = all(v[0] for v in self.ready.values())
        return ok, dict((k, {"ok": v[0], "detail": v[1]}) for k, v in self.ready.items())

    def count(self, path, code):
        key = (path, code)
        self.requests[key] = self.requests.get(key, 0) + 1

    def metrics_text(self):
        """Prometheus text exposition (format 0.0.4)."""
        m = self.manifest
        lines = []

        def metric(name, kind, help_text, samples):
            lines.append("# HELP edgeport_%s %s" % (name, help_text))
            lines.append("# TYPE edgeport_%s %s" % (name, kind))
            for labels, value in samples:
                lab = ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\").replace('"', '\\"'))
                               for k, v in labels)
                lines.append("edgeport_%s%s %s" % (name, "{%s}" % lab if lab else "", repr(float(value))))

        def summary(name, help_text, stats):
            samples = [((("quantile", q),), stats.percentile(100 * q)) for q in (0.5, 0.9, 0.99)]
            metric(name, "summary", help_text, samples)
            lines.append("edgeport_%s_sum %r" % (name, float(stats.total)))
            lines.append("edgeport_%s_count %d" % (name, stats.count))

        info = (("model", m["model"]["name"]), ("target", m["target"]), ("precision", m["precision"]),
                ("backend", m.get("backend", "")), ("task", m["preprocess"]["task"]),
                ("edgeport_version", m.get("edgeport", "")), ("build_key", m.get("build_key", "")))
        metric("bundle_info", "gauge", "The bundle this runner serves (labels); always 1.", [(info, 1)])
        ready, _ = self.readiness()
        metric("ready", "gauge", "1 when the engine is loaded, the selftest passed and the source is open.",
               [((), 1 if ready else 0)])
        metric("heartbeat_age_seconds", "gauge", "Seconds since the main loop last went round.",
               [((), time.time() - self.heartbeat)])
        loop = self.loop
        state, grabber, source = loop.get("state") or {}, loop.get("grabber"), loop.get("source")
        elapsed = max(time.time() - loop.get("t0", self.started), 1e-6)
        metric("frames_total", "counter", "Frames processed (inferred, postprocessed and emitted).",
               [((), state.get("emitted", 0))])
        metric("frames_dropped_total", "counter", "Frames the capture thread replaced before the loop took them.",
               [((), getattr(grabber, "dropped", 0))])
        metric("frames_corrupt_total", "counter", "Frames the source could not decode.",
               [((), getattr(source, "corrupt", 0))])
        metric("source_reconnects_total", "counter", "Times a lost live source was reopened.",
               [((), getattr(source, "reconnects", 0))])
        metric("fps", "gauge", "Frames per second since the loop started.", [((), state.get("emitted", 0) / elapsed)])
        if loop.get("lat") is not None:
            summary("inference_latency_ms", "Inference latency of camera frames, ms.", loop["lat"])
            summary("e2e_latency_ms", "Capture to emitted record, ms.", loop["e2e"])
        summary("infer_request_latency_ms", "Inference latency of POST /infer images, ms.", self.infer_latency)
        metric("stream_clients", "gauge", "Clients watching /stream.mjpg.", [((), self.streams)])
        metric("http_requests_total", "counter", "HTTP requests answered, by path and status.",
               [((("path", p), ("code", c)), n) for (p, c), n in sorted(self.requests.items())])
        rss = resident_bytes()
        if rss:
            metric("resident_memory_bytes", "gauge", "The runner's resident memory.", [((), rss)])
        figures = self.tegra.figures if self.tegra is not None else {}
        if "gpu_load_percent" in figures:
            metric("gpu_load_percent", "gauge", "GPU load from tegrastats (GR3D_FREQ).",
                   [((), figures["gpu_load_percent"])])
        if "power_watts" in figures:
            metric("power_watts", "gauge", "Board input power from tegrastats.", [((), figures["power_watts"])])
        return "\n".join(lines) + "\n"

    def page(self):
        """The / page: the stream, the model and the legend."""
        m = self.manifest
        spec = m["preprocess"]
        labels, palette = spec.get("labels") or [], spec.get("palette") or []
        items = []
        for i, name in enumerate(labels[:64]):
            swatch = ""
            if i < len(palette):
                swatch = '<span class="sw" style="background:rgb(%d,%d,%d)"></span>' % tuple(palette[i][:3])
            items.append("<li>%s%s</li>" % (swatch, html.escape(str(name))))
        more = "<li>... %d more</li>" % (len(labels) - 64) if len(labels) > 64 else ""
        title = "%s on %s (%s, %s)" % (m["model"]["name"], m["target"], m["precision"], spec["task"])
        stream = '<img id="live" src="stream.mjpg" alt="live stream">' if self.args.source_open else \
            "<p>No camera: this service answers POST /infer only.</p>"
        return PAGE % {"title": html.escape(title), "stream": stream, "legend": "".join(items) + more}








def serve_without_source(args, manifest, rt, service, stop):
    """--no-source: the engine answers /infer only; returns when ``stop`` says so (SIGINT/SIGTERM)."""
    engine = make_async(rt, lambda job, outs, ms=None: job.done(outs, ms), args.requests)
    service.attach_engine(engine, manifest["inputs"][0]["name"], task_part(manifest["preprocess"]["task"])(
        manifest, args))
    service.set_ready("source", True, "none (--no-source)")
    try:
        while not stop["flag"]:
            service.beat()
            time.sleep(0.2)
    finally:
        engine.wait_all()
        if hasattr(engine, "close"):
            engine.close()

