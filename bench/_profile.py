"""Profiles for `bench.pipeline --profile`: py-spy samples of a Python stage (raw collapsed
stacks, summarised by own and inclusive time per function) and `pg_stat_statements` of the SQL
each dbt build ran (the bench's own Postgres, restarted once with the library preloaded)."""

from __future__ import annotations

import collections
import re
import shutil
import sys
from pathlib import Path

import psycopg

from ops.stack import Stack

PYSPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def enable_pg_stat_statements(stack: Stack) -> None:
    with psycopg.connect(stack.s.pg_dsn("postgres"), autocommit=True) as conn:
        conn.execute("alter system set shared_preload_libraries = 'pg_stat_statements'")
    stack.stop_postgres()
    stack.start_postgres()
    # the library's settings exist once it is loaded
    with psycopg.connect(stack.s.pg_dsn("postgres"), autocommit=True) as conn:
        conn.execute("alter system set pg_stat_statements.track = 'all'")
        conn.execute("select pg_reload_conf()")
    with psycopg.connect(stack.s.analytics_dsn, autocommit=True) as conn:
        conn.execute("create extension if not exists pg_stat_statements")
        conn.execute("select pg_stat_statements_reset()")


def top_statements(dsn: str, limit: int = 8) -> list[dict]:
    """The statements that took the most time since the last call (then reset)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "select calls, total_exec_time, rows, shared_blks_hit + shared_blks_read,"
            " temp_blks_written, query from pg_stat_statements"
            " order by total_exec_time desc limit %s",
            (limit,),
        ).fetchall()
        total = conn.execute("select sum(total_exec_time) from pg_stat_statements").fetchone()[0]
        conn.execute("select pg_stat_statements_reset()")
    return [
        {
            "calls": calls,
            "ms": round(ms, 1),
            "share": round(ms / total, 3) if total else None,
            "rows": n,
            "blocks": blocks,
            "temp_blocks_written": temp,
            "query": re.sub(r"\s+", " ", query)[:300],
        }
        for calls, ms, n, blocks, temp, query in rows
    ]


def pyspy(argv: list[str], out: Path, rate: int = 50) -> list[str]:
    """`argv` under py-spy (raw collapsed stacks into `out`); idle threads left out."""
    return [PYSPY, "record", "--nonblocking", "-r", str(rate), "-f", "raw", "-o", str(out),
            "--", *argv]  # fmt: skip


def summarise(raw: Path, limit: int = 12) -> dict:
    """Own and inclusive samples per function from py-spy's raw output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r" \(.*?/([^/]+\.py):\d+\)", r" (\1)", f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    return {
        "samples": total,
        "own": [(f, round(n / total, 3)) for f, n in own.most_common(limit)] if total else [],
        "inclusive": [(f, round(n / total, 3)) for f, n in inclusive.most_common(limit)]
        if total
        else [],
    }
