"""Durations and sizes as people type them on the command line."""

from __future__ import annotations

import argparse
from datetime import timedelta

import pytest

from podcap.cli._main import parse_duration, parse_size


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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1500", 1500),
        ("10k", 10240),
        ("10K", 10240),
        ("512KiB", 512 << 10),
        ("64M", 64 << 20),
        ("64MB", 64 << 20),
        ("1.5G", 3 << 29),
        ("2 GiB", 2 << 30),
        ("1t", 1 << 40),
    ],
)
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "ten", "-5", "10x", "1.5", "0.3k", "10 k b", "k"])
def test_nonsense_sizes_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)
