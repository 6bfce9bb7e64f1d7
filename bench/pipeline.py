"""Benchmark: the whole pipeline as a user runs it, end to end, at a named scale.

    python -m bench.pipeline --scale starter          # the starter's two days
    python -m bench.pipeline --scale 10x              # the starter, then ten times its days
    python -m bench.pipeline --scale tiny --skip-dbt  # the harness itself, in seconds

On a stack of its own (free ports, a temporary folder), the sources are generated first (CDR
files in the SFTP directory, ticks on the stream, transactions in the CRM). Then the clock of the
end-to-end run starts: the CDR loader (publishing), the tick sink, the change capture, the HVS
consumer and the usage API start together, as in the demo; the first `dbt build` runs in two
parts (dbt/selectors.yml): the forex and CRM layers once the tick sink and the change capture are
done, while the loader still lands, then the CDR layers once the loader is done. Every build here
runs the data tests, not dbt's unit tests (those run in `make test`: ops/dbt.py). The run ends
when every mart is built and tested and the API answers for the last CDR file. After it: a no-op
`dbt build`, one more hour of data landed and built incrementally, and a `dbt build
--full-refresh` of everything (the full-work baseline).

Then the baselines, in the same run: `psql \\copy` of the same files into the raw tables (in one
session and in as many as the loader has workers), a plain pandas `read_csv` + `to_sql` loader,
the HVS consumer alone draining the same events against `redis-benchmark`'s HINCRBY, and the
usage API against a bare Redis endpoint. Every process's peak RSS (`wait4`), Postgres' and Redis'
memory (sampled) and Redis' bytes per subscriber-day are recorded.

`10x` is ten times the days (20 days, 17.28 M CDR rows, 6.9 M ticks, 500 000 CRM transactions)
with the same 50 000 subscribers: it is the history an incremental build must not pay for that
grows, while a day of traffic (and so Redis per subscriber-day) stays the starter's; ten times the
subscribers at the starter's fixed 1000 rows per file would only spread the same rows thinner.

Results go to `--out` (default `.wtc/bench/`): `pipeline-<scale>.json`, the process logs, and the
Markdown report with its plots (`bench.report`). Nothing here fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
import urllib.request
from base64 import b64encode
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import redis

from bench import _baselines, _profile
from bench._procs import Clock, Command, MemorySampler, Stage, log_path, run, start
from bench._report import git_commit
from common.settings import PROJECT_ROOT
from ingestion.generators.cdr import STARTER_CDR_START
from ingestion.generators.common import STARTER_START
from ops.dbt import DBT_BIN, DBT_DIR, PRODUCTION_BUILD_EXCLUDES, dbt_env
from ops.progress import (
    StageDisplay,
    cdr_rows_probe,
    crm_changes_total,
    group_probe,
    inserted_probe,
    stream_length,
)
from ops.stack import Stack, free_port, port_open, throwaway, wait_until

log = logging.getLogger("bench.pipeline")
PY = sys.executable
# The first `dbt build` of the end to end, in two parts run one after the other
# (dbt/selectors.yml): the forex and CRM layers while the CDR loader lands, then the CDR layers.
FIRST_BUILDS = ("dbt build (first: forex, CRM)", "dbt build (first: CDR)")
DEFAULT_OUT = PROJECT_ROOT / ".wtc" / "bench"


@dataclass(frozen=True)
class Scale:
    name: str
    subscribers: int
    hours: float
    crm_transactions: int
    profile: str = "starter"
    rows_per_file: int = 1000
    window_seconds: int = 200
    # Redis holds every CDR event and tick of the run on its streams (35 days' retention):
    # about 870 MB at the starter's two days
    redis_maxmemory_mb: int = 2048
    # the HVS consumer alone, redis-benchmark and the API against a bare endpoint: rates per
    # event and per request, which the history behind them does not change (at 10x the
    # starter's, taken first in the same run, stand for them; draining 17 M events alone again
    # would add ten minutes)
    live_baselines: bool = True

    @property
    def windows(self) -> int:
        return round(self.hours * 3600 / self.window_seconds)

    @property
    def cdr_rows(self) -> int:
        return 2 * self.windows * self.rows_per_file


SCALES = {
    # the harness itself: a few seconds of work
    "tiny": Scale("tiny", subscribers=200, hours=0.5, crm_transactions=200, rows_per_file=100),
    # the demo's default scale
    "small": Scale("small", subscribers=2000, hours=4, crm_transactions=2000, rows_per_file=250),
    # the starter's two days: 864 file pairs, 1.728 M CDR rows, 691 200 ticks
    "starter": Scale("starter", subscribers=50_000, hours=48, crm_transactions=50_000),
    # ten times the days (see the module's docstring)
    "10x": Scale(
        "10x",
        subscribers=50_000,
        hours=480,
        crm_transactions=500_000,
        redis_maxmemory_mb=12288,
        live_baselines=False,
    ),
}


def gen_cdr(scale: Scale, start: datetime, hours: float, out: Path, seed: int) -> list[str]:
    return [
        PY,
        "-m",
        "ingestion.generators",
        "cdr",
        "--profile",
        scale.profile,
        "--seed",
        str(seed),
        "--subscribers",
        str(scale.subscribers),
        "--start",
        start.isoformat(sep=" "),
        "--hours",
        str(hours),
        "--rows-per-file",
        str(scale.rows_per_file),
        "--window-seconds",
        str(scale.window_seconds),
        "--out",
        str(out),
    ]


def gen_ticks(start: datetime, hours: float, stream_url: str, seed: int) -> list[str]:
    return [
        PY,
        "-m",
        "ingestion.generators",
        "forex",
        "--seed",
        str(seed),
        "--start",
        start.isoformat(sep=" "),
        "--hours",
        str(hours),
        "--stream-url",
        stream_url,
    ]


class Run:
    """One pipeline run on one stack: its stages, its figures, its logs."""

    def __init__(
        self, stack: Stack, scale: Scale, out: Path, display: StageDisplay, profile: bool = False
    ) -> None:
        self.profile = profile
        self.stack = stack
        self.s = stack.s
        self.scale = scale
        self.out = out
        self.logs = out / f"logs-{scale.name}"
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True)
        self.display = display
        self.clock = Clock()
        self.stages: list[Stage] = []
        self.figures: dict = {
            "scale": asdict(scale),
            "commit": git_commit(),
            "profile": {"sql": {}, "python": {}},
        }
        self.metrics_port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("WTC_", "DBT_"))},
            "WTC_ANALYTICS_DSN": self.s.analytics_dsn,
            "WTC_PROD_DSN": self.s.prod_dsn,
            "REDIS_URL": self.s.redis_url,
            "STREAM_URL": self.s.stream_url,
            "SFTP_URL": self.s.sftp_url,
            "CDR_DIR": ".",
            "CDR_METRICS_PORT": "0",
            "TICK_SINK_METRICS_PORT": "0",
            "CRM_CDC_METRICS_PORT": "0",
            "HVS_METRICS_PORT": str(self.metrics_port),
            "API_METRICS_PORT": "0",  # its default is the demo's fixed port
            "WTC_LOG_FORMAT": "json",
        }
        self.dbt_env = {**dbt_env(self.s, self.out / f"dbt-{scale.name}"), "WTC_LOG_FORMAT": "json"}

    # -- running stages ------------------------------------------------------------------------

    def run(self, name: str, argv: list[str], phase: str, rows: int | None = None, **kw) -> Stage:
        stage = run(
            self.clock, name, argv, kw.pop("env", self.env), self.logs, kw.pop("cwd", PROJECT_ROOT)
        )
        stage.phase, stage.rows = phase, rows
        self.stages.append(stage)
        return stage

    def start(self, name: str, argv: list[str], phase: str = "e2e", **kw) -> Command:
        command = start(
            self.clock, name, argv, kw.pop("env", self.env), self.logs, kw.pop("cwd", PROJECT_ROOT)
        )
        command.stage.phase = phase
        self.stages.append(command.stage)
        return command

    def dbt(self, name: str, *args: str, phase: str) -> Stage:
        task = self.display.add(name, self._dbt_probe(name), unit="nodes")
        stage = self.run(name, [str(DBT_BIN), *args], phase, env=self.dbt_env, cwd=DBT_DIR)
        self.display.finish(task)
        self.sql_profile(name)
        results = json.loads(
            (self.out / f"dbt-{self.scale.name}" / "target" / "run_results.json").read_text()
        )
        stage.rows = len(results["results"])
        stage.unit = "nodes"
        return stage

    def _dbt_probe(self, name: str):
        path = log_path(self.logs, name)
        pattern = re.compile(rb"(\d+) of (\d+) (?:OK|PASS|ERROR|FAIL|WARN|SKIP)")

        def probe() -> tuple[float, float | None]:
            found = pattern.findall(path.read_bytes()[-20000:]) if path.exists() else []
            if not found:
                return 0.0, None
            return float(len(pattern.findall(path.read_bytes()))), float(found[-1][1])

        return probe

    # -- the sources ---------------------------------------------------------------------------

    def generate(self) -> None:
        sc = self.scale
        self.run(
            "generate CDR files",
            gen_cdr(sc, STARTER_CDR_START, sc.hours, self.s.cdr_dir, 42),
            "sources",
            sc.cdr_rows,
        )
        # the change capture takes its slot and snapshot first, so the transactions that follow
        # land as changes (as in the demo)
        self.run("CRM CDC slot", [PY, "-m", "ingestion.crm_cdc", "--once"], "sources")
        self.run(
            "generate CRM transactions",
            [
                PY,
                "-m",
                "ingestion.generators",
                "crm",
                "--profile",
                sc.profile,
                "--seed",
                "42",
                "--subscribers",
                str(sc.subscribers),
                "--transactions",
                str(sc.crm_transactions),
                "--dsn",
                self.s.prod_dsn,
            ],
            "sources",
            sc.crm_transactions,
        )
        self.stages[-1].unit = "transactions"
        ticks = self.run(
            "publish ticks", gen_ticks(STARTER_START, sc.hours, self.s.stream_url, 42), "sources"
        )
        ticks.rows = int(stream_length(self.s.stream_url, "tick-data")() or 0)
        self.figures["sources"] = {
            "cdr_rows": sc.cdr_rows,
            "cdr_files": 2 * sc.windows,
            "ticks": ticks.rows,
            "crm_changes": int(crm_changes_total(self.s.prod_dsn)() or 0),
        }

    # -- the end-to-end run --------------------------------------------------------------------

    def e2e(self, skip_dbt: bool) -> None:
        s, src = self.s, self.figures["sources"]
        dsn = s.analytics_dsn
        t0 = self.clock.now()
        api_port = free_port()
        commands = {
            "CDR loader": self.start(
                "CDR loader", self.spied("CDR loader", [PY, "-m", "ingestion.cdr_loader", "--once"])
            ),
            "tick sink": self.start("tick sink", [PY, "-m", "ingestion.tick_sink", "--once"]),
            "CRM CDC": self.start("CRM CDC", [PY, "-m", "ingestion.crm_cdc", "--once"]),
        }
        hvs = self.start("HVS consumer (process)", [PY, "-m", "hvs"], phase="service")
        api = self.start(
            "usage API (process)",
            [
                PY,
                "-m",
                "uvicorn",
                "api.app:app",
                "--host",
                s.host,
                "--port",
                str(api_port),
                "--no-access-log",
            ],
            phase="service",
        )
        tasks = {
            "CDR loader": self.display.add("CDR loader", cdr_rows_probe(dsn, src["cdr_rows"])),
            "tick sink": self.display.add(
                "tick sink", inserted_probe(dsn, "forex_data", lambda: src["ticks"]), unit="ticks"
            ),
            "CRM CDC": self.display.add(
                "CRM CDC", inserted_probe(dsn, "crm_data", lambda: src["crm_changes"]), "changes"
            ),
        }
        hvs_task = self.display.add(
            "HVS consumer",
            group_probe(s.stream_url, ["cdr-data", "cdr-voice"], "hvs", src["cdr_rows"]),
            unit="events",
        )

        def landed(name: str) -> None:
            stage = commands[name].wait()
            self.display.finish(tasks[name])
            if stage.exit_code:
                raise RuntimeError(f"{name} failed (exit {stage.exit_code}); see {self.logs}")

        # the forex and CRM layers are built and tested as soon as their landings are done,
        # while the CDR loader still lands; the CDR layers once it is done (dbt/selectors.yml)
        landed("tick sink")
        landed("CRM CDC")
        dbt_first = None
        if not skip_dbt:
            self.sql_profile("landing")
            dbt_first = self.start_dbt(FIRST_BUILDS[0], "--selector", "before_cdr")
        landed("CDR loader")
        counts = self.landed_counts()
        commands["CDR loader"].stage.rows = counts["cdr_rows"]
        commands["tick sink"].stage.rows = counts["ticks"]
        commands["tick sink"].stage.unit = "ticks"
        commands["CRM CDC"].stage.rows = counts["crm_changes"]
        commands["CRM CDC"].stage.unit = "changes"
        if dbt_first is not None:
            self.wait_dbt(*dbt_first)
            dbt_first = self.start_dbt(FIRST_BUILDS[1], "--selector", "cdr")
        # the HVS is done when its group has read and acknowledged every CDR event
        probe = group_probe(s.stream_url, ["cdr-data", "cdr-voice"], "hvs", src["cdr_rows"])
        wait_until(
            lambda: probe()[0] >= counts["cdr_rows"], "the HVS consumer", timeout=7200, interval=0.1
        )
        hvs_done = self.clock.now()
        self.display.finish(hvs_task)
        caught_up = Stage("HVS consumer", hvs.stage.started, hvs_done, counts["cdr_rows"], "events")
        self.stages.append(caught_up)
        self.figures["hvs_e2e"] = {"events": counts["cdr_rows"], "done_at": hvs_done - t0}
        answered = self.api_answers_last_file(api_port)
        answered["at"] = self.clock.now() - t0
        self.figures["api_last_file"] = answered
        self.stages.append(Stage("API answers the last file", hvs_done, self.clock.now()))
        if dbt_first is not None:
            self.wait_dbt(*dbt_first)
        end = self.clock.now()
        self.figures["e2e_seconds"] = end - t0
        self.figures["e2e_started"] = t0
        self.figures["landing_to_applied"] = self.scrape_latency()
        self.live = (hvs, api, api_port)

    def start_dbt(self, name: str, *args: str) -> tuple[Command, object]:
        """Start one part of the first `dbt build` (its data tests, not the unit tests)."""
        task = self.display.add(name, self._dbt_probe(name), unit="nodes")
        argv = self.spied(name, [str(DBT_BIN), "build", *PRODUCTION_BUILD_EXCLUDES, *args])
        return self.start(name, argv, env=self.dbt_env, cwd=DBT_DIR), task

    def wait_dbt(self, command: Command, task: object) -> None:
        stage = command.wait()
        self.display.finish(task)
        if stage.exit_code:
            raise RuntimeError(f"{stage.name} failed; see {self.logs}")
        self.dbt_nodes(stage)
        self.sql_profile(stage.name)

    def spied(self, name: str, argv: list[str]) -> list[str]:
        """`argv` under py-spy with --profile (its peak RSS is then py-spy's own)."""
        if not self.profile:
            return argv
        return _profile.pyspy(argv, log_path(self.logs, name).with_suffix(".pyspy.txt"))

    def sql_profile(self, name: str) -> None:
        if self.profile:
            self.figures["profile"]["sql"][name] = _profile.top_statements(self.s.analytics_dsn)

    def python_profiles(self) -> None:
        for raw in self.logs.glob("*.pyspy.txt"):
            self.figures["profile"]["python"][raw.name] = _profile.summarise(raw)

    def dbt_nodes(self, stage: Stage) -> None:
        results = json.loads(
            (self.out / f"dbt-{self.scale.name}" / "target" / "run_results.json").read_text()
        )
        stage.rows, stage.unit = len(results["results"]), "nodes"

    def landed_counts(self) -> dict[str, int]:
        with psycopg.connect(self.s.analytics_dsn, autocommit=True) as conn:
            one = lambda sql: int(conn.execute(sql).fetchone()[0] or 0)  # noqa: E731
            return {
                "cdr_rows": one("select sum(rows_landed) from cdr_data.files"),
                "ticks": one("select count(*) from forex_data.ticks"),
                "crm_changes": one(
                    "select (select count(*) from crm_data.accounts_changes)"
                    " + (select count(*) from crm_data.addresses_changes)"
                    " + (select count(*) from crm_data.devices_changes)"
                ),
            }

    def last_file_key(self) -> tuple[str, str]:
        """The msisdn and day of the last row of the last CDR data file."""
        last = sorted(self.s.cdr_dir.glob("cdr_data_*.csv"))[-1]
        row = last.read_text().strip().splitlines()[-1].split(",")
        return row[0], row[-1][:10].replace("-", "")

    def api_answers_last_file(self, port: int) -> dict:
        msisdn, day = self.last_file_key()
        end = (datetime.strptime(day, "%Y%m%d") + timedelta(days=1)).strftime("%Y%m%d%H%M%S")
        url = f"http://{self.s.host}:{port}/data_usage?msisdn={msisdn}&start_time={day}000000&end_time={end}"
        request = urllib.request.Request(
            url, headers={"Authorization": "Basic " + b64encode(b"wtc:wtc-dev").decode()}
        )
        wait_until(lambda: port_open(self.s.host, port), "the usage API", timeout=60)
        t = time.perf_counter()
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.loads(response.read())
        return {
            "status": response.status,
            "request_ms": (time.perf_counter() - t) * 1000,
            "answer_nonempty": bool(body),
            "msisdn": msisdn,
            "day": day,
        }

    def scrape_latency(self) -> dict:
        """The HVS's landing-to-applied histogram (publish to applied in Redis, which is when the
        API can answer): the bucket bounds of its p50 and p99."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
            ) as r:
                text = r.read().decode()
        except OSError as exc:
            return {"error": str(exc)}
        buckets = []
        for m in re.finditer(
            r'^hvs_landing_to_applied_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M
        ):
            buckets.append((float(m.group(1)), float(m.group(2))))
        total = buckets[-1][1] if buckets else 0

        def bound(q: float) -> float | None:
            return next((le for le, c in buckets if total and c >= q * total), None)

        return {"batches": total, "p50_le_s": bound(0.5), "p99_le_s": bound(0.99)}

    # -- after the end-to-end run --------------------------------------------------------------

    def incremental(self) -> None:
        sc = self.scale
        self.dbt("dbt build (no-op)", "build", *PRODUCTION_BUILD_EXCLUDES, phase="incremental")
        hour_start = STARTER_CDR_START + timedelta(hours=sc.hours)
        rows = 2 * round(3600 / sc.window_seconds) * sc.rows_per_file
        self.run(
            "one hour: generate CDR",
            gen_cdr(sc, hour_start, 1, self.s.cdr_dir, 43),
            "incremental",
            rows,
        )
        self.run(
            "one hour: publish ticks",
            gen_ticks(STARTER_START + timedelta(hours=sc.hours), 1, self.s.stream_url, 43),
            "incremental",
        )
        self.run(
            "one hour: CDR loader",
            [PY, "-m", "ingestion.cdr_loader", "--once"],
            "incremental",
            rows,
        )
        self.run("one hour: tick sink", [PY, "-m", "ingestion.tick_sink", "--once"], "incremental")
        self.dbt("dbt build (one hour)", "build", *PRODUCTION_BUILD_EXCLUDES, phase="incremental")
        self.dbt(
            "dbt build --full-refresh",
            "build",
            "--full-refresh",
            *PRODUCTION_BUILD_EXCLUDES,
            phase="incremental",
        )

    def stop_live(self) -> None:
        hvs, api, _ = self.live
        for command in (hvs, api):
            command.stop()

    # -- results -------------------------------------------------------------------------------

    def result(self) -> dict:
        by_name = {st.name: st for st in self.stages}
        self.figures["stages"] = [
            asdict(st) | {"seconds": st.seconds, "rate": st.rate} for st in self.stages
        ]
        self.figures["peak_rss_mb"] = {
            st.name: st.peak_rss_mb for st in self.stages if st.peak_rss_mb
        }
        first = [by_name[name] for name in FIRST_BUILDS if name in by_name]
        noop = by_name.get("dbt build (no-op)")
        if len(first) == len(FIRST_BUILDS) and noop:
            # the first build's two parts run one after the other: together they are its work
            self.figures["first_build_seconds"] = sum(stage.seconds for stage in first)
            self.figures["noop_over_first"] = noop.seconds / self.figures["first_build_seconds"]
        hour, full = by_name.get("dbt build (one hour)"), by_name.get("dbt build --full-refresh")
        if hour and full:
            self.figures["hour_over_full"] = hour.seconds / full.seconds
        return self.figures


def redis_bytes_per_subscriber_day(redis_url: str) -> dict:
    """Every key of the HVS database, by kind, with MEMORY USAGE (pipelined SCAN)."""
    r = redis.Redis.from_url(redis_url)
    kinds: dict[str, list[int]] = {}
    batch: list[bytes] = []

    def flush() -> None:
        pipe = r.pipeline(transaction=False)
        for key in batch:
            pipe.memory_usage(key, samples=0)
        for key, size in zip(batch, pipe.execute(), strict=True):
            kind = key.split(b":")[1].decode() if key.count(b":") else key.decode()
            kinds.setdefault(kind, [0, 0])
            kinds[kind][0] += 1
            kinds[kind][1] += size or 0
        batch.clear()

    for key in r.scan_iter(count=5000):
        batch.append(key)
        if len(batch) >= 2000:
            flush()
    if batch:
        flush()
    usage_keys, usage_bytes = kinds.get("u", [0, 0])
    total = sum(b for _, b in kinds.values())
    return {
        "subscriber_days": usage_keys,
        "usage_hash_bytes": usage_bytes / max(usage_keys, 1),
        "all_hvs_bytes": total / max(usage_keys, 1),
        "by_kind": {k: {"keys": n, "bytes": b} for k, (n, b) in kinds.items()},
    }


def cap_slot_wal(stack: Stack, gigabytes: int = 8) -> None:
    """The change capture runs once, in the end to end (as `--once`), and its replication slot
    then holds on to the WAL of every later write: at 10x, the loader's and every build's, more
    than this disk holds. Past `gigabytes` the slot gives it up (and is invalidated: no later
    step of the run reads it)."""
    with psycopg.connect(stack.s.pg_dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"alter system set max_slot_wal_keep_size = '{gigabytes}GB'")
        conn.execute("select pg_reload_conf()")


def run_scale(
    scale: Scale,
    out: Path,
    skip_dbt: bool,
    skip_baselines: bool,
    display: StageDisplay,
    profile: bool = False,
) -> dict:
    load_before = os.getloadavg()
    with throwaway("wtc-bench-", redis_maxmemory_mb=scale.redis_maxmemory_mb) as stack:
        if profile:
            _profile.enable_pg_stat_statements(stack)
        cap_slot_wal(stack)
        r = Run(stack, scale, out, display, profile)
        r.generate()
        postmaster = stack.postgres_pid()
        assert postmaster is not None
        with MemorySampler(postmaster, stack.s.redis_url, r.clock) as memory:
            r.e2e(skip_dbt)
            r.figures["redis"] = redis_bytes_per_subscriber_day(stack.s.redis_url)
            if not skip_dbt:
                r.incremental()
            r.stop_live()
            r.python_profiles()
            r.figures["memory_peak"] = dict(memory.peak)
            r.figures["memory_series"] = memory.series[:: max(1, len(memory.series) // 400)]
        if not skip_baselines:
            r.figures["baselines"] = _baselines.run_all(r)
        figures = r.result()
    figures["load_before"] = load_before
    figures["load_after"] = os.getloadavg()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pipeline", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--scale",
        choices=sorted(SCALES),
        default="small",
        help="10x also runs the starter first: its baseline for the scale ratios",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (ignored)")
    parser.add_argument("--skip-dbt", action="store_true", help="landing and live side only")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the CDR loader and the first dbt build, pg_stat_statements for every "
        "dbt build (timings then include the profilers' cost)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the live progress display (default: on in a terminal)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    names = ["starter", "10x"] if args.scale == "10x" else [args.scale]
    results = {}
    with StageDisplay(enabled=args.progress) as display:
        for name in names:
            results[name] = run_scale(
                SCALES[name], args.out, args.skip_dbt, args.skip_baselines, display, args.profile
            )
            (args.out / f"pipeline-{name}.json").write_text(
                json.dumps(results[name], indent=1, default=str)
            )
    from bench import _report as report

    path = report.write(args.out, results)
    print(report.summary(results))
    print(f"\nreport: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
