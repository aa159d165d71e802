"""What a build reports: its result per target, the terminal tables, and the CI reports.

The terminal tables (parity, stages, the summary line) and the files for CI (JSON, JUnit XML with one test case
per target and output, Markdown): the same figures, parity against PyTorch per output and, with labelled
validation data, the task metric, its drop from FP32 and the agreement with FP32.
"""
from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeport.errors import ParityError
from edgeport.tables import points, text_table
from edgeport.tasks import metric_cell


@dataclass
class StageTime:
    """One stage of a build, what it served and what it cost (the build's stage table)."""

    stage: str
    serves: str
    seconds: float
    cached: bool


@dataclass
class TargetResult:
    """One target's outcome, for the parity table and the API."""

    target: str
    backend: str
    precision: str
    status: str  # built | cached | failed | skipped
    bundle: str | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    message: str = ""
    accuracy: dict[str, Any] | None = None  # task metric on labelled data, drop and agreement vs FP32
    verdict: str | None = None  # passed | failed | device-only (the manifest's verdict.status)
    fallback: dict[str, Any] | None = None  # accuracy-aware INT8: layers kept in float, drop before and after
    compile_cached: bool = False  # its artifact came from the build cache (the bundle may still be rewritten)

@dataclass
class BuildReport:
    """What a build did."""

    model: str
    onnx: str
    export_cached: bool
    export_parity: dict[str, Any]
    targets: list[TargetResult]
    seconds: float
    reference_metrics: dict[str, float] | None = None
    validation_source: str | None = None
    stages: list[StageTime] = field(default_factory=list)
    compiles: int = 0  # artifact compiles that ran (not from the cache)
    artifacts: int = 0  # distinct artifacts the selected targets need
    pruning: dict[str, Any] | None = None  # what pruning cost against the original (pruning_check)
    recovery_chart: str | None = None  # the distillation loss curve (PNG), when recovery ran

    @property
    def ok(self) -> bool:
        """True when every target built and passed parity."""
        return all(t.status in ("built", "cached") for t in self.targets)

def stage_table(report: BuildReport) -> str:
    """Where the build's time went: one row per stage, what it served, its seconds, cached or run."""
    rows = [[s.stage, s.serves, f"{s.seconds:.1f}s", "cached" if s.cached else "ran"] for s in report.stages]
    lines = text_table(["stage", "serves", "time", ""], rows)
    lines.append(f"{report.compiles} compile(s) run for {len(report.targets)} bundle(s) ({report.artifacts} distinct "
                 "artifact(s))")
    return "\n".join(lines)

def parity_table(report: BuildReport) -> str:
    """The terminal table printed at the end of a build.

    max_rel, cosine and agreement compare each artifact with PyTorch on the sample frames;
    with labelled validation data, the task metric (mIoU or top-1) and its drop from FP32 follow.
    """
    has_acc = report.reference_metrics is not None
    head = ["target", "backend", "precision", "max_rel", "cosine", "agreement"]
    if has_acc:
        head += ["val agree", "metric (drop)"]
    rows = [tuple(head + ["status", "time"])]
    ex = next(iter(report.export_parity.values()))
    pr = report.pruning
    extra = ["-", _metric_cell(report.reference_metrics)] if has_acc else []
    if pr:  # the original is the reference; the export is the pruned model, with its drop
        rows.append(("original (unpruned)", "onnxruntime", "fp32", "-", "-", "-", *extra, "reference", ""))
        extra = ["-", f"{metric_cell({pr['metric']: pr['pruned']}) or pr['pruned']} "
                      f"({_signed_drop({'drop': pr['drop'], 'max_drop': pr['max_drop']})})"]
    rows.append(("onnx (export)" if not pr else f"onnx (pruned {pr['ratio']:.0%})", "onnxruntime", "fp32",
                 f"{ex['max_rel']:.1e}", f"{ex['cosine']:.6f}", "-", *extra,
                 "cached" if report.export_cached else "built", ""))
    for r in report.targets:
        m = next(iter(r.parity.values()), None)
        cells = [r.target, r.backend, r.precision, f"{m['max_rel']:.1e}" if m else "-",
                 f"{m['cosine']:.6f}" if m else "-", f"{100 * m['agreement']:.2f}%" if m else "-"]
        if has_acc:
            a = r.accuracy
            cells += [f"{100 * a['agreement']:.2f}%" if a else "-",
                      f"{_metric_cell(a['metrics'])} ({_signed_drop(a)})" if a and a["drop"] is not None else "-"]
        rows.append(tuple(cells + [r.status, f"{r.seconds:.1f}s"]))
    lines = text_table(list(rows[0]), [list(r) for r in rows[1:]])
    if has_acc and not pr:
        lines.append(f"metric on {report.validation_source}; onnx row = FP32 reference")
    if has_acc and pr:
        lines.append(f"metric on {report.validation_source}; every drop is against the original (unpruned) model; "
                     "max_rel, cosine and agreement compare each artifact with the pruned model it converts")
        lines.append(pruning_line(pr, report.recovery_chart))
        conv = [f"{r.target}-{r.precision} {_signed_drop({'drop': r.accuracy['drop_vs_pruned']})}"
                for r in report.targets if r.accuracy and r.accuracy.get("drop_vs_pruned") is not None]
        if conv:
            lines.append(f"against the pruned FP32 ({pr['metric']} {pr['pruned']:.2f}): " + ", ".join(conv))
    if (ev := evidence_line(report)) is not None:
        lines.append(ev)
    for r in report.targets:
        if r.fallback:
            lines.append(f"{r.target}-{r.precision}: {fallback_line(r.fallback)}")
    for r in report.targets:
        if r.message:
            lines.append(f"{r.target}-{r.precision}: {r.message}")
    return "\n".join(lines)

def pruning_line(pr: dict[str, Any], chart: str | None) -> str:
    """One line for what pruning did: ratio, size and MACs before and after, the recovery, the metric's path."""
    before, after = pr.get("before") or {}, pr.get("after") or {}
    size = ""
    if before and after:
        size = (f", params {before['params'] / 1e3:.0f}k -> {after['params'] / 1e3:.0f}k, MACs "
                f"{before['macs'] / 1e6:.1f}M -> {after['macs'] / 1e6:.1f}M")
    rec = pr.get("recovery")
    how = (f"recovered by distillation ({rec['steps']} steps, {rec['seconds']:.0f}s, {rec['images']} unlabelled "
           f"images{'; loss curve ' + chart if chart else ''})" if rec else
           f"fine-tuned by {pr['finetuned']}" if pr.get("finetuned") else "not recovered")
    return (f"pruning {pr['ratio']:.0%}{size}; {how}; {pr['metric']} {pr['original']:.2f} original -> "
            f"{pr['pruned']:.2f} pruned")

def fallback_line(fb: dict[str, Any]) -> str:
    """One line for an accuracy-aware INT8 result: what was kept in float and the drop before and after."""
    lim = fb["max_drop"]
    drops = (f"{fb['metric']} drop {points(fb['drop_before'], lim)} -> {points(fb['drop_after'], lim)}"
             if fb.get("drop_before") is not None and fb.get("drop_after") is not None else "drop not measured")
    if fb.get("held_after") is not None and fb["held_after"] > (fb.get("drop_after") or 0.0):
        drops += f" (worse of its halves {points(fb['held_after'], lim)})"
    kept = ", ".join(fb["kept_float"]) if fb["kept_float"] else "nothing"
    return (f"accuracy-aware INT8 ({fb['by']}) kept in float: {kept}; {drops} on the selection half "
            f"({fb['images']} images, {'agreement allowed to drop' if fb['metric'] == 'agreement' else 'max_drop'} "
            f"{lim:g})" + ("" if fb.get("met", True) else ", NOT met")
            + (f"; {ranges_line(fb['ranges'])}" if fb.get("ranges") else "")
            + (f"; {reverted_line(fb['reverted'])}" if fb.get("reverted") else "")
            + (f"; {gap_line(fb['symmetric_gap'])}" if fb.get("symmetric_gap") else ""))


def gap_line(gap: dict[str, Any]) -> str:
    """TensorRT's agreement with FP32 against its unsigned twin's, and the layers that closed the gap in FP16."""
    layers = (f"{len(gap['layers'])} layer(s) in FP16 ({', '.join(gap['layers'])}; {100 * gap['macs_share']:.1f} % "
              "of the multiply-accumulates)" if gap["layers"] else "no layer in FP16")
    return (f"symmetric INT8 agrees {gap['before']:.3f} -> {gap['after']:.3f} % with FP32 against its unsigned twin's "
            f"{gap['unsigned_twin']:.3f} % on {gap['frames']} frames, {layers}"
            + ("" if gap["met"] else f", NOT within {gap['margin']:g} points"))


def reverted_line(rv: dict[str, Any]) -> str:
    """NNCF's layers put back in float against plain INT8: the agreement gain with its 95 % interval, and
    whether they were kept."""
    lo, hi = rv["interval"]
    verdict = ("kept: its interval clears zero" if rv["taken"] and rv["by"] == "agreement interval" else
               "kept by the labelled metric" if rv["taken"] else "not kept: plain INT8 ships")
    return (f"NNCF's float layers agree {rv['gain']:+.3f} [{lo:+.3f}, {hi:+.3f}] points over plain INT8 on "
            f"{rv['frames']} frames ({verdict})")


def ranges_line(choice: dict[str, Any]) -> str:
    """The activation-range choice with its evidence: each method's agreement with FP32 and its gain over the
    default with the 95 % interval."""
    if not choice["over_default"]:
        return f"ranges {choice['chosen']}"
    gains = ", ".join(f"{m} {g['gain']:+.3f} [{g['interval'][0]:+.3f}, {g['interval'][1]:+.3f}]"
                      for m, g in choice["over_default"].items())
    why = ("its interval clears the default" if choice["chosen"] != choice["default"] else "no interval clears it") \
        if choice.get("by", "agreement") == "agreement" else "chosen by the labelled metric's drop held"
    return (f"ranges {choice['chosen']} ({choice['default']} agrees {choice['agreement'][choice['default']]:.3f} % "
            f"with FP32; over it: {gains} points, resampling {next(iter(choice['over_default'].values()))['resampled']}"
            f"; {why})")

def evidence_line(report: BuildReport) -> str | None:
    """How far each artifact's change on the report half could move: its 95 % interval and, when the half spans
    several sequences, the change with each left out in turn (edgeport.quantize.evidence.drop_evidence); targets
    that share an artifact's figures share an entry. None when no artifact has an interval."""
    entries: dict[str, list[str]] = {}
    how = ""
    for r in report.targets:
        a = r.accuracy
        if not a or a.get("drop") is None or not a.get("interval"):
            continue
        lo, hi = a["interval"]
        text = f"{-a['drop']:+.2f} [{-hi:+.2f}, {-lo:+.2f}]"
        loso = a.get("leave_one_sequence_out")
        if loso:
            text += (f", one of {len(loso['drops'])} sequences left out {-loso['spread'][1]:+.2f} to "
                     f"{-loso['spread'][0]:+.2f}")
        entries.setdefault(text, []).append(f"{r.target}-{r.precision}")
        how = a.get("resampled") or how
    if not entries:
        return None
    metric = next(r.accuracy["metric"] for r in report.targets if r.accuracy and r.accuracy.get("interval"))
    return (f"{metric} change on the report half, 95 % interval ({how}): "
            + "; ".join(f"{', '.join(names)} {text}" for text, names in entries.items()))


def _signed_drop(a: dict[str, Any]) -> str:
    """The change from FP32 (minus the drop), with the digits that tell it from -max_drop."""
    lim = a.get("max_drop")
    return points(-a["drop"], -lim if lim is not None else None, signed=True)

def _metric_cell(m: dict[str, float] | None) -> str:
    if not m:
        return "-"
    return metric_cell(m) or (f"agree {m['agreement']:.2f}" if "agreement" in m else "-")

def summary_line(report: BuildReport) -> str:
    """The build's last line: how many bundles were built, came from the cache, failed or were skipped.

    "nothing changed" only when nothing was built, failed or skipped.
    """
    counts = {k: sum(r.status == k for r in report.targets) for k in ("built", "cached", "failed", "skipped")}
    if report.export_cached and not (counts["built"] or counts["failed"] or counts["skipped"]):
        return f"nothing changed: {counts['cached']} bundle(s) from the cache ({report.seconds:.1f}s)"
    parts = [f"{counts[k]} {k}" for k in ("built", "cached", "failed")] + \
        ([f"{counts['skipped']} skipped"] if counts["skipped"] else [])
    rewritten = sum(r.status == "built" and r.compile_cached for r in report.targets)
    if rewritten:  # bundles written anew around an artifact that came from the cache (no compile ran for them)
        parts[0] += f" ({rewritten} of them from cached compiles)"
    line = f"{len(report.targets)} target(s): {', '.join(parts)} in {report.seconds:.1f}s"
    good = sorted({str(Path(r.bundle).parent) for r in report.targets if r.bundle and r.status != "failed"})
    bad = sorted({str(Path(r.bundle).parent) for r in report.targets if r.bundle and r.status == "failed"})
    if good:
        line += f"; bundles in {', '.join(good)}"
    if bad:
        line += f"; failed bundles (not shippable) in {', '.join(bad)}"
    return line

def raise_on_failure(report: BuildReport) -> None:
    """ParityError naming every failed target (after the table has been printed)."""
    bad = [f"{r.target}-{r.precision}" for r in report.targets if r.status == "failed"]
    if bad:
        raise ParityError(f"{len(bad)} target(s) failed: {', '.join(bad)} (see the table above); nothing of them "
                          "ships")


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
        elif r.accuracy and r.accuracy.get("agreement") is not None:  # a plain image folder: agreement gates
            failed = r.verdict == "failed" and "agreement" in r.message and "report half" in r.message
            out.append({"suite": suite, "name": f"{suite} agreement (report half)",
                        "status": "failed" if failed else "passed", "message": r.message if failed else "",
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
    if (ev := evidence_line(report)) is not None:
        lines += [f"- {ev}", ""]
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
