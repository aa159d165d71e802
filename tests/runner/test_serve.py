"""The runner as a service (--serve), as a user runs it on a device: a venv with only numpy, OpenCV and
OpenVINO, a real video, the standard library's HTTP client for every endpoint (401, 413, 400, 503
included) and Debian's headless Chromium for the page."""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import device_env, needs_openvino, needs_torch

pytestmark = [needs_torch, needs_openvino]
TOKEN = "t0ken-for-tests"


class Served:
    """A runner started with --serve on a free port; stopped with SIGTERM."""

    def __init__(self, python: Path, bundle: Path, *args: str, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([str(python), "runner.py", *args, "--serve", "0"], cwd=bundle,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**device_env(), **(env or {})})
        self.err: list[str] = []
        deadline = time.time() + 60
        self.port = 0
        while time.time() < deadline and not self.port:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.err.append(line)
            m = re.search(r"serving on http://127\.0\.0\.1:(\d+)/", line)
            if m:
                self.port = int(m.group(1))
        assert self.port, "".join(self.err)
        self.reader = threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)
        self.reader.start()  # the only reader of stderr from here on
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.request("GET", "/readyz")[0] == 200:
                return
            time.sleep(0.2)
        raise AssertionError("never ready: " + "".join(self.err))

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        c = self.conn()
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            c.close()

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.reader.join(timeout=10)  # stderr is read to its end
        return self.proc.returncode, "".join(self.err)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def read_mjpeg_frames(resp: http.client.HTTPResponse, n: int) -> list[np.ndarray]:
    import cv2

    frames = []
    while len(frames) < n:
        line = resp.fp.readline()
        if not line:
            break
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
            resp.fp.readline()  # the blank line
            frames.append(cv2.imdecode(np.frombuffer(resp.fp.read(length), np.uint8), cv2.IMREAD_COLOR))
    return frames


def multipart(field: str, data: bytes, extra: dict[str, str] | None = None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in (extra or {}).items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="f.png"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_every_endpoint_with_a_token(openvino_venv, bundle, camvid_video, camvid, tmp_path):
    import cv2

    frame_png = sorted((camvid / "val").glob("*.png"))[0]
    svc = Served(openvino_venv, bundle, str(camvid_video), "--loop", "--headless", "--max-clients", "4",
                 "--max-upload-mb", "0.5", env={"EDGEPORT_TOKEN": TOKEN})
    try:
        # probes answer without the token; everything else wants it
        code, _, body = svc.request("GET", "/healthz")
        assert code == 200 and json.loads(body)["alive"]
        code, _, body = svc.request("GET", "/readyz")
        ready = json.loads(body)
        assert code == 200 and ready["ready"] and ready["checks"]["selftest"]["ok"], ready
        for path in ("/", "/metrics", "/snapshot.jpg", "/stream.mjpg"):
            code, headers, body = svc.request("GET", path)
            assert code == 401 and "token" in json.loads(body)["error"] and "Bearer" in headers["WWW-Authenticate"]
        assert svc.request("GET", "/metrics", headers={"Authorization": "Bearer wrong"})[0] == 401
        # a browser's first visit sets a cookie, which then opens the page
        code, headers, _ = svc.request("GET", f"/?token={TOKEN}")
        assert code == 303 and headers["Location"] == "/" and "HttpOnly" in headers["Set-Cookie"]
        cookie = headers["Set-Cookie"].split(";")[0]
        code, _, page = svc.request("GET", "/", headers={"Cookie": cookie})
        assert code == 200 and b"stream.mjpg" in page and b"pavement" in page  # the stream and the legend

        code, headers, jpg = svc.request("GET", "/snapshot.jpg", headers=AUTH)
        snap = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
        assert code == 200 and headers["Content-Type"] == "image/jpeg" and snap.shape == (360, 480, 3)

        c = svc.conn()
        c.request("GET", "/stream.mjpg", headers=AUTH)
        r = c.getresponse()
        assert r.status == 200 and r.getheader("Content-Type").startswith("multipart/x-mixed-replace")
        frames = read_mjpeg_frames(r, 3)
        c.close()
        assert len(frames) == 3 and all(f is not None and f.shape == (360, 480, 3) for f in frames)

        # POST /infer: the same record a --jsonl line gives for that image
        code, _, body = svc.request("POST", "/infer", frame_png.read_bytes(), {**AUTH, "Content-Type": "image/png"})
        record = json.loads(body)
        assert code == 200 and set(record) >= {"latency_ms", "areas", "e2e_ms"}, record
        folder = tmp_path / "one"
        folder.mkdir()
        shutil.copy(frame_png, folder / frame_png.name)
        res = subprocess.run([str(openvino_venv), "runner.py", str(folder), "--headless", "--jsonl", "-"],
                             cwd=bundle, capture_output=True, text=True, env=device_env(), timeout=120)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout.splitlines()[0])["areas"] == record["areas"]
        body, ctype = multipart("image", frame_png.read_bytes())
        code, _, got = svc.request("POST", "/infer", body, {**AUTH, "Content-Type": ctype})
        assert code == 200 and json.loads(got)["areas"] == record["areas"]

        # bad requests: one clear message each
        code, _, body = svc.request("POST", "/infer", b"not an image", {**AUTH, "Content-Type": "image/jpeg"})
        assert code == 400 and "not an image" in json.loads(body)["error"]
        code, _, body = svc.request("POST", "/infer", b"x" * 600_000, {**AUTH, "Content-Type": "image/jpeg"})
        assert code == 413 and "limit" in json.loads(body)["error"]
        code, _, body = svc.request("POST", "/v1/vision/detection", frame_png.read_bytes(), AUTH)
        assert code == 404 and "detection bundle" in json.loads(body)["error"]
        assert svc.request("GET", "/nope", headers=AUTH)[0] == 404
        assert svc.request("POST", "/metrics", b"", AUTH)[0] == 405

        # metrics: Prometheus text with the bundle's labels and the loop's counters
        code, headers, body = svc.request("GET", "/metrics", headers=AUTH)
        text = body.decode()
        assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert re.search(r'edgeport_bundle_info\{model="roadseg",target="intel-cpu",precision="int8"', text)
        frames_total = float(re.search(r"^edgeport_frames_total (\S+)$", text, re.M).group(1))
        assert frames_total > 0 and "# TYPE edgeport_inference_latency_ms summary" in text
        assert re.search(r'^edgeport_inference_latency_ms\{quantile="0.99"\} \d', text, re.M)
        assert float(re.search(r"^edgeport_infer_request_latency_ms_count (\S+)$", text, re.M).group(1)) == 2
        assert 'edgeport_http_requests_total{path="/infer",code="413"} 1.0' in text

        # beyond --max-clients: 503, and the slots come back when the streams close
        streams = []
        for _ in range(4):
            c = svc.conn()
            c.request("GET", "/stream.mjpg", headers=AUTH)
            r = c.getresponse()
            assert r.status == 200
            read_mjpeg_frames(r, 1)
            streams.append((c, r))  # the response holds the socket (Connection: close)
        code, _, body = svc.request("GET", "/metrics", headers=AUTH)
        assert code == 503 and "busy" in json.loads(body)["error"]
        assert svc.request("GET", "/healthz")[0] == 200  # probes are never turned away
        for c, r in streams:
            r.close()
            c.close()
        deadline = time.time() + 10
        while svc.request("GET", "/metrics", headers=AUTH)[0] == 503 and time.time() < deadline:
            time.sleep(0.2)
        assert svc.request("GET", "/metrics", headers=AUTH)[0] == 200
    finally:
        code, err = svc.stop()
    assert code == 0, err
    summary = json.loads(next(ln for ln in err.splitlines() if ln.startswith("summary: "))[len("summary: "):])
    assert summary["stopped_by_signal"] and summary["frames"] > 0
    with pytest.raises(OSError):  # the server stopped with the runner
        svc.request("GET", "/healthz")


def test_no_source_serves_infer_only(openvino_venv, bundle, camvid):
    frame_png = sorted((camvid / "val").glob("*.png"))[3]
    svc = Served(openvino_venv, bundle, "--no-source")
    try:
        code, _, body = svc.request("GET", "/readyz")
        assert code == 200 and json.loads(body)["checks"]["source"]["detail"].startswith("none")
        code, _, body = svc.request("POST", "/infer", frame_png.read_bytes(), {"Content-Type": "image/png"})
        assert code == 200 and json.loads(body)["areas"]
        code, _, body = svc.request("GET", "/snapshot.jpg")
        assert code == 404 and "--no-source" in json.loads(body)["error"]
        code, _, page = svc.request("GET", "/")
        assert code == 200 and b"POST /infer only" in page
        # concurrent uploads all answered, in one runtime
        results: list[int] = []

        def post() -> None:
            results.append(svc.request("POST", "/infer", frame_png.read_bytes(), {"Content-Type": "image/png"})[0])

        threads = [threading.Thread(target=post) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [200] * 6
        # A body the answer does not need (a wrong path, DeepStack's endpoint on a segmentation bundle, an upload
        # over the limit) is read before answering: the client gets its 404 or 413, not a broken pipe.
        big = b"\0" * (8 * 1024 * 1024)
        for path, data, want in (("/nope", big, 404), ("/v1/vision/detection", big, 404), ("/infer", big * 2, 413)):
            code, _, body = svc.request("POST", path, data, {"Content-Type": "image/png"})
            assert code == want, (path, code, body)
        assert svc.request("POST", "/infer", frame_png.read_bytes(), {"Content-Type": "image/png"})[0] == 200
    finally:
        code, err = svc.stop()
    assert code == 0, err


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG of width x height black pixels, deflated: about 1 KB per megapixel."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z, row = zlib.compressobj(9), b"\x00" * (1 + 3 * width)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024.0


def test_a_decompression_bomb_is_refused_from_its_header(openvino_venv, bundle, camvid):
    """A 20000x20000 PNG of about a megabyte (1.2 GB decoded) posted to /infer and to DeepStack's endpoint: 413
    at once, named, and the runner's resident memory stays within 50 MB of what it was; a 60 MP image is refused
    under the default 40 MP and served once --max-pixels allows it."""
    bomb = png_bomb(20000, 20000)
    assert len(bomb) < 2_000_000
    svc = Served(openvino_venv, bundle, "--no-source")
    try:
        frame = sorted((camvid / "val").glob("*.png"))[3].read_bytes()
        assert svc.request("POST", "/infer", frame, {"Content-Type": "image/png"})[0] == 200  # warm
        before = _rss_mb(svc.proc.pid)
        t0 = time.time()
        code, _, body = svc.request("POST", "/infer", bomb, {"Content-Type": "image/png"})
        assert code == 413 and time.time() - t0 < 5, (code, body)
        error = json.loads(body)["error"]
        assert "20000x20000 (400 MP), over the limit of 40 MP" in error and "--max-pixels" in error, error
        boundary = "b0undary"
        form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + bomb + f"\r\n--{boundary}--\r\n".encode()
        code, _, body = svc.request("POST", "/v1/vision/detection", form,
                                    {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert code in (404, 413), (code, body)  # a segmentation bundle: DeepStack's endpoint is not there
        after = _rss_mb(svc.proc.pid)
        assert after - before < 50, (before, after)
        assert svc.request("POST", "/infer", frame, {"Content-Type": "image/png"})[0] == 200  # still serving
        assert svc.request("POST", "/infer", png_bomb(10000, 6000), {"Content-Type": "image/png"})[0] == 413
    finally:
        code, err = svc.stop()
    assert code == 0, err
    svc = Served(openvino_venv, bundle, "--no-source", "--max-pixels", "80")
    try:
        code, _, body = svc.request("POST", "/infer", png_bomb(10000, 6000), {"Content-Type": "image/png"})
        assert code == 200, body
    finally:
        svc.stop()


def test_serve_options_are_checked(openvino_venv, bundle):
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(openvino_venv), "runner.py", *args], cwd=bundle, capture_output=True, text=True,
                              env=device_env(), timeout=60)

    for args, message in ((["--token", "x"], "--token has no effect without --serve"),
                          (["--no-source"], "--no-source has no effect without --serve"),
                          (["--serve", "99999"], "port from 0"),
                          (["--serve", "8080", "--bench"], "does not combine with --bench"),
                          (["--no-token"], "--no-token has no effect without --serve"),
                          (["--serve", "0", "--max-pixels", "0"], "give a number of megapixels above 0"),
                          (["--serve", "0", "--max-pixels", "lots"], "is not a number of megapixels"),
                          (["--serve", "0.0.0.0:0", "--max-frames", "5"], "reaches beyond loopback: pass --token"),
                          (["--serve", "0.0.0.0:0", "--token", "x", "--no-token"], "contradict each other")):
        res = run(*args)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert len([ln for ln in res.stderr.splitlines() if ln.startswith("error:")]) == 1, res.stderr
    res = run("synthetic://", "--headless", "--serve", "0.0.0.0:0", "--max-frames", "5", "--no-token")
    assert res.returncode == 0 and "beyond loopback without a token" in res.stderr, res.stderr


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_a_browser_shows_the_live_overlay(openvino_venv, bundle, camvid_video, tmp_path):
    """Headless Chromium opens / with the token once; two screenshots a second apart differ, and both show the
    FPS overlay (yellow text) drawn on the stream."""
    import cv2

    svc = Served(openvino_venv, bundle, str(camvid_video), "--loop", "--headless", "--token", TOKEN)
    shots = []
    try:
        for i in range(2):
            shot = tmp_path / f"shot{i}.png"
            res = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                  "--window-size=800,700", "--timeout=3000", f"--screenshot={shot}",
                                  f"http://127.0.0.1:{svc.port}/?token={TOKEN}"],
                                 capture_output=True, text=True, timeout=90, cwd=tmp_path)
            assert shot.exists(), res.stderr[-2000:]
            shots.append(cv2.imread(str(shot)))
            time.sleep(1.0)
    finally:
        code, err = svc.stop()
    assert code == 0, err
    a, b = shots
    if os.environ.get("EDGEPORT_DOCS_IMG"):  # the runner page's picture (docs/img/live-view.png) is this screenshot
        cv2.imwrite(str(Path(os.environ["EDGEPORT_DOCS_IMG"]) / "live-view.png"), b)
    assert a.shape == b.shape
    assert float(np.abs(a.astype(int) - b.astype(int)).mean()) > 0.5  # the stream moved
    for shot in shots:
        border = np.all(np.abs(shot.astype(int) - 68) <= 3, axis=-1)  # the stream's 1 px #444 frame
        ys, xs = np.nonzero(border.sum(1) > 400)[0], np.nonzero(border.sum(0) > 300)[0]  # its long edges
        frame = shot[ys.min() + 1:ys.max(), xs.min() + 1:xs.max()]
        assert frame.shape[:2] == (360, 480), frame.shape
        corner = frame[-30:, :220]  # where the runner draws "FPS  ms"
        yellow = (corner[..., 2] > 180) & (corner[..., 1] > 180) & (corner[..., 0] < 100)
        assert yellow.sum() > 40, yellow.sum()
