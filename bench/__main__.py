"""Run every benchmark module in `bench/` (or the ones named), one after the other."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
import traceback
from pathlib import Path


def modules() -> list[str]:
    """The benchmark modules: every module of this package."""
    here = Path(__file__).resolve().parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    available = modules()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run the benchmarks (each prints ratios against a baseline of the same run; "
        "none fails on a timing). Run one with its own options: python -m bench.<name> --help",
    )
    parser.add_argument("names", nargs="*", help=f"benchmarks to run: {', '.join(available)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(available))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; available: {', '.join(available)}")
    failed = []
    for name in args.names or available:
        print(f"== bench.{name}", flush=True)
        started = time.monotonic()
        try:
            code = importlib.import_module(f"bench.{name}").main([])
        except Exception:  # report it, run the others
            traceback.print_exc()
            code = 1
        print(
            f"== bench.{name}: exit {code or 0} in {time.monotonic() - started:.0f} s", flush=True
        )
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
