"""Runner core shared by every backend: sources, postprocessing, overlay, stats, self-test, CLI.

Python 3.6 syntax; numpy, cv2, the standard library and the bundle's runtime only. It is
assembled with preprocess.py, metrics.py, the scene generator and one backend's runner part
into a bundle's single runner.py (edgeport.bundle.assemble_runner); it reads only
manifest.json. The functions it uses from those files are defined before it there.
"""
import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time

import cv2
import numpy as np

from edgeport.runner.metrics import compare
from edgeport.runner.preprocess import preprocess
from edgeport.zoo.scene import render_scene

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def open_runtime(manifest, bundle_dir, device=None):
    """Replaced in runner.py by the bundle's backend part (defined after this file there)."""
    raise RunnerError("this runner has no backend part; rebuild the bundle")


class RunnerError(Exception):
    """A problem the user can act on: printed as one line, non-zero exit."""


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(bundle_dir):
    path = os.path.join(bundle_dir, "manifest.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RunnerError("cannot read %s: %s" % (path, e)) from None


def verify_files(bundle_dir, manifest):
    """[(file, problem)] for every file whose sha256 differs from the manifest or is missing."""
    bad = []
    for name, digest in sorted(manifest["files"].items()):
        path = os.path.join(bundle_dir, name)
        if not os.path.isfile(path):
            bad.append((name, "missing"))
        elif sha256_file(path) != digest:
            bad.append((name, "sha256 mismatch (modified after the build)"))
    return bad


# ---------------------------------------------------------------- postprocessing
def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def classify(logits, labels, k=5):
    """[(label, probability)] of the top k classes of one (1, C) output."""
    scores = logits.reshape(-1)
    if scores.min() < 0 or abs(float(scores.sum()) - 1.0) > 1e-3:
        scores = softmax(scores)
    order = np.argsort(-scores)[:k]
    return [(labels[i] if i < len(labels) else str(i), float(scores[i])) for i in order]


def segment(logits, layout_nhwc):
    """Class-id map (H, W) of one segmentation output."""
    arr = logits[0]
    return np.argmax(arr, axis=-1 if layout_nhwc else 0).astype(np.uint8)


def mask_to_frame(mask, geometry, frame_hw):
    """Resize a model-space class map back onto the frame (undoing letterbox or crop)."""
    h, w = frame_hw
    left, top, right, bottom = geometry["box"]
    if geometry["mode"] == "letterbox":
        mask = mask[int(top):int(bottom), int(left):int(right)]
        return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    if geometry["mode"] == "shorter-crop":
        full = np.zeros((h, w), np.uint8)
        x0, y0, x1, y1 = [int(round(v)) for v in (left, top, right, bottom)]
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        full[y0:y1, x0:x1] = cv2.resize(mask, (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST)
        return full
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)


def class_areas(mask, labels):
    counts = np.bincount(mask.ravel(), minlength=len(labels))
    total = float(mask.size)
    return dict((labels[i] if i < len(labels) else str(i), round(100.0 * c / total, 2))
                for i, c in enumerate(counts) if c)


def draw_segmentation(frame, mask, palette, labels, areas, alpha=0.45):
    colours = np.array([[c[2], c[1], c[0]] for c in palette] or [[0, 0, 0]], np.uint8)  # RGB -> BGR
    colour = colours[np.clip(mask, 0, len(colours) - 1)]
    out = cv2.addWeighted(frame, 1 - alpha, colour, alpha, 0)
    y = 18
    for name, pct in sorted(areas.items(), key=lambda kv: -kv[1])[:8]:
        idx = labels.index(name) if name in labels else 0
        cv2.rectangle(out, (5, y - 10), (15, y), tuple(int(c) for c in colours[idx]), -1)
        cv2.putText(out, "%s %.1f%%" % (name, pct), (20, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
        y += 14
    return out


def draw_classes(frame, top):
    out = frame.copy()
    for i, (name, p) in enumerate(top):
        cv2.putText(out, "%s %.2f" % (name, p), (8, 20 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 255, 0), 1)
    return out


# ---------------------------------------------------------------- sources
class SyntheticSource(object):
    """The embedded road-scene generator as a camera: synthetic://[seed][?width=&height=&fps=]."""

    def __init__(self, uri, width, height, fps):
        rest = uri[len("synthetic://"):]
        seed = rest.split("?")[0]
        self.seed = int(seed) if seed.isdigit() else 7
        self.w, self.h = width or 640, height or 480
        self.fps = fps or 30.0
        self.i = 0

    def read(self):
        frame, _ = render_scene(self.seed, self.h, self.w, t=self.i / float(self.fps))
        self.i += 1
        return frame

    def release(self):
        pass


class FolderSource(object):
    """A folder of images, in name order."""

    EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

    def __init__(self, path):
        self.files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(self.EXTS))
        if not self.files:
            raise RunnerError("image folder %s holds no images" % path)
        self.i = 0
        self.corrupt = 0

    def read(self):
        while self.i < len(self.files):
            img = cv2.imread(self.files[self.i])
            self.i += 1
            if img is not None:
                return img
            self.corrupt += 1
        return None

    def release(self):
        pass


class CaptureSource(object):
    """cv2.VideoCapture on a camera, a file, a stream or a GStreamer pipeline."""

    def __init__(self, spec, api, live, width, height, fps):
        self.live = live
        self.cap = cv2.VideoCapture(spec, api) if api is not None else cv2.VideoCapture(spec)
        if not self.cap.isOpened():
            raise RunnerError("cannot open source %s" % (spec,))
        if live:
            self.cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
            if width:
                self.cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            if height:
                self.cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
            if fps:
                self.cap.set(cv2.CAP_PROP_FPS, fps)

    def read(self):
        ok, frame = self.cap.read()
        return frame if ok else None

    def release(self):
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


def open_source(uri, width=0, height=0, fps=0):
    """Open a frame source from its URI (see --help)."""
    if uri.startswith("synthetic://"):
        return SyntheticSource(uri, width, height, fps)
    if uri.startswith("csi://"):
        if not has_gstreamer():
            raise RunnerError("csi:// needs OpenCV built with GStreamer (JetPack's python3-opencv); this OpenCV "
                              "has none. Do not pip-install opencv on a Jetson")
        sensor = int(uri[len("csi://"):] or 0)
        return CaptureSource(csi_pipeline(sensor, width, height, fps), cv2.CAP_GSTREAMER, True, 0, 0, 0)
    if uri.isdigit():
        return CaptureSource(int(uri), cv2.CAP_V4L2 if sys.platform.startswith("linux") else None, True,
                             width, height, fps)
    if uri.startswith("v4l2://") or uri.startswith("/dev/video"):
        dev = uri[len("v4l2://"):] if uri.startswith("v4l2://") else uri
        return CaptureSource(dev, cv2.CAP_V4L2, True, width, height, fps)
    if uri.startswith(("rtsp://", "http://", "https://")):
        # Low latency: TCP transport and no buffering in FFmpeg, one-frame buffer in OpenCV.
        os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp|fflags;nobuffer|flags;low_delay")
        return CaptureSource(uri, cv2.CAP_FFMPEG, True, 0, 0, 0)
    if os.path.isdir(uri):
        return FolderSource(uri)
    if os.path.isfile(uri):
        return CaptureSource(uri, None, False, 0, 0, 0)
    raise RunnerError("source %s does not exist (camera index, /dev/videoN, csi://N, rtsp://, a video file, "
                      "an image folder or synthetic://)" % uri)


class LatestFrame(object):
    """Capture thread that always hands over the newest frame; older ones are dropped and counted.

    For files and folders (not live) nothing is dropped: the reader waits for the consumer.
    """

    def __init__(self, source, live):
        self.source, self.live = source, live
        self.cond = threading.Condition()
        self.frame, self.seq, self.ended = None, 0, False
        self.dropped = 0
        self.taken = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            frame = self.source.read()
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

    def get(self, timeout=5.0):
        with self.cond:
            deadline = time.time() + timeout
            while self.frame is None and not self.ended:
                if not self.cond.wait(max(0.0, deadline - time.time())) and time.time() >= deadline:
                    return None
            frame, self.frame = self.frame, None
            self.cond.notify_all()
            return frame

    def stop(self):
        with self.cond:
            self.ended = True
            self.cond.notify_all()
        self.thread.join(timeout=2)
        self.source.release()


# ---------------------------------------------------------------- running
def percentile(values, q):
    return float(np.percentile(values, q)) if values else 0.0


def selftest(bundle_dir, manifest, runtime_factory, out=sys.stdout):
    """Check hashes, the preprocessing and the golden outputs; print a table; True when all pass."""
    rows = []
    bad = verify_files(bundle_dir, manifest)
    rows.append(("files sha256", not bad, "%d files" % len(manifest["files"]) if not bad else
                 "; ".join("%s: %s" % b for b in bad)))
    if bad:
        _print_table(rows, out)
        return False
    spec = manifest["preprocess"]
    golden = manifest["golden"]
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
        for name, rel in case["outputs"].items():
            ref = np.load(os.path.join(bundle_dir, rel))
            m = compare(ref, outs[name], spec["task"], golden["tolerance"])
            detail = "max_rel %.2e cos %.6f agree %.4f" % (m.get("max_rel", -1), m.get("cosine", -1),
                                                           m.get("agreement", -1))
            if m["failed"]:
                detail += " FAILED: " + ", ".join(m["failed"])
            rows.append(("%s %s" % (os.path.basename(case["input"]), name), m["ok"], detail))
    _print_table(rows, out)
    return all(ok for _, ok, _ in rows)


def _print_table(rows, out):
    width = max(len(r[0]) for r in rows)
    for name, ok, detail in rows:
        out.write("%-*s  %s  %s\n" % (width, name, "PASS" if ok else "FAIL", detail))
    out.write("selftest: %s\n" % ("PASS" if all(r[1] for r in rows) else "FAIL"))
    out.flush()


def run_loop(args, manifest, rt):
    """Capture -> preprocess -> infer -> draw/save/json, until the source ends or a bound is hit."""
    spec = manifest["preprocess"]
    labels = spec.get("labels") or []
    task = spec["task"]
    in_name = manifest["inputs"][0]["name"]
    out_name = manifest["outputs"][0]["name"]
    nhwc = manifest["outputs"][0].get("layout") == "NHWC" or spec["layout"] == "NHWC"
    source = open_source(args.source, args.width, args.height, args.fps)
    live = isinstance(source, CaptureSource) and source.live or isinstance(source, SyntheticSource)
    grabber = LatestFrame(source, live and not isinstance(source, SyntheticSource))
    stop = {"flag": False}

    def on_signal(signum, _frame):
        stop["flag"] = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    writer = None
    show = not args.headless and bool(os.environ.get("DISPLAY") or sys.platform in ("win32", "darwin"))
    lat, frames, t0 = [], 0, time.time()
    jsonf = sys.stdout if args.json == "-" else (open(args.json, "w") if args.json else None)
    try:
        while not stop["flag"]:
            if args.max_frames and frames >= args.max_frames:
                break
            if args.duration and time.time() - t0 >= args.duration:
                break
            frame = grabber.get()
            if frame is None:
                break
            if args.flip:
                frame = cv2.flip(frame, 1)
            t = time.time()
            x, geom = preprocess(frame, spec)
            outs = rt.infer({in_name: x})
            ms = (time.time() - t) * 1000.0
            lat.append(ms)
            frames += 1
            record = {"frame": frames, "timestamp": round(time.time(), 3), "latency_ms": round(ms, 2)}
            if task == "classification":
                top = classify(outs[out_name], labels, args.topk)
                record["top"] = [[n, round(p, 4)] for n, p in top]
                vis = draw_classes(frame, top) if (writer is not None or show or args.save) else None
            else:
                mask = mask_to_frame(segment(outs[out_name], nhwc), geom, frame.shape[:2])
                areas = class_areas(mask, labels)
                record["areas"] = areas
                vis = draw_segmentation(frame, mask, spec.get("palette") or [], labels, areas) \
                    if (show or args.save) else None
            if vis is not None:
                fps_now = 1000.0 / max(np.mean(lat[-30:]), 1e-3)
                cv2.putText(vis, "%.1f FPS  %.1f ms" % (fps_now, ms), (8, vis.shape[0] - 8),
                            cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 255, 255), 1)
                if args.save:
                    if writer is None:
                        fourcc = cv2.VideoWriter_fourcc(*("mp4v" if args.save.endswith(".mp4") else "MJPG"))
                        writer = cv2.VideoWriter(args.save, fourcc, args.fps or 30, (vis.shape[1], vis.shape[0]))
                    writer.write(vis)
                if show:
                    cv2.imshow("edgeport", vis)
                    if cv2.waitKey(1) & 0xFF in (27, ord("q")):
                        break
            if jsonf:
                jsonf.write(json.dumps(record) + "\n")
                jsonf.flush()
    finally:
        grabber.stop()
        if writer is not None:
            writer.release()
        if jsonf and jsonf is not sys.stdout:
            jsonf.close()
    elapsed = max(time.time() - t0, 1e-6)
    summary = {"frames": frames, "fps": round(frames / elapsed, 2), "latency_p50_ms": round(percentile(lat, 50), 2),
               "latency_p99_ms": round(percentile(lat, 99), 2), "dropped": grabber.dropped,
               "corrupt": getattr(source, "corrupt", 0)}
    sys.stderr.write("summary: %s\n" % json.dumps(summary))
    return summary


def build_parser(manifest):
    cam = manifest.get("camera") or {}
    p = argparse.ArgumentParser(
        description="edgeport camera runner for %s (%s, %s)" % (manifest["model"]["name"], manifest["target"],
                                                                manifest["precision"]),
        epilog="examples:\n  python runner.py --selftest\n  python runner.py synthetic:// --headless "
               "--max-frames 100 --json -\n  python runner.py video.mp4 --save out.mp4 --headless",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", default=cam.get("source", "0"),
                   help="0 | /dev/videoN | v4l2://N | csi://N | rtsp://... | http(s)://... | video file | "
                        "image folder | synthetic:// (default: %(default)s)")
    p.add_argument("--selftest", action="store_true", help="verify hashes and golden outputs, then exit")
    p.add_argument("--headless", action="store_true", help="no window")
    p.add_argument("--save", help="write the annotated video here (.mp4 or .avi)")
    p.add_argument("--json", help="write one JSON line per frame to this file ('-' for stdout)")
    p.add_argument("--max-frames", type=int, default=0)
    p.add_argument("--duration", type=float, default=0, help="seconds")
    p.add_argument("--width", type=int, default=cam.get("width", 0))
    p.add_argument("--height", type=int, default=cam.get("height", 0))
    p.add_argument("--fps", type=float, default=cam.get("fps", 0))
    p.add_argument("--flip", action="store_true", help="mirror frames horizontally")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--device", help="override the runtime device from the manifest (e.g. CPU)")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    return p


def main(argv=None, bundle_dir=None):
    bundle_dir = bundle_dir or os.path.dirname(os.path.abspath(__file__))
    verbose = "-v" in (argv or sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:])
    try:
        manifest = load_manifest(bundle_dir)
        args = build_parser(manifest).parse_args(argv)
        bad = verify_files(bundle_dir, manifest)
        if args.selftest:
            ok = selftest(bundle_dir, manifest, lambda: open_runtime(manifest, bundle_dir, args.device))
            return EXIT_OK if ok else EXIT_FAIL
        if bad:
            raise RunnerError("bundle files fail their sha256 check (%s); rebuild or re-copy the bundle"
                              % "; ".join("%s: %s" % b for b in bad))
        rt = open_runtime(manifest, bundle_dir, args.device)
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
