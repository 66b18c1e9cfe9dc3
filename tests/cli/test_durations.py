"""Durations as people type them on the command line."""

from __future__ import annotations

import argparse
from datetime import timedelta

import pytest

from podcap.cli._main import parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("1m30s", timedelta(seconds=90)),
        ("500ms", timedelta(milliseconds=500)),
        ("2h", timedelta(hours=2)),
        ("30d", timedelta(days=30)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("10", timedelta(seconds=10)),
        ("-5", timedelta(seconds=-5)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "ten seconds", "5x", "1m-3s", "3 days", "1w"])
def test_nonsense_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)
