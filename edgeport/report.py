"""Build reports for CI: JSON, JUnit XML (one test case per target and output) and Markdown.

The same figures as the terminal table: parity against PyTorch per output, and, with labelled
validation data, the task metric, its drop from FP32 and the agreement with FP32.
"""
from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from edgeport.pipeline import BuildReport, fallback_line, pruning_line
from edgeport.tables import points


def cases(report: BuildReport) -> list[dict[str, Any]]:
    """One case per (target, output) plus one per target accuracy check; each passed, failed or skipped."""
    out: list[dict[str, Any]] = []
    for name, m in report.export_parity.items():
        ok = m.get("ok", True)  # a failed export stops the build before any report
        out.append({"suite": "onnx-export", "name": f"onnx {name}", "status": "passed" if ok else "failed",
                    "message": "; ".join(m.get("failed", [])), "metrics": m, "seconds": 0.0})
    for r in report.targets:
        suite = f"{r.target}-{r.precision}"
        if r.status == "skipped" or (r.status == "failed" and not r.parity):
            out.append({"suite": suite, "name": f"{suite} build", "status": "skipped" if r.status == "skipped"
                        else "failed", "message": r.message, "metrics": {}, "seconds": r.seconds})
            continue
        if not r.parity:
            out.append({"suite": suite, "name": f"{suite} host parity", "status": "skipped",
                        "message": f"{r.backend}: runs only on the device", "metrics": {}, "seconds": r.seconds})
        for name, m in r.parity.items():
            out.append({"suite": suite, "name": f"{suite} {name}", "status": "passed" if m["ok"] else "failed",
                        "message": "; ".join(m.get("failed", [])), "metrics": m, "seconds": r.seconds})
        if r.accuracy and r.accuracy.get("drop") is not None:
            ok = r.accuracy.get("ok", True)
            out.append({"suite": suite, "name": f"{suite} {r.accuracy['metric']}",
                        "status": "passed" if ok else "failed", "message": "" if ok else r.message,
                        "metrics": r.accuracy, "seconds": 0.0})
    return out


def to_json(report: BuildReport) -> dict[str, Any]:
    """Everything in the report as plain JSON types."""
    return {"model": report.model, "onnx": report.onnx, "seconds": report.seconds, "ok": report.ok,
            "export_parity": report.export_parity, "reference_metrics": report.reference_metrics,
            "validation_source": report.validation_source,
            "targets": [vars(t) for t in report.targets], "cases": cases(report),
            "stages": [vars(s) for s in report.stages], "compiles": report.compiles, "artifacts": report.artifacts,
            "pruning": report.pruning}


def junit_xml(title: str, all_cases: list[dict[str, Any]]) -> str:
    """JUnit XML from cases (suite, name, status, message, metrics, seconds): a testsuite per suite."""
    root = ET.Element("testsuites", name=title, tests=str(len(all_cases)),
                      failures=str(sum(c["status"] == "failed" for c in all_cases)),
                      skipped=str(sum(c["status"] == "skipped" for c in all_cases)))
    suites: dict[str, ET.Element] = {}
    for c in all_cases:
        if c["suite"] not in suites:
            suites[c["suite"]] = ET.SubElement(root, "testsuite", name=c["suite"])
        case = ET.SubElement(suites[c["suite"]], "testcase", classname=f"edgeport.{c['suite']}", name=c["name"],
                             time=f"{c['seconds']:.3f}")
        if c["status"] == "failed":
            ET.SubElement(case, "failure", message=c["message"] or "failed").text = json.dumps(c["metrics"],
                                                                                               default=str)
        elif c["status"] == "skipped":
            ET.SubElement(case, "skipped", message=c["message"])
    for s in suites.values():
        mine = [c for c in all_cases if c["suite"] == s.get("name")]
        s.set("tests", str(len(mine)))
        s.set("failures", str(sum(c["status"] == "failed" for c in mine)))
        s.set("skipped", str(sum(c["status"] == "skipped" for c in mine)))
    return ET.tostring(root, encoding="unicode", xml_declaration=True)


def to_junit(report: BuildReport) -> str:
    """JUnit XML: a testsuite per target, a testcase per output (and accuracy check)."""
    return junit_xml(f"edgeport {report.model}", cases(report))


def to_markdown(report: BuildReport) -> str:
    """A CI job summary: the parity table as Markdown, then the failures."""
    from edgeport.tables import md_table

    rows = []
    for r in report.targets:
        m = next(iter(r.parity.values()), None)
        a = r.accuracy
        metric = "-"
        if a and a.get("drop") is not None:
            key = a["metric"]
            lim = a.get("max_drop")
            metric = f"{key} {a['metrics'][key]:.2f} ({points(-a['drop'], -lim if lim is not None else None, True)})"
        cells = [r.target, r.backend, r.precision]
        cells += [f"{m['max_rel']:.1e}", f"{m['cosine']:.6f}", f"{100 * m['agreement']:.2f}%"] if m else ["-"] * 3
        rows.append([*cells, metric, r.status])
    head = ["target", "backend", "precision", "max_rel", "cosine", "agreement", "metric (drop)", "status"]
    lines = [f"## edgeport: {report.model}", "", *md_table(head, rows), ""]
    if report.pruning:
        lines += [f"- {pruning_line(report.pruning, 'recovery.png' if report.recovery_chart else None)}; every drop "
                  "is against the original (unpruned) model", ""]
    fallbacks = [f"- {r.target}-{r.precision}: {fallback_line(r.fallback)}" for r in report.targets if r.fallback]
    if fallbacks:
        lines += [*fallbacks, ""]
    if report.reference_metrics:
        lines += [f"Task metric on {report.validation_source}; FP32 reference: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in report.reference_metrics.items() if k != "count"), ""]
    bad = [c for c in cases(report) if c["status"] == "failed"]
    lines.append(f"**{len(bad)} failed check(s)**" if bad else "**all checks passed**")
    lines += [f"- {c['name']}: {c['message']}" for c in bad]
    return "\n".join(lines) + "\n"


def write_reports(report: BuildReport, folder: Path) -> list[Path]:
    """report.json, report.junit.xml and report.md in ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "report.json", folder / "report.junit.xml", folder / "report.md"]
    paths[0].write_text(json.dumps(to_json(report), indent=2, default=str) + "\n")
    paths[1].write_text(to_junit(report) + "\n")
    paths[2].write_text(to_markdown(report))
    if report.recovery_chart and Path(report.recovery_chart).is_file():  # the pruned model's distillation loss
        paths.append(folder / "recovery.png")
        shutil.copyfile(report.recovery_chart, paths[-1])
    return paths
