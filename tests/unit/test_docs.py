"""The documentation's rules: a short README whose blocks say what they need, every table of figures on the site
saying when, on what and by which command it was measured, no dated figure in the code's comments, and reference
pages generated from declarations that document every option."""
from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
# A measured figure in a table cell: a time, a share (not a setting such as "0.1 % input noise"), a metric.
MEASURED = re.compile(r"\b\d+\.\d+ ?(ms|s)\b|\b\d+\.\d+ ?%(?! input)|(mIoU|mAP) \d+\.\d|\de-\d")
FIGURE = re.compile(r"\d+\.\d+|\d+ ?%|\d+ ?(ms|s|MB|GB|FPS)\b")


def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of every fenced block of a Markdown text."""
    blocks, lang, body = [], None, []
    for line in text.splitlines():
        if lang is None and line.startswith("```"):
            lang, body = line[3:].strip(), []
        elif lang is not None and line.startswith("```"):
            blocks.append((lang, body))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def tables(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, rows) of every Markdown table."""
    out, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|\s*-{3}", lines[i + 1]):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            out.append((i + 1, lines[i:j]))
            i = j
        else:
            i += 1
    return out


def test_readme_is_short_and_its_blocks_say_what_they_need() -> None:
    text = README.read_text()
    assert len(text.splitlines()) < 200
    blocks = fenced_blocks(text)
    assert blocks[0] == ("bash", ["python3 -m venv .venv && .venv/bin/pip install -e '.[all,test]' && "
                                  ".venv/bin/edgeport build", ".venv/bin/python -m pytest -q"]), blocks[0]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert all(line in ci for line in blocks[0][1]), "CI must run README's Quickstart lines as printed"
    for lang, body in blocks:
        assert lang in ("bash", "sh", "text"), lang
        if lang == "sh":  # shown, not run by tests/integration/test_readme.py: the first line says what it needs
            assert body[0].startswith("# ") and re.search(r"needs|on the device|on the Pi|on the Jetson", body[0]), body
    assert "docs/" in text and not DATE.search(text)  # figures and their dates live on the Benchmarks pages


def test_every_table_of_figures_says_when_on_what_and_by_which_command() -> None:
    """A table holding figures is preceded, within its paragraph, by 'Measured DATE on MACHINE with `COMMAND`'
    (the Benchmarks pages), unless it is a reference table without measurements."""
    missing = []
    for page in sorted(DOCS.rglob("*.md")):
        lines = page.read_text().splitlines()
        for start, rows in tables(page.read_text()):
            cells = " ".join(rows[2:])
            if not FIGURE.search(re.sub(r"`[^`]*`", "", cells)) or "benchmarks" not in page.parts:
                continue
            before = " ".join(lines[max(0, start - 8):start - 1])
            if not re.search(r"Measured (\d{4}-\d\d-\d\d).* on .+ with (`[^`]+`|a one-off script)", before):
                missing.append(f"{page.relative_to(ROOT)}:{start}")
    assert not missing, missing


def test_guide_pages_hold_no_tables_of_measurements() -> None:
    """Measured tables live on the Benchmarks pages; a guide page links there."""
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        if "benchmarks" in page.parts:
            continue
        for start, rows in tables(page.read_text()):
            if any(MEASURED.search(re.sub(r"`[^`]*`", "", r)) for r in rows[2:]):
                found.append(f"{page.relative_to(ROOT)}:{start}")
    assert not found, found


def test_no_dated_figure_in_the_code() -> None:
    """History goes to commit messages and the Benchmarks pages, not to comments."""
    dated = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "edgeport").rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if DATE.search(line) or re.search(r"re-?measured|until 20\d\d|session \d", line, re.I)]
    assert not dated, dated


def test_every_config_key_and_flag_is_documented() -> None:
    from edgeport import config
    from edgeport.flags import describe
    from edgeport.reference import settings

    for section, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert describe(f), f"[{section}] {f.name} has neither a flag's help nor a doc"
    listed = {(s, row[0]) for s, rows in settings() for row in rows}
    assert ("quantize", "max_drop") in listed and ("task", "decoder") in listed and ("preprocess", "mean") in listed
    assert all(row[4] for _, rows in settings() for row in rows)


def test_every_command_and_runner_option_has_help() -> None:
    from edgeport.cli import parser
    from edgeport.runner.app import build_parser

    top = parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    parsers = [*sub.choices.values(), build_parser({"model": {"name": "m"}, "target": "t", "precision": "p"})]
    bare = [(p.prog, a.dest) for p in parsers for a in p._actions if not a.help]
    assert not bare, bare


@pytest.mark.parametrize("page", ["cli", "config"])
def test_the_reference_pages_are_generated_from_the_code(page: str) -> None:
    from edgeport import reference

    text = getattr(reference, f"{page}_markdown")()
    if page == "cli":
        for command in ("build", "validate", "flash", "fleet", "export", "inspect"):
            assert f"## edgeport {command}" in text
        assert "`--int8-ignore REGEX`" in text and "`--selftest`" in text and "```bash" in text
    else:
        assert "## [quantize]" in text and "| `calib_method` | str | \"percentile\" | `--calib-method` |" in text
