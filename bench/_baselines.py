"""The pipeline benchmark's baselines, measured on the same stack right after the run:

- landing: `psql \\copy` of the same CDR files into the raw tables of a fresh database, in one
  session and in as many as the loader has workers (bench.cdr_loader's ceiling), and a plain
  pandas loader (`read_csv` of each file from the SFTP folder on local disk, `to_sql` through
  SQLAlchemy into tables pandas creates), on a subset of the files;
- the HVS: the consumer alone (`python -m hvs --drain`, a group and a Redis database of its own)
  over the same events, against `redis-benchmark` HINCRBY on one connection, one round trip at
  a time and pipelined;
- the API: the usage API against a bare Redis endpoint (bench.hvs_api).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import psycopg
import redis

from bench._procs import Stage, log_path
from common.settings import CONTRACTS_DIR

if TYPE_CHECKING:
    from bench.pipeline import Run

log = logging.getLogger("bench.baselines")
LOADER_WORKERS = 2  # the loader's default (CDR_WORKERS)
PANDAS_FILES = 100


def _stage(r: Run, name: str, started: float, rows: int, unit: str = "rows") -> Stage:
    stage = Stage(name, started, r.clock.now(), rows, unit, phase="baseline")
    r.stages.append(stage)
    return stage


def e2e_files(r: Run) -> list[str]:
    """The CDR files of the end-to-end run (not the extra hour)."""
    sc = r.scale
    from bench.pipeline import STARTER_CDR_START, timedelta

    end = STARTER_CDR_START + timedelta(hours=sc.hours)
    names = []
    for path in sorted(r.s.cdr_dir.glob("cdr_*.csv")):
        if datetime.strptime(path.name[-19:-4], "%Y%m%d_%H%M%S") < end:
            names.append(path.name)
    return names


def landing(r: Run) -> dict:
    from bench.cdr_loader import ceiling_copy

    with psycopg.connect(r.s.pg_dsn("postgres"), autocommit=True) as conn:
        conn.execute("drop database if exists bench_baseline")
        conn.execute("create database bench_baseline")
    dsn = r.s.pg_dsn("bench_baseline")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute((CONTRACTS_DIR / "wtc_analytics.sql").read_text())
    names = e2e_files(r)
    rows = r.scale.cdr_rows
    out = {}
    for sessions in (1, LOADER_WORKERS):
        t = r.clock.now()
        ceiling_copy(dsn, r.s.cdr_dir, names, sessions)
        name = f"psql \\copy, {sessions} session{'s' if sessions > 1 else ''}"
        out[f"psql_copy_{sessions}"] = _stage(r, name, t, rows).rate
    subset = names[:PANDAS_FILES]
    out["pandas"] = pandas_loader(r, dsn, subset)
    return out


def pandas_loader(r: Run, dsn: str, names: list[str]) -> float | None:
    """A plain pandas loader: read_csv, to_sql (append), one file at a time."""
    import pandas as pd
    from sqlalchemy import create_engine

    engine = create_engine(dsn.replace("postgresql://", "postgresql+psycopg://"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create schema if not exists pandas_cdr")
    t, rows = r.clock.now(), 0
    for name in names:
        frame = pd.read_csv(r.s.cdr_dir / name)
        table = "data_records" if name.startswith("cdr_data") else "voice_records"
        frame.to_sql(table, engine, schema="pandas_cdr", if_exists="append", index=False)
        rows += len(frame)
    engine.dispose()
    return _stage(r, f"pandas read_csv+to_sql ({len(names)} files)", t, rows).rate


def hvs_alone(r: Run) -> dict:
    """The consumer alone over every event on the stream, into an empty Redis database."""
    parts = urlsplit(r.s.redis_url)
    url = parts._replace(path="/2").geturl()
    redis.Redis.from_url(url).flushdb()
    env = {**r.env, "REDIS_URL": url, "HVS_GROUP": "bench-alone", "HVS_METRICS_PORT": "0"}
    stage = r.run(
        "HVS consumer alone", [sys.executable, "-m", "hvs", "--drain"], "baseline", env=env
    )
    stats = {}
    for line in log_path(r.logs, "HVS consumer alone").read_text().splitlines():
        if "hvs consumer stopped" in line:
            stats = json.loads(line)
    stage.rows, stage.unit = stats.get("events_applied"), "events"
    redis.Redis.from_url(url).flushdb()
    return {
        "events": stats.get("events_applied"),
        "seconds": stats.get("seconds"),
        "events_per_s": (stats["events_applied"] / stats["seconds"]) if stats else None,
        "cpu_s": stage.cpu_s,
    }


def redis_benchmark(r: Run) -> dict:
    """HINCRBY on one connection: one round trip at a time, and 64 in a pipeline."""
    out = {}
    url = urlsplit(r.s.redis_url)  # the throwaway stack's admin login: the default user has none
    login = ["--user", unquote(url.username or "admin"), "-a", unquote(url.password or "")]
    for label, pipeline, n in (("one_round_trip", 1, 20_000), ("pipelined_64", 64, 300_000)):
        t = r.clock.now()
        done = subprocess.run(
            [
                "redis-benchmark",
                "-h",
                r.s.host,
                "-p",
                str(r.s.redis_port),
                *login,
                "--dbnum",
                "3",
                "-c",
                "1",
                "-P",
                str(pipeline),
                "-n",
                str(n),
                "-r",
                "50000",
                "-q",
                "HINCRBY",
                "bench:__rand_int__",
                "ev",
                "1",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        match = re.findall(r"([\d.]+) requests per second", done.stdout)
        out[label] = float(match[-1]) if match else None
        _stage(r, f"redis-benchmark HINCRBY ({label.replace('_', ' ')})", t, n, "ops")
    redis.Redis.from_url(r.s.redis_url.rsplit("/", 1)[0] + "/3").flushdb()
    return out


def api(r: Run) -> dict:
    from bench.hvs_api import bench_api

    client = redis.Redis.from_url(r.s.redis_url)
    keys = []
    for key in client.scan_iter(match="hvs:u:*", count=1000):
        keys.append(key.decode())
        if len(keys) >= 200:
            break
    t = r.clock.now()
    result = bench_api(r.s.redis_url, keys, seconds=2.0, conns=16, rounds=1)
    _stage(r, "API vs bare endpoint", t, 0)
    return {
        "api_rps": result["api_closed"]["rps"],
        "bare_rps": result["bare_closed"]["rps"],
        "api_p99_ms": result["api_closed"]["p99_ms"],
        "bare_p99_ms": result["bare_closed"]["p99_ms"],
        "ratio": result["rps_ratio"],
    }


def run_all(r: Run) -> dict:
    started = time.perf_counter()
    out: dict = {}
    baselines = [("landing", landing)]
    if r.scale.live_baselines:
        baselines += [("hvs_alone", hvs_alone), ("redis_benchmark", redis_benchmark), ("api", api)]
    for name, baseline in baselines:
        try:
            out[name] = baseline(r)
        except Exception as exc:  # report it with the rest; the run and the other baselines stand
            log.exception("baseline %s failed", name)
            out[name] = {"error": str(exc)}
    out["seconds"] = time.perf_counter() - started
    return out
