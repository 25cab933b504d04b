"""``python -m benchmarks [--quick] [--only NAME ...] [--set NAME.KEY=VALUE ...] [--timeout S] [--list]``.

Runs every ``benchmarks/bench_<name>.py`` (or the ``--only`` ones) in its own process, writes
``benchmarks/results/<name>.parquet`` and rebuilds ``benchmarks/RESULTS.md``. Exits 1 when any benchmark
failed (its failure is still recorded in RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import harness


def parse_options(items: list[str]) -> dict[str, dict]:
    """``["duckdb.sizes=[1000,5000]", "ingest.workers=2"]`` -> ``{"duckdb": {"sizes": [1000, 5000]}, ...}``;
    values are JSON when they parse as JSON, else strings."""
    options: dict[str, dict] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, option = key.partition(".")
        if not sep or not dot or not name or not option:
            raise SystemExit(f"--set expects NAME.KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options.setdefault(name, {})[option] = value
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized smoke run of every benchmark")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these modules (bench_NAME.py)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME.KEY=VALUE",
                        help="keyword argument for one module's run(), e.g. duckdb.sizes=[100000]")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="kill a benchmark after S seconds (recorded as a timeout)")
    parser.add_argument("--results-dir", type=Path, default=harness.RESULTS_DIR)
    parser.add_argument("--results-md", type=Path, default=None,
                        help="default: RESULTS.md beside the results directory's parent (benchmarks/RESULTS.md)")
    parser.add_argument("--list", action="store_true", help="list the benchmark modules and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(harness.discover()))
        return 0
    results_md = args.results_md or (harness.RESULTS_MD if args.results_dir == harness.RESULTS_DIR
                                     else args.results_dir.parent / "RESULTS.md")
    outcomes = harness.run_benchmarks(args.only, quick=args.quick, options=parse_options(args.set),
                                      results_dir=args.results_dir, results_md=results_md,
                                      timeout_s=args.timeout)
    failed = [n for n, o in outcomes.items() if o["status"] != "ok"]
    if failed:
        print(f"FAILED: {', '.join(failed)} (see {results_md})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
