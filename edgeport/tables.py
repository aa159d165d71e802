"""Plain-text and Markdown tables for the terminal and CI summaries."""
from __future__ import annotations


def text_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns, a dashed rule under the head; one string per line."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub-flavoured Markdown table; one string per line."""
    return ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|",
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


def points(value: float, limit: float | None = None, signed: bool = False) -> str:
    """A metric figure (a drop in points) with 2 decimals, or as many more (up to 6) as it takes to tell it from
    ``limit``: a drop of 0.3004 against max_drop 0.3 prints as 0.3004, never as a passing-looking 0.30."""
    digits = 2
    while limit is not None and digits < 6 and value != limit and (
            round(value, digits) == round(limit, digits) or (round(value, digits) > limit) != (value > limit)):
        digits += 1
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
