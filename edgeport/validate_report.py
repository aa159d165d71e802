"""What `edgeport validate` found, and how it is told: the checks per bundle, the terminal table, JSON, JUnit XML,
Markdown for a CI job summary, the benchmark table and chart."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeport.backends import REGISTRY, get_backend
from edgeport.build.report import junit_xml
from edgeport.errors import ParityError
from edgeport.evaluate import primary
from edgeport.tables import md_table, points, text_table
from edgeport.tasks import metric_cell


@dataclass
class Case:
    """One check: a bundle's output against the reference, its task metric, or its files."""

    bundle: str
    backend: str
    precision: str
    check: str
    status: str  # passed | failed | skipped
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    seconds: float = 0.0


@dataclass
class BundleResult:
    """Everything validate found about one bundle."""

    name: str
    path: str
    target: str
    backend: str
    precision: str
    runtime: str  # what ran it on this host
    size_mb: float
    cases: list[Case] = field(default_factory=list)
    metrics: dict[str, float] | None = None  # task metrics on the labelled set
    latency: dict[str, float] | None = None
    localize: dict[str, Any] | None = None

    @property
    def status(self) -> str:
        """validated | failed | built (nothing could run here)."""
        if any(c.status == "failed" for c in self.cases):
            return "failed"
        return "validated" if any(c.status == "passed" and c.check not in ("files", "manifest")
                                  for c in self.cases) else "built"


@dataclass
class ValidateReport:
    """The gate's outcome."""

    model: str
    reference: str
    dataset: str | None
    reference_metrics: dict[str, float] | None
    bundles: list[BundleResult]
    seconds: float
    reference_latency: dict[str, float] | None = None
    reference_size_mb: float | None = None

    @property
    def cases(self) -> list[Case]:
        """Every check of every bundle, in table order."""
        return [c for b in self.bundles for c in b.cases]

    @property
    def ok(self) -> bool:
        """True when no check failed."""
        return all(c.status != "failed" for c in self.cases)


# ---------------------------------------------------------------- output
def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and np.isinf(v):
        return "inf"
    return format(v, spec)


def case_rows(report: ValidateReport) -> list[list[str]]:
    """The check table: one row per case (the JUnit test cases, in the same order)."""
    rows = []
    for c in report.cases:
        m = c.metrics
        if c.check in ("files", "manifest", "host run", "load", "build verdict", "qdq lint"):
            values = ["-"] * 5
        elif "aarch64" in m and "x86" in m:  # the task metric on emulated aarch64, beside x86's
            key = m["metric"]
            values = ["-"] * 4 + [f"{key} {m['aarch64'][key]:.2f} (x86 {m['x86'][key]:.2f})"]
        elif "drop" in m:
            key = m["metric"]
            values = ["-", "-", "-", f"{100 * m['agreement']:.2f}%",
                      f"{key} {m['metrics'][key]:.2f} ({points(-m['drop'], -m['max_drop'], signed=True)})"]
        else:
            values = [_fmt(m.get("max_abs"), ".3g"), _fmt(m.get("cosine"), ".6f"), _fmt(m.get("sqnr_db"), ".1f"),
                      f"{100 * m['agreement']:.2f}%" if "agreement" in m else "-", "-"]
        rows.append([c.bundle, c.backend, c.precision, c.check, *values, c.status])
    return rows


CASE_HEAD = ["bundle", "backend", "precision", "check", "max_abs", "cosine", "sqnr_db", "agreement",
             "metric (vs PyTorch)", "status"]


BENCH_HEAD = ["backend", "precision", "bundle", "size MB", "metric", "median ms", "p99 ms", "FPS", "status"]


EMULATED_HEAD = ["bundle", "aarch64 (emulated)", "install", "selftest", "README run", "outputs vs x86",
                 "agreement", "metric aarch64 / x86", "status"]


def emulated_rows(report: ValidateReport) -> list[list[str]]:
    """One row per bundle run on emulated aarch64 (validate --emulate): its core, the install and selftest, each
    output against the x86 run of the same model (integers that differ, or the relative error), the task metric
    on both."""
    rows = []
    for b in report.bundles:
        emu = [c for c in b.cases if c.check.startswith("aarch64 ") or c.check.endswith((" aarch64 vs x86",
                                                                                          " aarch64"))]
        if not emu:
            continue
        by = {c.check: c for c in emu}
        outs, agree, metric = [], [], "-"
        for c in emu:
            m = c.metrics
            if c.check.endswith(" aarch64 vs x86") and "elements" in m:
                what = (f"{m['differ']} of {m['elements']} differ" if "max_step" in m else
                        f"max_rel {m.get('max_rel', 0.0):.1e}")
                outs.append(f"{c.check.removesuffix(' aarch64 vs x86')}: {what}")
                if "agreement" in m:
                    agree.append(f"{100 * m['agreement']:.2f}%")
            elif "aarch64" in m and "x86" in m:
                key = m["metric"]
                metric = f"{key} {m['aarch64'][key]:.2f} / {m['x86'][key]:.2f} ({m['count']} frames)"
        core = by["aarch64 install"].metrics.get("cpu", "-") if "aarch64 install" in by else "-"
        status = "failed" if any(c.status == "failed" for c in emu) else "passed"
        rows.append([b.name, core, by["aarch64 install"].status if "aarch64 install" in by else "-",
                     by["aarch64 selftest"].status if "aarch64 selftest" in by else "-",
                     by["aarch64 README run"].status if "aarch64 README run" in by else "-",
                     "; ".join(outs) or "-", ", ".join(agree) or "-", metric, status])
    return rows


def bench_rows(report: ValidateReport) -> list[list[str]]:
    """The benchmark table: the PyTorch reference, then one row per bundle."""
    def metric(m: dict[str, float] | None) -> str:
        if not m:
            return "-"
        return metric_cell(m) or "-"

    def lat(x: dict[str, float] | None) -> list[str]:
        return [f"{x['median_ms']:.2f}", f"{x['p99_ms']:.2f}", f"{x['fps']:.0f}"] if x else ["-"] * 3

    rows = [["pytorch", "fp32", "(reference)", _fmt(report.reference_size_mb, ".2f"),
             metric(report.reference_metrics), *lat(report.reference_latency), "reference"]]
    for b in report.bundles:
        rows.append([b.backend, b.precision, b.name, f"{b.size_mb:.2f}", metric(b.metrics), *lat(b.latency), b.status])
    return rows


def _bench_notes(report: ValidateReport) -> list[str]:
    """What each timed bundle's backend says about its figures (TensorRT: emulated here)."""
    timed = {b.backend.split()[0] for b in report.bundles if b.latency}
    return [note for name in REGISTRY if name in timed and (note := get_backend(name).bench_note)]


def failures(report: ValidateReport) -> list[str]:
    """One line per failed check, naming bundle, backend and output; then what --localize found."""
    lines = [f"{c.bundle}: {c.message}" for c in report.cases if c.status == "failed"]
    for b in report.bundles:
        if b.localize:
            lines.append(f"{b.name}: {b.localize['summary']}")
    return lines


def text(report: ValidateReport) -> str:
    """The terminal report."""
    lines = text_table(CASE_HEAD, case_rows(report))
    src = f"golden frames + {report.dataset}" if report.dataset else "golden frames"
    lines.append(f"reference: {report.model} in {report.reference}; frames: {src}")
    if report.reference_metrics:
        key = primary(report.reference_metrics)[0]
        lines.append(f"PyTorch {key} {report.reference_metrics[key]:.2f} on {report.dataset}")
        halves = sorted({c.metrics["frames"] for c in report.cases
                         if "report half" in c.metrics.get("frames", "") and "aarch64" not in c.check})
        if halves:  # each bundle's figure is against PyTorch on the same frames
            lines.append(f"metric of bundles built on these frames: on {halves[0]}, each against PyTorch there")
    if any(b.latency for b in report.bundles):
        lines += ["", *text_table(BENCH_HEAD, bench_rows(report)), *_bench_notes(report)]
    emulated = emulated_rows(report)
    if emulated:
        lines += ["", *text_table(EMULATED_HEAD, emulated)]
    lines += failures(report)
    n_fail = sum(c.status == "failed" for c in report.cases)
    lines.append(f"{len(report.cases)} checks: {n_fail} failed, "
                 f"{sum(c.status == 'skipped' for c in report.cases)} skipped ({report.seconds:.1f}s)")
    return "\n".join(lines)


def markdown(report: ValidateReport) -> str:
    """A CI job summary."""
    lines = [f"## edgeport validate: {report.model}", "", *md_table(CASE_HEAD, case_rows(report)), ""]
    if report.dataset:
        lines += [f"Frames: golden frames + {report.dataset}; reference {report.reference}.", ""]
    if any(b.latency for b in report.bundles):
        lines += ["### Benchmark (this host)", "", *md_table(BENCH_HEAD, bench_rows(report)), "",
                  *_bench_notes(report), ""]
    emulated = emulated_rows(report)
    if emulated:
        lines += ["### aarch64 (emulated) against x86", "", *md_table(EMULATED_HEAD, emulated), ""]
    bad = failures(report)
    lines.append(f"**{sum(c.status == 'failed' for c in report.cases)} failed check(s)**" if bad
                 else "**all checks passed**")
    lines += [f"- {b}" for b in bad]
    return "\n".join(lines) + "\n"


def to_json(report: ValidateReport) -> dict[str, Any]:
    """Everything as plain JSON types."""
    return {"model": report.model, "reference": report.reference, "dataset": report.dataset,
            "reference_metrics": report.reference_metrics, "ok": report.ok, "seconds": report.seconds,
            "reference_latency": report.reference_latency,
            "bundles": [{**{k: v for k, v in vars(b).items() if k != "cases"}, "status": b.status,
                         "cases": [vars(c) for c in b.cases]} for b in report.bundles]}


def write_reports(report: ValidateReport, folder: Path) -> list[Path]:
    """validate.json, validate.junit.xml, validate.md (and benchmark.png with latency) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "validate.json", folder / "validate.junit.xml", folder / "validate.md"]
    paths[0].write_text(json.dumps(to_json(report), indent=2, default=str) + "\n")
    cases = [{"suite": c.bundle, "name": f"{c.bundle} {c.check}", "status": c.status, "message": c.message,
              "metrics": c.metrics, "seconds": c.seconds} for c in report.cases]
    paths[1].write_text(junit_xml(f"edgeport validate {report.model}", cases) + "\n")
    paths[2].write_text(markdown(report))
    if any(b.latency for b in report.bundles):
        from edgeport.chart import bench_chart

        paths.append(bench_chart(report, folder / "benchmark.png"))
    return paths


def raise_on_failure(report: ValidateReport) -> None:
    """ParityError (exit 3) when any check failed; the table has been printed."""

    bad = [c for c in report.cases if c.status == "failed"]
    if bad:
        raise ParityError(f"{len(bad)} check(s) failed: " + "; ".join(f"{c.bundle} {c.check}" for c in bad))
    if not any(b.status == "validated" for b in report.bundles):
        raise ParityError("no bundle could be run on this host (see the skipped checks); nothing was validated")
