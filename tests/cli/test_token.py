"""`podcap token`: what an operator pastes into a token file and hands to a user, and nothing else."""

from __future__ import annotations

import hashlib
import subprocess

from tests.support.processes import PODCAP


def test_token_prints_the_token_and_its_hash_and_no_log_noise() -> None:
    result = subprocess.run([PODCAP, "token"], capture_output=True, text=True, timeout=60, check=True)
    token_line, hash_line = result.stdout.splitlines()
    token = token_line.removeprefix("token: ")
    assert token.startswith("podcap_") and len(token) > 40  # never `-`: a command line would read an option
    assert hash_line == f"token_sha256: {hashlib.sha256(token.encode()).hexdigest()}"
    assert result.stderr.splitlines() == [
        "(give the token to its user, e.g. as PODCAP_TOKEN; put the hash in the controller's token file)"
    ]
