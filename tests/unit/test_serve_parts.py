"""The runner service's pieces that need no server: the bind address, tegrastats lines, multipart uploads,
DeepStack's predictions and the Prometheus text."""
from __future__ import annotations

import re
import time
from types import SimpleNamespace

import pytest

from edgeport.runner.engine import LatencyStats
from edgeport.runner.http import parse_multipart
from edgeport.runner.serve import Service, parse_bind, tegrastats_figures


def test_bind_addresses():
    assert parse_bind("8080") == ("127.0.0.1", 8080)  # loopback unless a host is given
    assert parse_bind(":8080") == ("127.0.0.1", 8080)
    assert parse_bind("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_bind("[::1]:9000") == ("::1", 9000)
    for bad in ("http", "host:", "1.2.3.4:70000", "-1"):
        with pytest.raises(ValueError, match="HOST:]PORT"):
            parse_bind(bad)


def test_tegrastats_lines_of_each_jetson_generation():
    orin = ("12-01-2026 10:00:00 RAM 2120/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) CPU [2%@729,1%@729,0%@729,"
            "0%@729,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 37%@[305,0] cpu@47.5C soc2@45.2C VDD_IN 5123mW/4990mW "
            "VDD_CPU_GPU_CV 612mW/598mW VDD_SOC 1434mW/1430mW")
    nano = ("RAM 1534/3964MB (lfb 120x4MB) SWAP 0/1982MB (cached 0MB) CPU [5%@1479,3%@1479,2%@1479,1%@1479] "
            "EMC_FREQ 3%@1600 GR3D_FREQ 12%@921 APE 25 PLL@31C CPU@33.5C POM_5V_IN 2946/2810 POM_5V_GPU 123/110")
    assert tegrastats_figures(orin) == {"gpu_load_percent": 37.0, "power_watts": 5.123}
    assert tegrastats_figures(nano) == {"gpu_load_percent": 12.0, "power_watts": 2.946}
    assert tegrastats_figures("RAM 100/200MB") == {}


def test_multipart_fields_and_the_first_file():
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"min_confidence\"\r\n\r\n0.6\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"upload\"; filename=\"a.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n\xff\xd8binary\r\n\r\n--XyZ--\r\n")
    fields = parse_multipart(body, "multipart/form-data; boundary=XyZ")
    assert fields["min_confidence"] == b"0.6"
    assert fields["upload"] == fields[""] == b"\xff\xd8binary\r\n"  # bytes kept as sent, CRLF inside included
    assert parse_multipart(body, "multipart/form-data") == {}


def test_deepstack_predictions_from_a_detection_record():
    from edgeport.runner.task import TaskPart, task_part

    record = {"detections": [{"box": [10.4, 20.6, 110.0, 220.2], "class": 0, "label": "car", "score": 0.91},
                             {"box": [0, 0, 5, 5], "class": 1, "label": "person", "score": 0.2}]}
    part = task_part("detection")
    got = part.deepstack(part.__new__(part), record, 0.5)
    assert got == [{"label": "car", "confidence": 0.91, "x_min": 10, "y_min": 21, "x_max": 110, "y_max": 220}]
    assert TaskPart.deepstack(None, record, 0.0) is None  # other tasks detect nothing


def test_metrics_are_prometheus_text():
    manifest = {"model": {"name": "m"}, "target": "intel-cpu", "precision": "int8", "backend": "openvino",
                "preprocess": {"task": "segmentation"}, "edgeport": "0.1.0", "build_key": "abc"}
    svc = Service(manifest, SimpleNamespace(timeout=5.0, source_open=True), "127.0.0.1", 0)
    lat = LatencyStats()
    for ms in (1.0, 2.0, 3.0):
        lat.add(ms)
    svc.bind_loop(lat=lat, e2e=lat, state={"emitted": 3}, grabber=SimpleNamespace(dropped=1),
                  source=SimpleNamespace(corrupt=0, reconnects=2), t0=time.time() - 1.5)
    svc.count("/infer", 200)
    text = svc.metrics_text()
    value = r"([-+]?[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?|[-+]?Inf|NaN)"
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})? ' + value + "$")
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert "edgeport_frames_total 3.0" in text and "edgeport_source_reconnects_total 2.0" in text
    assert "edgeport_frames_dropped_total 1.0" in text and "edgeport_ready 0" in text  # nothing is ready yet
    assert 'edgeport_inference_latency_ms_count 3' in text
    assert 1.5 < float(re.search(r"^edgeport_fps (\S+)$", text, re.M).group(1)) < 2.1
    assert 'edgeport_http_requests_total{path="/infer",code="200"} 1.0' in text
