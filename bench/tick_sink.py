"""Benchmark: the tick sink alone, ticks/s from the stream into `forex_data.ticks`, against
`psql \\copy` of the same rows into the same table, in the same run. Never fails on a timing.

    python -m bench.tick_sink                       # this checkout, 3 rounds
    python -m bench.tick_sink --vs /path/to/other   # and another checkout, alternately (A B A B)
    python -m bench.tick_sink --profile             # and where the time goes (py-spy, SQL)

A throwaway stack; the forex generator publishes `--hours` of the starter's ticks (14,400 an
hour) to the `tick-data` stream once, as `make bench` does. Each round:

- the sink: `python -m ingestion.tick_sink --once` from each checkout as its own process, with a
  consumer group of its own (so it reads the whole stream) into emptied tables; its wall time
  (start-up included, as the pipeline runs it), its own CPU time (user + sys, from `wait4`) and
  that of its Postgres session (the postmaster's reaped children);
- the baseline: `psql \\copy` of the same rows (decoded once, untimed, into a CSV file of the
  table's columns) into the emptied `forex_data.ticks`, keys and indexes as they are.

Every sink round must leave exactly the rows the baseline left (count and a digest of every
row), and nothing rejected. Autovacuum is off for the two tables, so that no analyze of a freshly
filled table lands in another round's figures. `--profile` adds one untimed run of this
checkout's sink under py-spy (share of samples per function, every thread, waits included: the
sink's loop is what is measured; `--profile-cpu`: only the samples holding the GIL) with
`pg_stat_statements` of its SQL (the stack's Postgres restarted with the library preloaded).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import psycopg
import redis

from bench import _profile
from bench._procs import Clock, _children, run
from bench.pipeline import gen_ticks
from common.settings import PROJECT_ROOT
from ingestion.generators.common import STARTER_START
from ingestion.stream.redis_streams import stream_key
from ingestion.tick_format import TickWindow, decode_tick
from ops.stack import Stack, throwaway, wait_until

TOPIC = "tick-data"
COLUMNS = "pair_name, tick_ts, bid_price, ask_price, spread, source"
TABLES = "forex_data.ticks, forex_data.rejected_messages"
DIGEST = (
    "select count(*), md5(string_agg(concat_ws('|', pair_name, tick_ts, bid_price, ask_price,"
    " spread, source), ',' order by pair_name, tick_ts)) from forex_data.ticks"
)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("WTC_", "PYTHONPATH"))}


def fill(stream_url: str, hours: float, workdir: Path) -> int:
    """The generator's ticks for the starter's first `hours`, on the tick stream."""
    run(Clock(), "publish ticks", gen_ticks(STARTER_START, hours, stream_url, 42), _env(),
        workdir, Path(PROJECT_ROOT))  # fmt: skip
    return int(redis.Redis.from_url(stream_url).xlen(stream_key(TOPIC)))


def copy_file(stream_url: str, path: Path) -> int:
    """The stream's ticks as CSV rows of the table's columns (the one decoder reads them)."""
    client: Any = redis.Redis.from_url(stream_url)  # replies of bytes
    pairs, window = ("MRVZAR", "WAKMRV"), TickWindow()
    rows, start = 0, "-"
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        while True:
            entries = client.xrange(stream_key(TOPIC), min=start, count=10_000)
            if not entries:
                break
            for _, fields in entries:
                t = decode_tick(fields[b"v"], pairs, window)
                writer.writerow((t.pair_name, t.tick_ts, t.bid_price, t.ask_price, t.spread, TOPIC))
                rows += 1
            start = "(" + entries[-1][0].decode()
    return rows


def reset(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"truncate {TABLES}")
        conn.execute("checkpoint")


def digest(dsn: str) -> tuple[int, str, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        n, md5 = conn.execute(DIGEST).fetchone() or (0, "")
        (rejected,) = conn.execute(
            "select count(*) from forex_data.rejected_messages"
        ).fetchone() or (0,)
    return n, md5, rejected


def children_cpu(pid: int) -> float:
    """CPU seconds (user + sys) of `pid`'s reaped children: for the postmaster, of every
    backend that has ended."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


IDLE_CHILDREN: dict[int, int] = {}
"""postmaster pid -> its children with no client connected (its own background processes)."""


def reaped(postmaster: int) -> float:
    """The postmaster's reaped children's CPU seconds once every client session has ended and
    been reaped."""
    idle = IDLE_CHILDREN.setdefault(postmaster, len(_children(postmaster)))
    wait_until(lambda: len(_children(postmaster)) <= idle, "the sessions to end", timeout=30)
    return children_cpu(postmaster)


def psql_copy(dsn: str, path: Path, postmaster: int) -> dict:
    reset(dsn)
    pg0, started = reaped(postmaster), time.perf_counter()
    subprocess.run(
        ["psql", dsn, "-q", "-v", "ON_ERROR_STOP=1", "-c",
         f"\\copy forex_data.ticks ({COLUMNS}) from '{path}' (format csv)"],
        check=True,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "pg_cpu_s": reaped(postmaster) - pg0}


def sink_env(stack_env: dict[str, str], group: str) -> dict[str, str]:
    return {
        **_env(),
        **stack_env,
        "TICK_SINK_GROUP": group,
        "TICK_SINK_CONSUMER_NAME": group,
        "TICK_SINK_METRICS_PORT": "0",
        "WTC_LOG_FORMAT": "json",
    }


def sink_run(
    tree: Path, stack_env: dict[str, str], group: str, logs: Path, postmaster: int
) -> dict:
    reset(stack_env["WTC_ANALYTICS_DSN"])
    env = sink_env(stack_env, group)
    pg0 = reaped(postmaster)
    # `-m` from the checkout's folder: its `ingestion` is the one imported
    stage = run(Clock(), group, [sys.executable, "-m", "ingestion.tick_sink", "--once"], env,
                logs, tree)  # fmt: skip
    pg_cpu = reaped(postmaster) - pg0
    total = {}
    for line in (logs / f"{group}.log").read_text().splitlines():
        if '"tick sink finished"' in line:
            total = orjson.loads(line)
    return {
        "seconds": stage.seconds,
        "cpu_s": stage.cpu_s or 0.0,
        "pg_cpu_s": pg_cpu,
        "peak_rss_mb": stage.peak_rss_mb,
        "landed": total.get("landed"),
        "rejected": total.get("rejected"),
    }


def profile(stack_env: dict[str, str], logs: Path, stack: Stack, cpu_only: bool = False) -> None:
    """One untimed run of this checkout's sink under py-spy (every thread, waits included; or
    only samples holding the GIL: the Python CPU), and the SQL it ran."""
    dsn = stack_env["WTC_ANALYTICS_DSN"]
    _profile.enable_pg_stat_statements(stack)
    reset(dsn)
    _profile.top_statements(dsn)  # reset
    raw = logs / "tick_sink.pyspy"
    argv = [sys.executable, "-m", "ingestion.tick_sink", "--once"]
    spied = _profile.pyspy(argv, raw, rate=200)
    spied.insert(spied.index("--"), "--gil" if cpu_only else "--idle")
    run(Clock(), "profile", spied, sink_env(stack_env, "bench-profile"), logs, Path(PROJECT_ROOT))
    summary = _profile.summarise(raw, limit=25)
    print(f"py-spy, {summary['samples']} samples; own share per function:")
    for frame, share in summary["own"]:
        print(f"  {share:6.1%}  {frame}")
    print("inclusive share per function:")
    for frame, share in summary["inclusive"]:
        print(f"  {share:6.1%}  {frame}")
    print("pg_stat_statements, by total time:")
    for st in _profile.top_statements(dsn, limit=10):
        print(f"  {st['ms']:9.1f} ms {st['share']:6.1%} {st['calls']:6} calls  {st['query'][:150]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tick_sink", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "--hours", type=float, default=8, help="of the starter's ticks (14,400 an hour; default 8)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vs", type=Path, help="another checkout of the project (B)")
    parser.add_argument(
        "--this", type=Path, default=Path(PROJECT_ROOT), help="the checkout measured as A"
    )
    parser.add_argument("--profile", action="store_true", help="also one run under py-spy")
    parser.add_argument(
        "--profile-cpu", action="store_true", help="--profile of the samples holding the GIL only"
    )
    args = parser.parse_args(argv)
    trees = {"A (this)": args.this.resolve()}
    if args.vs:
        trees["B (vs)"] = args.vs.resolve()
    with throwaway("wtc-bench-") as stack:
        dsn = stack.s.analytics_dsn
        postmaster = stack.postgres_pid()
        assert postmaster is not None
        IDLE_CHILDREN[postmaster] = len(_children(postmaster))
        with psycopg.connect(dsn, autocommit=True) as conn:
            for table in TABLES.split(", "):
                conn.execute(f"alter table {table} set (autovacuum_enabled = false)")
        logs = stack.state / "logs"
        logs.mkdir()
        n = fill(stack.s.stream_url, args.hours, logs)
        path = stack.state / "ticks.csv"
        assert copy_file(stack.s.stream_url, path) == n
        print(f"stream: {n:,} ticks ({args.hours:g} h of the starter's)", flush=True)
        stack_env = {"WTC_ANALYTICS_DSN": dsn, "STREAM_URL": stack.s.stream_url}
        if args.profile or args.profile_cpu:
            profile(stack_env, logs, stack, cpu_only=args.profile_cpu)
            postmaster = stack.postgres_pid()  # restarted
            assert postmaster is not None
            IDLE_CHILDREN[postmaster] = len(_children(postmaster))
        base: list[dict] = []
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        expected = None
        for i in range(args.rounds):
            base.append(psql_copy(dsn, path, postmaster))
            expected = expected or digest(dsn)
            print(
                f"round {i + 1} psql \\copy: {n / base[-1]['seconds']:,.0f} ticks/s "
                f"({base[-1]['seconds']:.2f} s, Postgres CPU {base[-1]['pg_cpu_s']:.2f} s)",
                flush=True,
            )
            for name, tree in trees.items():
                res = sink_run(tree, stack_env, f"bench-{i}-{name[0]}", logs, postmaster)
                got = digest(dsn)
                if got != expected or res["landed"] != n:
                    raise RuntimeError(
                        f"{name} left {got} (landed {res['landed']}), psql \\copy {expected}"
                    )
                res["rate"] = n / res["seconds"]
                res["ratio"] = res["rate"] / (n / base[-1]["seconds"])
                runs[name].append(res)
                print(
                    f"round {i + 1} {name}: {res['rate']:,.0f} ticks/s ({res['seconds']:.2f} s, "
                    f"{res['ratio']:.2f} of psql \\copy); CPU: sink {res['cpu_s']:.2f} s "
                    f"({1e6 * res['cpu_s'] / n:.1f} us/tick), its Postgres session "
                    f"{res['pg_cpu_s']:.2f} s; peak RSS {res['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
    copy_rate = statistics.median(n / b["seconds"] for b in base)
    print(f"psql \\copy: median {copy_rate:,.0f} ticks/s")
    for name, results in runs.items():
        print(
            f"{name}: median {statistics.median(r['rate'] for r in results):,.0f} ticks/s "
            f"(goal >= 100,000), {statistics.median(r['ratio'] for r in results):.2f} of psql "
            f"\\copy; sink CPU {statistics.median(1e6 * r['cpu_s'] / n for r in results):.1f} "
            f"us/tick, Postgres CPU "
            f"{statistics.median(1e6 * r['pg_cpu_s'] / n for r in results):.1f} us/tick"
        )
    if args.vs:
        a, b = runs.values()
        for what, key in (("ticks/s", "rate"), ("sink CPU s", "cpu_s")):
            ratios = [x[key] / y[key] for x, y in zip(a, b, strict=True)]
            print(
                f"A/B {what}, pair by pair: {', '.join(f'{q:.2f}' for q in ratios)} "
                f"(median {statistics.median(ratios):.2f})"
            )
    print(f"load average: {os.getloadavg()[0]:.2f} (2 cores, shared)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
