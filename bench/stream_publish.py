"""Benchmark of publishing to Redis Streams as the CDR loader does (`publish_many` of a file's
rows: key msisdn, the loader's JSON value), optionally against another checkout in the same run
(A B, B A, ...). Prints rows/s and the ratio pair by pair; never fails on a timing.

    python -m bench.stream_publish                      # this checkout
    python -m bench.stream_publish --vs /path/to/other  # and another, alternately

Each run is its own process (`python -c` in the checkout's folder, so its `ingestion` is the
one imported) publishing `--files` files of 1000 rows into an emptied private Redis.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

import redis

from bench._ab import add_checkout_arguments, alternate, checkouts, pair_ratios, throwaway_redis

PUBLISH = """
import sys, time, orjson
from ingestion.stream import open_producer
url, files = sys.argv[1], int(sys.argv[2])
rows = [
    (b"%013d" % (27000000000 + n), orjson.dumps({
        "event_id": f"cdr_data_20240101_000320.csv:{n + 2}", "source_file":
        "cdr_data_20240101_000320.csv", "line_no": n + 2, "msisdn": "%013d" % (27000000000 + n),
        "tower_id": 17, "up_bytes": 512345, "down_bytes": 734567, "data_type": "video",
        "ip_address": "10.1.2.3", "website_url": "https://www.youtube.com/",
        "event_datetime": "2024-01-01 00:04:11.123456", "loaded_at": "2024-01-03 00:00:00.000000",
    }), None)
    for n in range(1000)
]
with open_producer(url) as p:
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(files):
        p.publish_many("cdr-data", iter(rows))
        p.flush()
    print(files * 1000 / (time.perf_counter() - t0), files * 1000 / (time.process_time() - c0))
"""


def run_once(tree: Path, url: str, files: int) -> tuple[float, float]:
    """(rows/s, rows per second of the publisher's own CPU time: what a loaded machine's
    waiting for a core does not blur)."""
    redis.Redis.from_url(url).flushdb()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", PUBLISH, url, str(files)],
        cwd=tree,  # `-c` puts the checkout first on sys.path
        env=env,
        capture_output=True,
        check=True,
        timeout=600,
    )
    wall, cpu = done.stdout.decode().split()[-2:]
    return float(wall), float(cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.stream_publish", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--files", type=int, default=100, help="of 1000 rows each")
    parser.add_argument("--rounds", type=int, default=5)
    add_checkout_arguments(parser, "checkout A")
    args = parser.parse_args(argv)
    with throwaway_redis() as private:

        def one_round(i: int, name: str, tree: Path) -> tuple[float, float]:
            wall, cpu = run_once(tree, private.url(1), args.files)
            print(f"round {i + 1} {name}: {wall:,.0f} rows/s, {cpu:,.0f} rows per CPU-s")
            return wall, cpu

        runs = alternate(checkouts(args), args.rounds, one_round)
        for name, got in runs.items():
            print(
                f"{name}: median {statistics.median(w for w, _ in got):,.0f} rows/s, "
                f"{statistics.median(c for _, c in got):,.0f} rows per CPU-s"
            )
        if args.vs:
            a, b = runs.values()
            for i, what in enumerate(("rows/s", "rows per CPU-s")):
                print(pair_ratios(what, (x[i] for x in a), (y[i] for y in b)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
