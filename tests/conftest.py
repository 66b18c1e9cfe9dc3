"""Shared pytest set-up: the fixtures live in tests/support, one module per real component."""

pytest_plugins = [
    "tests.support.s3",
    "tests.support.db",
    "tests.support.fakekube",
    "tests.support.lab",
]
