"""CI reports: JUnit XML parses with a standard parser and its counts match the build table."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from tests.conftest import ROOT, needs_openvino, needs_torch, run_cli

pytestmark = [needs_torch, needs_openvino]


def _table_rows(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("target "))
    rows = []
    for ln in lines[start + 2:]:
        if not ln or ln.startswith(("metric on", "built", "nothing", "wrote")) or ": " in ln:
            break
        rows.append(ln.split())
    return rows


def test_reports_match_the_table_and_fail_with_the_build(tmp_path):
    targets = tmp_path / "targets"
    targets.mkdir()
    strict = (ROOT / "targets" / "intel-cpu.toml").read_text().replace(
        "# Intel CPU (OpenVINO, CPU plugin)", "# a CI profile with a tolerance INT8 cannot meet")
    (targets / "strict-cpu.toml").write_text(strict + "\n[tolerance.int8]\nmin_cosine = 0.9999999\n")
    res = run_cli("build", "--target", "intel-cpu:int8", "--target", "strict-cpu:int8", "--target",
                  "jetson-nano:fp16", "--val-images", "synthetic://?n=16", "--report", "reports", cwd=tmp_path)
    assert res.returncode == 3, res.stderr[-2000:]  # strict-cpu fails parity
    rows = _table_rows(res.stdout)
    assert [r[0] for r in rows] == ["onnx", "intel-cpu", "strict-cpu", "jetson-nano"]

    root = ET.parse(tmp_path / "reports" / "report.junit.xml").getroot()
    cases = root.findall(".//testcase")
    failed = [c for c in cases if c.find("failure") is not None]
    skipped = [c for c in cases if c.find("skipped") is not None]
    # export output + (output + mIoU) for each INT8 target + the device-only target
    assert int(root.get("tests")) == len(cases) == 1 + 2 + 2 + 1
    assert int(root.get("failures")) == len(failed) == 1 and "strict-cpu" in failed[0].get("name")
    assert "cosine" in failed[0].find("failure").get("message")
    assert int(root.get("skipped")) == len(skipped) == 1 and "jetson-nano" in skipped[0].get("name")
    statuses = {r[0]: r[-2] for r in rows[1:]}
    assert statuses == {"intel-cpu": "built", "strict-cpu": "failed", "jetson-nano": "built"}

    md = (tmp_path / "reports" / "report.md").read_text()
    assert "| strict-cpu | openvino | int8 |" in md and "**1 failed check(s)**" in md
    data = json.loads((tmp_path / "reports" / "report.json").read_text())
    assert data["ok"] is False and len(data["cases"]) == len(cases)
