"""The bundle's runner.py as a user runs it on a device: a venv with only numpy, OpenCV and OpenVINO.

Real sources: a video made from CamVid val frames, synthetic://, an image folder, an HTTP
stream served from 127.0.0.1; and the failures a user meets (missing camera, truncated video,
unreachable RTSP address, tampered bundle, a stream that dies).
"""
from __future__ import annotations

import http.server
import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import device_env, free_port, needs_openvino, needs_torch

pytestmark = [needs_torch, needs_openvino]


def runner(python: Path, bundle: Path, *args: str, timeout: int = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), "runner.py", *args], cwd=bundle, capture_output=True, text=True,
                          env=device_env(), timeout=timeout)


def summary_of(stderr: str) -> dict:
    line = next(ln for ln in stderr.splitlines() if ln.startswith("summary: "))
    return json.loads(line[len("summary: "):])


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def test_video_headless_json_save_and_summary(openvino_venv, bundle, camvid_video, tmp_path):
    out, js = tmp_path / "out.avi", tmp_path / "frames.jsonl"
    res = runner(openvino_venv, bundle, str(camvid_video), "--headless", "--jsonl", str(js), "--save", str(out))
    assert res.returncode == 0, res.stderr
    records = [json.loads(ln) for ln in js.read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(1, 102))  # every frame, in order
    for r in records:
        assert r["latency_ms"] > 0 and r["e2e_ms"] >= r["latency_ms"] * 0.5
        assert abs(sum(r["areas"].values()) - 100.0) < 0.2
    summary = summary_of(res.stderr)
    assert summary["frames"] == 101 and summary["fps"] > 0 and summary["corrupt"] == 0
    assert summary["latency_p99_ms"] >= summary["latency_p50_ms"] > 0
    import cv2

    cap = cv2.VideoCapture(str(out))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 101
    ok, frame = cap.read()
    assert ok and frame.shape == (360, 480, 3)


def test_synthetic_source_and_max_frames(openvino_venv, bundle):
    res = runner(openvino_venv, bundle, "synthetic://3?width=320&height=240", "--headless", "--max-frames", "12",
                 "--jsonl", "-")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert len(lines) == 12 and "road" in lines[0]["areas"]
    assert summary_of(res.stderr)["frames"] == 12


def test_image_folder_counts_corrupt_files(openvino_venv, bundle, camvid, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for p in sorted((camvid / "val").glob("*.png"))[:5]:
        shutil.copy(p, folder / p.name)
    (folder / "0000_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    res = runner(openvino_venv, bundle, str(folder), "--headless")
    assert res.returncode == 0, res.stderr
    s = summary_of(res.stderr)
    assert s["frames"] == 5 and s["corrupt"] == 1
    # OpenCV's own decoder lines are silenced: the summary counts the broken file, nothing else speaks of it
    assert [ln for ln in res.stderr.splitlines() if not ln.startswith(("summary:", "warning:"))] == [], res.stderr


def test_image_folder_skips_an_image_over_max_pixels_unread(openvino_venv, bundle, camvid, tmp_path):
    from tests.runner.test_serve import png_bomb

    folder = tmp_path / "frames"
    folder.mkdir()
    for p in sorted((camvid / "val").glob("*.png"))[:3]:
        shutil.copy(p, folder / p.name)
    (folder / "0000_huge.png").write_bytes(png_bomb(12000, 12000))
    res = runner(openvino_venv, bundle, str(folder), "--headless")
    assert res.returncode == 0, res.stderr
    warned = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and "0000_huge.png is 12000x12000 (144 MP), over the limit of 40 MP" in warned[0]
    s = summary_of(res.stderr)
    assert s["frames"] == 3 and s["corrupt"] == 1 and s["max_rss_mb"] < 400, s


def test_truncated_video_is_a_clear_error(openvino_venv, bundle, camvid_video, tmp_path):
    cut = tmp_path / "cut.avi"
    data = camvid_video.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    res = runner(openvino_venv, bundle, str(cut), "--headless")
    assert res.returncode != 0
    errors = error_lines(res.stderr)
    assert len(errors) == 1 and "truncated" in errors[0] and "of the 101 frames" in errors[0], res.stderr
    assert 0 < summary_of(res.stderr)["frames"] < 101 and "Traceback" not in res.stderr


def test_unreachable_rtsp_and_missing_camera(openvino_venv, bundle):
    t = time.time()
    res = runner(openvino_venv, bundle, f"rtsp://127.0.0.1:{free_port()}/live", "--headless", "--timeout", "3")
    assert res.returncode != 0 and time.time() - t < 60
    errors = error_lines(res.stderr)
    assert len(errors) == 1 and "cannot open stream rtsp://127.0.0.1" in errors[0], res.stderr
    res = runner(openvino_venv, bundle, "/dev/video97", "--headless")
    errors = error_lines(res.stderr)
    assert res.returncode != 0 and len(errors) == 1 and "/dev/video97 does not exist" in errors[0], res.stderr
    res = runner(openvino_venv, bundle, "no-such-clip.mp4", "--headless")
    assert res.returncode != 0 and "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_tampered_bundle_refused_in_device_venv(openvino_venv, bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    golden = next(n for n in m["files"] if n.startswith("golden/") and n.endswith(".npy"))
    with open(copy / golden, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x7f")
    res = runner(openvino_venv, copy, "synthetic://", "--headless", "--max-frames", "3")
    assert res.returncode != 0 and golden in res.stderr and "sha256" in res.stderr
    res = runner(openvino_venv, copy, "--selftest")
    assert res.returncode != 0 and "selftest: FAIL" in res.stdout


def test_sigterm_stops_cleanly_with_summary(openvino_venv, bundle):
    proc = subprocess.Popen([str(openvino_venv), "runner.py", "synthetic://?width=320&height=240", "--headless"],
                            cwd=bundle, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=device_env())
    time.sleep(4)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    s = summary_of(err)
    assert s["stopped_by_signal"] and s["frames"] > 0


def bench_of(stdout: str) -> dict:
    return json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("bench: "))[len("bench: "):])


def test_bench_prints_end_to_end_and_inference_only_fps(openvino_venv, bundle, camvid_video):
    res = runner(openvino_venv, bundle, str(camvid_video), "--headless", "--bench", "--max-frames", "80",
                 "--bench-rounds", "2")
    assert res.returncode == 0, res.stderr
    assert "inference only" in res.stdout and "end to end" in res.stdout and "per frame beside inference" in res.stdout
    b = bench_of(res.stdout)
    assert b["frames"] == 80 and b["rounds"] == 2 and b["inference_only_fps"] > 0 and b["end_to_end_fps"] > 0
    assert b["ratio"] == pytest.approx(b["end_to_end_fps"] / b["inference_only_fps"], rel=0.01)
    assert b["capture_ms"] > 0 and b["preprocess_ms"] > 0 and b["postprocess_ms"] > 0
    assert not b["live_source"]
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("bench round ")]) == 2  # progress
    # The default leaves one CPU to capture; the bench then also measures the engine on all of them.
    cpus = b["cpus"]
    if cpus >= 2 and b.get("all_threads"):
        assert b["inference_threads"] == min(b["all_threads"], cpus - 1)
        assert b["inference_only_fps_all_threads"] > 0 and b["end_to_end_fps_all_threads"] > 0


def test_threads_option_sets_the_engine(openvino_venv, bundle, camvid_video):
    res = runner(openvino_venv, bundle, str(camvid_video), "--headless", "--bench", "--max-frames", "30",
                 "--bench-rounds", "1", "--threads", "1", "--decode-threads", "0")
    assert res.returncode == 0, res.stderr
    b = bench_of(res.stdout)
    assert b["inference_threads"] == 1 and "1 thread" in b["runtime"]
    if "all_threads" in b:  # the runtime's own choice differs: it is measured beside
        assert b["all_threads"] != 1 and "with all %d threads" % b["all_threads"] in res.stdout
    res = runner(openvino_venv, bundle, str(camvid_video), "--headless", "--max-frames", "20", "--threads", "0")
    assert res.returncode == 0, res.stderr
    s = summary_of(res.stderr)
    assert s["frames"] == 20 and s["inference_threads"] >= 1


def test_hint_option_sets_openvinos_performance_hint(openvino_venv, bundle, camvid_video):
    """A video file runs with the throughput hint unless told; --hint latency gives the bundle's own back."""
    for extra, hint in (([], "throughput"), (["--hint", "latency"], "latency")):
        res = runner(openvino_venv, bundle, str(camvid_video), "--headless", "--bench", "--max-frames", "30",
                     "--bench-rounds", "1", "--threads", "0", *extra)
        assert res.returncode == 0, res.stderr
        b = bench_of(res.stdout)
        assert "%s hint" % hint in b["runtime"] and b["end_to_end_fps"] > 0, b["runtime"]


class _Stream:
    """An HTTP server on 127.0.0.1 that serves a video slowly, as a live stream does, and can die."""

    def __init__(self, payload: bytes, port: int = 0) -> None:
        payload_ = payload

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "video/x-msvideo")
                self.send_header("Content-Length", str(len(payload_)))
                self.end_headers()
                try:
                    for i in range(0, len(payload_), 64 * 1024):
                        self.wfile.write(payload_[i:i + 64 * 1024])
                        time.sleep(0.05)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/cam.avi"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kill(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_lost_stream_is_reopened_with_backoff_then_given_up(openvino_venv, bundle, camvid_video):
    stream = _Stream(camvid_video.read_bytes())
    proc = subprocess.Popen([str(openvino_venv), "runner.py", stream.url, "--headless", "--reconnect", "2",
                             "--timeout", "2"], cwd=bundle, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=device_env())
    time.sleep(3)
    stream.kill()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "reopening (attempt 1/2" in err and "reopening (attempt 2/2" in err, err
    errors = error_lines(err)
    assert len(errors) == 1 and "could not be reopened after 2 attempts" in errors[0], err
    assert summary_of(err)["frames"] > 0  # what ran before the loss is summarised


def test_stream_that_comes_back_is_reconnected(openvino_venv, bundle, camvid_video):
    payload = camvid_video.read_bytes()
    stream = _Stream(payload)
    port = stream.server.server_address[1]
    proc = subprocess.Popen([str(openvino_venv), "runner.py", stream.url, "--headless", "--reconnect", "5",
                             "--timeout", "2", "--max-frames", "150"], cwd=bundle, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=device_env())
    time.sleep(1.5)
    stream.kill()
    back = _Stream(payload, port)  # the camera comes back at the same address
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        back.kill()
    assert proc.returncode == 0, err
    s = summary_of(err)
    assert s["reconnects"] >= 1 and s["frames"] == 150, s


def test_openvino_engine_returns_every_result_in_order(bundle):
    """The runner's OpenVINO engine (infer requests in turn, no callbacks on inference threads)."""
    import numpy as np

    from edgeport.backends.openvino.runner import open_runtime
    from edgeport.runner.manifest import load_manifest

    manifest = load_manifest(str(bundle))
    rt = open_runtime(manifest, str(bundle), "CPU", 1)
    assert rt.threads == 1
    shape = manifest["inputs"][0]["shape"]
    xs = [np.random.default_rng(i).random(shape, dtype=np.float32) for i in range(9)]
    expected = [rt.infer({"image": x})["output"] for x in xs]
    for jobs in (1, 2, 3):
        got: list[tuple[int, np.ndarray, float]] = []
        engine = rt.make_async(lambda u, outs, ms=None, got=got: got.append((u, outs["output"], ms)), jobs)
        for i, x in enumerate(xs):
            engine.submit({"image": x}, i)
        engine.wait_all()
        assert [g[0] for g in got] == list(range(len(xs)))
        for i, out, ms in got:
            np.testing.assert_allclose(out, expected[i], rtol=1e-4, atol=1e-4)
            assert ms is None or ms > 0
