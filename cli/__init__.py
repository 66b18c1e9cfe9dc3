"""The `podcap` command line: support-staff client commands and the controller/agent entry points."""

from ._main import main

__all__ = ["main"]
