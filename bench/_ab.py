"""A/B runs of a benchmark against another checkout of the project in the same run (A B, B A, ...):
the checkouts from `--this` and `--vs`, the rounds taking them in turn, the ratios pair by pair,
and the run's end (the load average printed, the throwaway Redis stopped)."""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from bench.hvs_api import PrivateRedis
from common.settings import PROJECT_ROOT

R = TypeVar("R")


def add_checkout_arguments(parser: argparse.ArgumentParser, this_help: str) -> None:
    """`--vs` (another checkout, B) and `--this` (the checkout measured as A)."""
    parser.add_argument("--vs", type=Path, help="another checkout of the project (B)")
    parser.add_argument("--this", type=Path, default=Path(PROJECT_ROOT), help=this_help)


def checkouts(args: argparse.Namespace) -> dict[str, Path]:
    """`A (this)`, and `B (vs)` when `--vs` names one: the folders to run each round from."""
    trees = {"A (this)": args.this.resolve()}
    if args.vs:
        trees["B (vs)"] = args.vs.resolve()
    return trees


def alternate(
    trees: dict[str, Path], rounds: int, run_one: Callable[[int, str, Path], R]
) -> dict[str, list[R]]:
    """`rounds` rounds, each running every checkout once, in turns that reverse every round
    (A B, B A, A B, ...: a machine that slows down or warms up over the run favours neither):
    what `run_one(round, name, tree)` returns, by checkout, in round order."""
    runs: dict[str, list[R]] = {name: [] for name in trees}
    for i in range(rounds):
        for name, tree in list(trees.items())[:: -1 if i % 2 else 1]:
            runs[name].append(run_one(i, name, tree))
    return runs


def pair_ratios(what: str, a: Iterable[float], b: Iterable[float]) -> str:
    """`A/B <what>, pair by pair: 1.02, 0.98 (median 1.00)`: each round's A over its B."""
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return (
        f"A/B {what}, pair by pair: {', '.join(f'{q:.2f}' for q in ratios)} "
        f"(median {statistics.median(ratios):.2f})"
    )


@contextmanager
def throwaway_redis() -> Iterator[PrivateRedis]:
    """A private Redis for the run; the load average is printed when the run gets through, and
    the Redis is stopped whatever happens."""
    private = PrivateRedis()
    try:
        yield private
        print(f"load average: {os.getloadavg()[0]:.2f} (2 cores, shared)")
    finally:
        private.stop()
