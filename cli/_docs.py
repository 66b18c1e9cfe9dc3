"""docs/cli.md, generated from the parser: every command's usage, options and examples as `--help` prints them.

`make cli-docs` (`python -m podcap.cli._docs > docs/cli.md`) writes it; tests/cli/test_docs.py fails when the
checked-in page differs from what this produces, so the page cannot drift from the code.
"""

from __future__ import annotations

import argparse
import os
import sys

from ._help import subcommands

_WIDTH = "110"
_HEADER = """\
# The `podcap` command line

Generated from the parser by `make cli-docs`; do not edit by hand (a test fails when this page drifts).
Client commands take their server, token, CA and default namespace from flags, then the environment
(`PODCAP_SERVER`, `PODCAP_TOKEN`, `PODCAP_CA`, `PODCAP_NAMESPACE`), then the config file
(`$PODCAP_CONFIG`, else `$XDG_CONFIG_HOME/podcap/config.yaml`, else `~/.config/podcap/config.yaml`; keys `server`,
`token`, `token_file`, `ca`, `tls`, `namespace`), then the defaults; `podcap config` shows what is in effect.
`kubectl podcap` (the `kubectl-podcap` plugin) is the same command, with the default namespace taken from the
current kubeconfig context as kubectl does.
"""


def _help(parser: argparse.ArgumentParser) -> str:
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = _WIDTH  # argparse wraps to the terminal: the page must not depend on it
    try:
        return parser.format_help().rstrip("\n")
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def render(parser: argparse.ArgumentParser) -> str:
    parts = [_HEADER, "```", _help(parser), "```", ""]
    for name, sub in subcommands(parser).items():
        parts += [f"## podcap {name}", "", "```", _help(sub), "```", ""]
    return "\n".join(parts)


def main() -> None:
    from ._main import _parser

    sys.stdout.write(render(_parser()))


if __name__ == "__main__":
    main()
