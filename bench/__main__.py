"""``python -m bench`` / ``make bench``: every benchmark in turn, each rewriting its own section of docs/bench.md.

Each section holds what that benchmark measured in this run, a missed target included; a benchmark that fails (a
target missed, a figure it could not measure) makes the whole run fail, after the others have run.
``python -m bench NAME...`` runs only those (e.g. ``python -m bench fidelity upload``).
"""

from __future__ import annotations

import importlib
import sys

# Each module has ``main(argv) -> int`` and can also run alone: ``python -m bench.<name>``.
BENCHMARKS = [
    "bench.resolve",
    "bench.start_latency",
    "bench.create_capture",
    "bench.list_captures",
    "bench.summary",
    "bench.summary_memory",
    "bench.burst",
    "bench.cli_start",
    "bench.upload",
    "bench.fidelity",
]


def main(argv: list[str]) -> int:
    chosen = [f"bench.{name.removeprefix('bench.')}" for name in argv] or BENCHMARKS
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmarks: {', '.join(unknown)}; there are {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    failed = []
    for name in chosen:
        print(f"# {name}", flush=True)
        if importlib.import_module(name).main(["--write-docs"]) != 0:
            failed.append(name)
    if failed:
        print(
            f"FAILED: {', '.join(failed)} (their sections of docs/bench.md were not rewritten)",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
