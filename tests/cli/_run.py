"""Running the installed `podcap` / `kubectl-podcap` commands as a person would, with a controlled environment."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.support.processes import PODCAP

KUBECTL_PODCAP = str(Path(PODCAP).with_name("kubectl-podcap"))
_OURS = ("PODCAP_", "XDG_CONFIG_HOME", "KUBECONFIG")


def run(
    args: Sequence[str], home: Path, env: dict[str, str] | None = None, *, program: str = PODCAP
) -> subprocess.CompletedProcess[str]:
    """`program ARGS` with HOME at `home` and none of the caller's podcap/kubeconfig variables, plus `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}
    return subprocess.run(
        [program, *args],
        env={**clean, "HOME": str(home), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
