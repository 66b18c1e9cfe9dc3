"""docs/cli.md is what the parser says: regenerate it with `make cli-docs` when this fails."""

from __future__ import annotations

from pathlib import Path

from podcap.cli._docs import render
from podcap.cli._help import subcommands
from podcap.cli._main import _parser

DOCS = Path(__file__).parents[2] / "docs" / "cli.md"


def test_docs_cli_md_is_generated_from_the_parser() -> None:
    expected = render(_parser())
    assert DOCS.read_text() == expected, "docs/cli.md drifted from the parser: run `make cli-docs`"


def test_the_page_has_every_command_with_usage_and_examples() -> None:
    page = render(_parser())
    for name, sub in subcommands(_parser()).items():
        assert f"## podcap {name}\n" in page
        assert f"usage: podcap {name}" in page
        for action in sub._actions:
            for option in action.option_strings:
                assert option in page
    assert page.count("Examples:") == len(subcommands(_parser()))
