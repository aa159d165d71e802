"""Load on the runner service: FPS with and without clients, errors, resident memory.

Starts a bundle's runner on a video (looped) with --serve on 127.0.0.1, then alternates windows
without clients and windows with N stream clients reading /stream.mjpg plus M POST /infer requests
spread over the window; the runner's FPS in each window is read from its own /metrics
(edgeport_frames_total), RSS from edgeport_resident_memory_bytes. Prints one line per window and
the medians; a benchmark, not a test.

Example:
  .venv/bin/python scripts/serve_load.py dist/intel-cpu-int8 video.avi --windows 3 --seconds 10
"""
from __future__ import annotations

import argparse
import http.client
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def metric(port: int, name: str) -> float:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    return float(re.search(rf"^edgeport_{name} (\S+)$", text, re.M).group(1))


def stream_client(port: int, stop: threading.Event, counts: dict[str, int]) -> None:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/stream.mjpg")
        r = c.getresponse()
        if r.status != 200:
            counts["errors"] += 1
            return
        while not stop.is_set():
            line = r.fp.readline()
            if not line:
                counts["errors"] += 1
                return
            if line.lower().startswith(b"content-length:"):
                n = int(line.split(b":")[1])
                r.fp.readline()
                r.fp.read(n)
                counts["frames"] += 1
        r.close()
        c.close()
    except OSError:
        counts["errors"] += 1


def infer_requests(port: int, image: bytes, n: int, seconds: float, counts: dict[str, int]) -> None:
    for _ in range(n):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("POST", "/infer", body=image, headers={"Content-Type": "application/octet-stream"})
        r = c.getresponse()
        r.read()
        counts["infer_ok" if r.status == 200 else "errors"] += 1
        c.close()
        time.sleep(seconds / n)


def window(port: int, seconds: float, streams: int, infers: int, image: bytes) -> dict[str, float]:
    counts = {"frames": 0, "errors": 0, "infer_ok": 0}
    stop = threading.Event()
    threads = [threading.Thread(target=stream_client, args=(port, stop, counts)) for _ in range(streams)]
    if infers:
        threads.append(threading.Thread(target=infer_requests, args=(port, image, infers, seconds * 0.9, counts)))
    for t in threads:
        t.start()
    time.sleep(0.5)
    f0, t0 = metric(port, "frames_total"), time.time()
    time.sleep(seconds)
    f1, t1 = metric(port, "frames_total"), time.time()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    return {"fps": (f1 - f0) / (t1 - t0), "rss_mb": metric(port, "resident_memory_bytes") / 2**20, **counts}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("video", type=Path)
    p.add_argument("--image", type=Path, help="the image POSTed to /infer (default: the video's first frame, encoded "
                   "as --format)")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg",
                   help="how the video's first frame is sent to /infer: JPEG at quality 90 (what cameras and "
                   "DeepStack clients send; the default) or PNG (decoding it costs the runner about 4x more CPU)")
    p.add_argument("--python", default=sys.executable, help="the python that runs the runner")
    p.add_argument("--windows", type=int, default=3, help="windows of each kind, alternated (default 3)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of a window (default 10)")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--infers", type=int, default=50, help="POST /infer requests per loaded window (default 50)")
    p.add_argument("--port", type=int, default=18765)
    args = p.parse_args()
    import cv2

    if args.image:
        image = args.image.read_bytes()
    else:
        ok, frame = cv2.VideoCapture(str(args.video)).read()
        image = cv2.imencode(f".{args.format}", frame, [int(cv2.IMWRITE_JPEG_QUALITY), 90] if args.format == "jpg"
                             else [])[1].tobytes()
    proc = subprocess.Popen([args.python, "runner.py", str(args.video.resolve()), "--loop", "--headless", "--serve",
                             str(args.port), "--max-clients", str(args.streams + 4)], cwd=args.bundle,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            if proc.poll() is not None:  # not ours that answers (the port is taken), or it failed to start
                raise SystemExit(f"the runner exited {proc.returncode} before it was ready")
            try:
                metric(args.port, "ready")
                break
            except (OSError, AttributeError):
                time.sleep(0.3)
        time.sleep(2.0)
        rows: dict[str, list[dict[str, float]]] = {"idle": [], "loaded": []}
        for i in range(args.windows):
            for kind in ("idle", "loaded"):
                r = window(args.port, args.seconds, *((0, 0) if kind == "idle" else (args.streams, args.infers)),
                           image)
                rows[kind].append(r)
                print(f"window {i + 1} {kind:6s}: runner {r['fps']:.1f} FPS, RSS {r['rss_mb']:.1f} MB, stream frames "
                      f"{r['frames']}, /infer ok {r['infer_ok']}, errors {r['errors']}", flush=True)
    except BaseException:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
        print(f"the runner exited {proc.returncode}; its last words:\n" + "\n".join(err.splitlines()[-15:]),
              file=sys.stderr)
        raise
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    idle = statistics.median(r["fps"] for r in rows["idle"])
    loaded = statistics.median(r["fps"] for r in rows["loaded"])
    rss = [r["rss_mb"] for k in ("idle", "loaded") for r in rows[k]]
    print(f"median runner FPS: {idle:.1f} without clients, {loaded:.1f} with {args.streams} streams and "
          f"{args.infers} /infer per window: {loaded / idle:.3f}x")
    print(f"RSS over the windows: {min(rss):.1f} .. {max(rss):.1f} MB; errors: "
          f"{sum(r['errors'] for k in rows for r in rows[k])}; runner exit {proc.returncode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
