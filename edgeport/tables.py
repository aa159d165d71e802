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
