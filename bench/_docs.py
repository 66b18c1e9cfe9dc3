"""Writing a benchmark's results into docs/bench.md: each benchmark owns one `## ` section and rewrites only it."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "bench.md"
_PREAMBLE = "# Benchmarks\n\nMeasured with `make bench`; each section says how to run it alone.\n"


def write_section(heading: str, section: str) -> None:
    """Replaces the section under `heading` (up to the next `## `), or appends it; the others stay as they are."""
    text = DOCS.read_text() if DOCS.exists() else _PREAMBLE
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("\n" + text[end + 1 :] if end >= 0 else "")
    DOCS.write_text(text.rstrip("\n") + "\n")
