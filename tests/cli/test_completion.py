"""The completion scripts, run by the real shells: bash's function called as bash calls it, zsh's script loaded by
compinit and its completion driven through zsh's own completion test harness (zpty)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.cli._run import run


def _script(shell: str, tmp_path: Path) -> Path:
    done = run(["completion", shell], tmp_path)
    assert done.returncode == 0, done.stderr
    path = tmp_path / f"podcap.{shell}"
    path.write_text(done.stdout)
    return path


def _bash_complete(script: Path, words: list[str], cwd: Path) -> list[str]:
    """COMPREPLY for the command line `words`, the cursor at the end of the last word."""
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    program = (
        f"source {script}\n"
        f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}\n"
        "_podcap\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        ["bash", "-c", program], capture_output=True, text=True, timeout=30, check=True, cwd=cwd
    )
    return [line for line in done.stdout.splitlines() if line]


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["podcap", "ca"], ["capture"]),
        (["podcap", "co"], ["completion", "config", "controller"]),
        (["podcap", "capture", "--fil"], ["--filter"]),
        (["podcap", "capture", "--o"], ["--output", "--one-copy"]),
        (["podcap", "-v", "list", "-o", ""], ["text", "json", "yaml"]),
        (["podcap", "get", "3f2a", "--output", "y"], ["yaml"]),
        (["podcap", "completion", ""], ["bash", "zsh"]),
        (["podcap", "download", "3f2a", "--m"], ["--merge"]),
        (["podcap", "capture", "--filter", ""], []),
        (["kubectl-podcap", "open", "3f2a", "--t"], ["--target", "--tls", "--token"]),
    ],
)
def test_bash_completes_commands_options_and_choices(
    words: list[str], expected: list[str], tmp_path: Path
) -> None:
    script = _script("bash", tmp_path)
    assert sorted(_bash_complete(script, words, tmp_path)) == sorted(expected)


def test_bash_completes_file_names_after_a_path_option(tmp_path: Path) -> None:
    script = _script("bash", tmp_path)
    (tmp_path / "ca-bundle.pem").write_text("")
    assert _bash_complete(script, ["podcap", "list", "--ca", "ca-b"], tmp_path) == ["ca-bundle.pem"]
    done = subprocess.run(
        ["bash", "-c", f"source {script}; complete -p podcap kubectl-podcap"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "-F _podcap podcap" in done.stdout and "-F _podcap kubectl-podcap" in done.stdout


# An interactive zsh on a pseudo-terminal (zpty), with compadd wrapped to print what the completion offers.
_ZSH_DRIVER = r"""
zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z "PROMPT=''"
zpty -w z "fpath=($FDIR \$fpath); autoload -U compinit; compinit -u -D"
zpty -w z "compadd () { builtin compadd -O __hits \"\$@\"; print -l -- '<<' \$__hits '>>'; builtin compadd \"\$@\" }"
zpty -w z "bindkey '^I' complete-word; print DONE-SETUP"
zpty -r -m z x '*DONE-SETUP*'
zpty -w -n z "$LINE"$'\t'
sleep 1.5
out=""; while zpty -r -t z line; do out+="$line"; done
print -r -- "$out"
zpty -d z
"""


def _zsh_offers(fdir: Path, line: str) -> set[str]:
    done = subprocess.run(
        ["zsh", "-f", "-c", _ZSH_DRIVER],
        env={"FDIR": str(fdir), "LINE": line, "PATH": "/usr/bin:/bin", "TERM": "dumb"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    offered: set[str] = set()
    for block in done.stdout.replace("\r", "").split("<<\n")[1:]:
        offered.update(w for w in block.partition(">>")[0].split("\n") if w)
    return offered


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (.ci/install-system-packages)")
def test_zsh_accepts_the_script_and_completes_with_it(tmp_path: Path) -> None:
    script = _script("zsh", tmp_path)
    subprocess.run(["zsh", "-n", str(script)], check=True, timeout=30)
    fdir = tmp_path / "functions"
    fdir.mkdir()
    (fdir / "_podcap").write_text(script.read_text())
    # compinit finds the #compdef line and binds both programs to the function
    done = subprocess.run(
        [
            "zsh",
            "-f",
            "-c",
            f"fpath=({fdir} $fpath); autoload -U compinit; compinit -u -D; "
            "print -r -- $_comps[podcap] $_comps[kubectl-podcap]",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.split() == ["_podcap", "_podcap"]
    assert _zsh_offers(fdir, "podcap list -o ") == {"text", "json", "yaml"}
    assert "capture" in _zsh_offers(fdir, "podcap ca")
    assert {"--filter", "--duration"} <= _zsh_offers(fdir, "podcap capture --")
