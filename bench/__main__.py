"""``python -m bench`` / ``make bench``: every benchmark in turn, each printing its section of docs/bench.md."""

from __future__ import annotations

import importlib

# Each module has ``main(argv) -> int`` and can also run alone: ``python -m bench.<name>``.
BENCHMARKS = [
    "bench.resolve",
    "bench.start_latency",
    "bench.create_capture",
    "bench.list_captures",
    "bench.summary",
    "bench.summary_memory",
]


def main() -> int:
    failed = 0
    for name in BENCHMARKS:
        print(f"# {name}", flush=True)
        failed += importlib.import_module(name).main([]) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
