"""A progress display for long runs (the demo, the benchmarks): each stage's rows done, its rate
and an ETA, drawn with `rich` in a terminal.

The display watches the stages from outside, by probes that read what the stage leaves behind
(rows in the raw tables, the stream's consumer groups, dbt's node count); the processes it watches
are not changed and their logs stay plain (they go to files while the display runs). Off a
terminal it prints nothing: a batch run keeps its logs.

    with StageDisplay() as display:
        display.add("CDR loader", cdr_rows_probe(dsn, total_rows))
        ...
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from common.settings import StackSettings

log = logging.getLogger("ops.progress")

Probe = Callable[[], tuple[float, float | None]]
"""Returns (done, total); total None while unknown. Called from the display's thread."""


def _short(n: float) -> str:
    for bound, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= bound:
            return f"{n / bound:.1f}{suffix}"
    return f"{n:.0f}"


class CountColumn(ProgressColumn):
    """Done of total, shortened (1.2M/1.7M)."""

    def render(self, task: Task) -> Text:
        total = "?" if task.total is None else _short(task.total)
        return Text(f"{_short(task.completed):>6}/{total:<6}", style="progress.download")


class RateColumn(ProgressColumn):
    """Rows per second over rich's sliding window, as a plain number with its unit."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("      - /s", style="progress.data.speed")
        unit = task.fields.get("unit", "rows")
        return Text(f"{_short(speed):>6} {unit}/s", style="progress.data.speed")


class StageDisplay:
    """A live table of stages, refreshed from their probes every `interval` seconds."""

    def __init__(self, interval: float = 0.5, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.interval = interval
        self._probes: dict[TaskID, Probe] = {}
        self._finished: set[TaskID] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.progress = Progress(
            TextColumn("{task.description:<20}"),
            BarColumn(bar_width=20),
            CountColumn(),
            RateColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not self.enabled,
            speed_estimate_period=10.0,
        )

    def add(self, name: str, probe: Probe, unit: str = "rows") -> TaskID:
        """Watch a stage from now on."""
        with self._lock:
            task = self.progress.add_task(name, total=None, unit=unit)
            self._probes[task] = probe
        return task

    def finish(self, task: TaskID) -> None:
        """The stage ended: one last reading, then its bar stops (rate frozen)."""
        self._update(task)
        with self._lock:
            self._finished.add(task)
        t = self.progress.tasks[task] if task < len(self.progress.tasks) else None
        if t is not None and t.total is None:
            self.progress.update(task, total=t.completed)

    def _update(self, task: TaskID) -> None:
        try:
            done, total = self._probes[task]()
        except Exception as exc:  # a probe's server may be busy or gone: keep the last figure
            log.debug("progress probe failed", extra={"error": str(exc)})
            return
        self.progress.update(task, completed=done, total=total)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                tasks = [t for t in self._probes if t not in self._finished]
            for task in tasks:
                self._update(task)

    def __enter__(self) -> StageDisplay:
        if self.enabled:
            self.progress.start()
            self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with contextlib.suppress(Exception):
            for task in list(self._probes):
                if task not in self._finished:
                    self._update(task)
        self.progress.stop()


# -- probes: what each stage leaves behind ------------------------------------------------------


def _scalar(dsn: str, sql: str) -> float:
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(sql).fetchone()
    return float(row[0] or 0) if row else 0.0


def cdr_rows_probe(analytics_dsn: str, total: float | None) -> Probe:
    """CDR rows landed (the loader's file table, one row per file: cheap to sum)."""
    sql = "select sum(rows_landed) from cdr_data.files"
    return lambda: (_scalar(analytics_dsn, sql), total)


def inserted_probe(dsn: str, schema: str, total: Callable[[], float | None]) -> Probe:
    """Rows inserted into a schema's tables, from Postgres' statistics (no count(*) of a growing
    table; the figures trail a committed transaction by up to a second)."""
    # the schema is one of the project's own names, never input
    sql = f"select sum(n_tup_ins) from pg_stat_user_tables where schemaname = '{schema}'"
    return lambda: (_scalar(dsn, sql), total())


def crm_changes_total(prod_dsn: str) -> Callable[[], float | None]:
    """Row changes committed in the CRM source so far: what the change capture has to land."""
    sql = (
        "select sum(n_tup_ins + n_tup_upd + n_tup_del) from pg_stat_user_tables"
        " where schemaname = 'crm_system'"
    )
    return lambda: _scalar(prod_dsn, sql)


def stream_length(stream_url: str, topic: str) -> Callable[[], float | None]:
    """Entries ever added to a Redis stream (its total to consume)."""
    import redis

    client = redis.Redis.from_url(stream_url)

    def total() -> float | None:
        info = client.xinfo_stream(f"stream:{topic}")
        return float(info.get("entries-added", info["length"]))

    return total


def group_probe(
    stream_url: str, topics: list[str], group: str, total: float | None = None
) -> Probe:
    """Entries a consumer group has read and acknowledged, over its topics (Redis Streams);
    the total is the entries added so far unless `total` fixes it."""
    import redis

    client = redis.Redis.from_url(stream_url, decode_responses=True)

    def probe() -> tuple[float, float | None]:
        done, added = 0.0, 0.0
        for topic in topics:
            key = f"stream:{topic}"
            if not client.exists(key):
                continue
            added += float(client.xinfo_stream(key).get("entries-added", 0))
            for g in client.xinfo_groups(key):
                if g["name"] == group:
                    done += float(g.get("entries-read") or 0) - float(g["pending"])
        return done, (total if total is not None else added)

    return probe


def cdr_rows_in(directory: Path) -> int:
    """Rows (lines after the header) in the CDR files of a local directory."""
    rows = 0
    for path in directory.glob("cdr_*.csv"):
        with path.open("rb") as f:
            rows += max(
                sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b"")) - 1, 0
            )
    return rows


def landing_display(settings: StackSettings, enabled: bool | None = None) -> StageDisplay:
    """The demo's display of its landing: CDR rows, ticks and CRM changes against their totals."""
    display = StageDisplay(enabled=enabled)
    if display.enabled:
        dsn = settings.analytics_dsn
        cdr_total = float(cdr_rows_in(settings.cdr_dir))
        ticks_total = stream_length(settings.stream_url, "tick-data")
        display.add("CDR loader", cdr_rows_probe(dsn, cdr_total))
        display.add("tick sink", inserted_probe(dsn, "forex_data", ticks_total), unit="ticks")
        display.add(
            "CRM CDC",
            inserted_probe(dsn, "crm_data", crm_changes_total(settings.prod_dsn)),
            unit="changes",
        )
    return display
