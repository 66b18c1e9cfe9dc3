"""Every command's --help ends with examples a person can copy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from podcap.cli._help import subcommands
from podcap.cli._main import _parser
from tests.cli._run import run

COMMANDS = list(subcommands(_parser()))


def test_the_parser_has_the_commands_of_the_issue() -> None:
    assert {"capture", "get", "list", "download", "open", "config", "completion"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_an_example(command: str, tmp_path: Path) -> None:
    done = run([command, "--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    examples = done.stdout.partition("\nExamples:\n")[2]
    assert re.search(rf"^  (\S+=\S+ )*(source <\()?podcap {command}\b", examples, re.MULTILINE), done.stdout
