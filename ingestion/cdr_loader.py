"""The CDR loader: lands the CDR files of an SFTP directory in `cdr_data.*` and publishes them.

    python -m ingestion.cdr_loader --once      # land every complete file, then exit
    python -m ingestion.cdr_loader             # follow: poll every few seconds, metrics on a port

A file is taken once it is complete: its size and modification time were the same in an earlier
listing at least `settle_seconds` ago, and it ends with a newline (uploads write in place under
the final name). Each file lands in one transaction (`ingestion.cdr_landing`), then its rows are
published to the stream (`ingestion.cdr_publish`). SFTP, Postgres and stream outages are logged
and retried with backoff; SIGTERM lets the files in hand finish, then the loader exits.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import Field
from pydantic_settings import SettingsConfigDict
from tqdm import tqdm

from common.closing import Closing
from common.logs import setup_logging
from common.service import backoff, serve_metrics, stop_on_signals
from common.settings import ServiceSettings
from ingestion.cdr_format import kind_of
from ingestion.cdr_landing import (
    Landing,
    land_file,
    prepare_session,
    reject_file_name,
    skip_file,
)
from ingestion.cdr_publish import publish_file, unpublished_files
from ingestion.cdr_sftp import SFTP_ERRORS, CdrSftp, RemoteFile
from ingestion.stream import Producer, StreamError, open_producer

log = logging.getLogger("ingestion.cdr_loader")

DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)
"""What a lost or refused Postgres connection raises."""


class LoaderSettings(ServiceSettings):
    """The loader's settings: connections (`WTC_ANALYTICS_DSN`, `SFTP_URL`, `STREAM_URL`,
    `CDR_DIR`) from `common.settings.Connections`, the rest `CDR_*`."""

    model_config = SettingsConfigDict(env_prefix="CDR_", extra="ignore", populate_by_name=True)

    REDIS_ROLE = "cdr_loader"
    SECRET_FIELDS = ("analytics_dsn", "sftp_url", "stream_url")

    poll_interval: float = Field(default=5.0, gt=0, description="seconds between polls (follow)")
    settle_seconds: float = Field(
        default=1.0, ge=0, description="a file's size must be unchanged this long to be taken"
    )
    workers: int = Field(default=2, ge=1, le=16, description="files landed in parallel")
    rescan: bool = Field(
        default=False,
        description="read every file once, even one whose size and modification time match what"
        " was landed (a re-upload that kept both); the checksum decides",
    )
    publish: bool = Field(default=True, description="publish landed rows to the stream")
    metrics_port: int = Field(default=19101, description="Prometheus metrics (follow mode)")
    backoff_max: float = Field(default=30.0, gt=0, description="longest wait between retries")
    once_attempts: int = Field(
        default=5, ge=1, description="--once: consecutive failed polls before giving up"
    )
    known_hosts: Path | None = Field(
        default=None, description="OpenSSH known_hosts file to verify the server's host key"
    )


class Metrics:
    """The loader's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.files = Counter(
            "cdr_loader_files",
            "Files handled, by kind and outcome",
            ["kind", "outcome"],
            registry=r,
        )
        self.rows = Counter("cdr_loader_rows_landed", "Rows landed", ["kind"], registry=r)
        self.rejects = Counter("cdr_loader_rows_rejected", "Rows rejected", ["kind"], registry=r)
        self.published = Counter(
            "cdr_loader_rows_published", "Rows published to the stream", ["kind"], registry=r
        )
        self.errors = Counter(
            "cdr_loader_errors",
            "Failures, by where (sftp, postgres, stream, file)",
            ["where"],
            registry=r,
        )
        for where in ("sftp", "postgres", "stream", "file"):
            self.errors.labels(where)  # exported at 0 from the start, not from the first failure
        self.lag = Gauge(
            "cdr_loader_lag_seconds",
            "Age of the oldest file waiting to be landed (0 when caught up)",
            registry=r,
        )
        self.pending = Gauge("cdr_loader_pending_files", "Files seen, not yet landed", registry=r)
        self.last_poll = Gauge(
            "cdr_loader_last_poll_timestamp_seconds", "When the last poll ended", registry=r
        )


@dataclass
class PollResult:
    """What one poll did."""

    landed: list[Landing] = field(default_factory=list)
    waiting: int = 0
    incomplete: int = 0
    failed: int = 0
    errors: int = 0
    published: int = 0

    @property
    def rows_landed(self) -> int:
        return sum(x.rows_landed for x in self.landed)


@dataclass
class _Seen:
    size: int
    mtime: int
    since: float


class _Resources(threading.local):
    sftp: CdrSftp | None = None
    conn: psycopg.Connection | None = None


class CdrLoader(Closing):
    """Polls the SFTP directory and lands, replaces, skips or rejects its files."""

    def __init__(
        self, settings: LoaderSettings, metrics: Metrics | None = None, progress: bool | None = None
    ) -> None:
        self.s = settings
        self.metrics = metrics or Metrics()
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.stop = threading.Event()
        self._local = _Resources()
        self._all_resources: list[Any] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="cdr-land")
        self._producer: Producer | None = None
        self._seen: dict[str, _Seen] = {}
        self._done: dict[str, tuple[int, int]] = {}
        self._incomplete: dict[str, tuple[int, int]] = {}
        self._pending: dict[str, int] = {}
        self._known: dict[str, tuple[int, float]] | None = None

    # -- resources (one SFTP session and one Postgres connection per thread) -------------------

    def _sftp(self) -> CdrSftp:
        if self._local.sftp is None:
            self._local.sftp = CdrSftp(
                self.s.sftp_url, self.s.cdr_dir, self.s.known_hosts, self.s.sftp_key_file
            )
            with self._lock:
                self._all_resources.append(self._local.sftp)
        return self._local.sftp

    def _conn(self) -> psycopg.Connection:
        if self._local.conn is None:
            conn = psycopg.connect(
                self.s.analytics_dsn,
                autocommit=True,
                application_name="cdr_loader",
                connect_timeout=10,
            )
            try:
                prepare_session(conn)
            except BaseException:
                conn.close()
                raise
            self._local.conn = conn
            with self._lock:
                self._all_resources.append(conn)
        return self._local.conn

    def _drop(self, what: str) -> None:
        resource = getattr(self._local, what)
        setattr(self._local, what, None)
        if resource is not None:
            with self._lock:
                if resource in self._all_resources:
                    self._all_resources.remove(resource)
            try:
                resource.close()
            except Exception:
                log.debug("closing a broken %s failed", what, exc_info=True)

    def _stream(self) -> Producer:
        with self._lock:
            if self._producer is None:
                self._producer = open_producer(self.s.stream_url)
            return self._producer

    def _drop_stream(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close()
            except Exception:
                log.debug("closing the producer failed", exc_info=True)

    def close(self) -> None:
        """Wait for the files in hand, then close every connection."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            resources, self._all_resources = self._all_resources, []
        for resource in resources:
            try:
                resource.close()
            except Exception:
                log.debug("closing failed", exc_info=True)
        self._local = _Resources()
        self._drop_stream()

    # -- one poll ------------------------------------------------------------------------------

    def poll_once(self) -> PollResult:
        """List the directory once; land the complete files; publish what is unpublished.

        Connection failures are logged and counted in `errors` (the caller backs off); a file
        that fails for another reason is logged and counted in `failed`, and retried next poll.
        """
        result = PollResult()
        if self.s.publish:
            self._publish_pending(result)
        try:
            listing = self._sftp().listing()
        except SFTP_ERRORS as exc:
            self._sftp_failed("listing the CDR directory failed", exc)
            result.errors += 1
            return result
        try:
            candidates = self._select(listing, result)
        except DB_ERRORS as exc:
            self._db_failed("reading the landed files failed", exc)
            result.errors += 1
            return result
        if candidates:
            self._land_all(candidates, result)
            for landing in result.landed:
                self._pending.pop(landing.file_name, None)
            self._report_backlog()
        self.metrics.last_poll.set_to_current_time()
        return result

    def _select(self, listing: list[RemoteFile], result: PollResult) -> list[RemoteFile]:
        known = {} if self.s.rescan else self._known_files()
        now = time.monotonic()
        listed = {f.name for f in listing}
        for name in list(self._seen):
            if name not in listed:
                del self._seen[name]
        candidates: list[RemoteFile] = []
        self._pending = {}  # not landed yet: name -> modification time
        for f in listing:
            key = (f.size, f.mtime)
            if self._done.get(f.name) == key:
                continue
            if self._incomplete.get(f.name) == key:
                self._pending[f.name] = f.mtime  # still waiting for its last line
                continue
            if f.skip is not None:
                self._skip(f)
                self._done[f.name] = key
                continue
            if kind_of(f.name) is None:
                self._reject_name(f)
                self._done[f.name] = key
                continue
            landed = known.get(f.name)
            if landed is not None and landed[0] == f.size and f.mtime < landed[1] - 1:
                self._done[f.name] = key  # unchanged since it was landed (by an earlier run)
                continue
            seen = self._seen.get(f.name)
            if seen is None or (seen.size, seen.mtime) != key:
                self._seen[f.name] = _Seen(f.size, f.mtime, now)
                result.waiting += 1
            elif now - seen.since < self.s.settle_seconds:
                result.waiting += 1
            else:
                candidates.append(f)
            self._pending[f.name] = f.mtime
        self._report_backlog()
        # Oldest window first: the timestamp in the name, data before voice.
        return sorted(candidates, key=lambda f: (f.name[-19:], f.name))

    def _report_backlog(self) -> None:
        """The pending and lag gauges from the files not landed yet."""
        pending = self._pending
        self.metrics.pending.set(len(pending))
        oldest = min(pending.values(), default=None)
        self.metrics.lag.set(0.0 if oldest is None else max(0.0, time.time() - oldest))

    def _known_files(self) -> dict[str, tuple[int, float]]:
        if self._known is None:
            rows = (
                self._conn()
                .execute(
                    "select file_name, size_bytes, extract(epoch from loaded_at)::float8"
                    " from cdr_data.files"
                )
                .fetchall()
            )
            self._known = {name: (size, loaded) for name, size, loaded in rows}
        return self._known

    def _reject_name(self, f: RemoteFile) -> None:
        reason = (
            "not a CDR file: the name does not match "
            "cdr_data_YYYYmmdd_HHMMSS.csv or cdr_voice_YYYYmmdd_HHMMSS.csv"
        )
        if any(ch < " " or ch == "\x7f" for ch in f.name):
            reason = "not a CDR file: the name holds control characters"
        self._reject_file(f.name, reason)

    def _reject_file(self, name: str, reason: str) -> None:
        """A file rejected as a whole: recorded (line 0 of `cdr_data.rejected_rows`), counted
        once, logged."""
        if reject_file_name(self._conn(), name, reason):
            log.error("rejected a file", extra={"file": name, "reason": reason})
            self.metrics.files.labels("none", "rejected").inc()
            self.metrics.rejects.labels("none").inc()

    def _skip(self, f: RemoteFile) -> None:
        """An entry that is not taken: recorded in `cdr_data.skipped_files`, counted once."""
        if skip_file(self._conn(), f.name, f.skip or ""):
            log.warning("skipped a directory entry", extra={"file": f.name, "reason": f.skip})
            self.metrics.files.labels("none", "skipped").inc()

    def _land_all(self, candidates: list[RemoteFile], result: PollResult) -> None:
        bar = tqdm(total=len(candidates), unit="file", desc="cdr files", disable=not self.progress)
        futures: dict[Future, RemoteFile] = {
            self._pool.submit(self._take, f): f for f in candidates
        }
        rows = 0
        try:
            for future in as_completed(futures):
                f = futures[future]
                if self.stop.is_set():
                    for other in futures:
                        other.cancel()
                if future.cancelled():
                    continue
                outcome, landing = future.result()
                key = (f.size, f.mtime)
                if outcome == "unpublished":
                    result.errors += 1  # landed; the publish is retried after a backoff
                if outcome in ("done", "unpublished") and landing is not None:
                    self._done[f.name] = key
                    self._incomplete.pop(f.name, None)
                    self._seen.pop(f.name, None)
                    result.landed.append(landing)
                    rows += landing.rows_landed
                    bar.update(1)
                    bar.set_postfix(rows=rows, refresh=False)
                elif outcome == "incomplete":
                    self._incomplete[f.name] = key
                    result.incomplete += 1
                elif outcome == "changed":
                    self._seen.pop(f.name, None)
                    result.waiting += 1
                elif outcome == "rejected":  # recorded; taken again once it changes
                    self._done[f.name] = key
                    self._seen.pop(f.name, None)
                elif outcome == "error":
                    result.errors += 1
                else:
                    result.failed += 1
        finally:
            bar.close()

    def _take(self, f: RemoteFile) -> tuple[str, Landing | None]:
        """Download, land and publish one file (in a worker thread)."""
        if self.stop.is_set():
            return "stopped", None
        try:
            data = self._sftp().read(f.name, f.size)
        except FileNotFoundError:
            log.info("file vanished before it was read", extra={"file": f.name})
            return "changed", None
        except PermissionError as exc:  # bad data (the file's mode), not an outage
            try:
                self._reject_file(f.name, f"unreadable: {exc.strerror or exc}")
            except DB_ERRORS as db_exc:
                self._db_failed("recording an unreadable file failed", db_exc, file=f.name)
                return "error", None
            return "rejected", None
        except SFTP_ERRORS as exc:
            self._sftp_failed("reading a CDR file failed", exc, file=f.name)
            return "error", None
        if len(data) != f.size:
            log.info("file still growing; waiting", extra={"file": f.name, "size": len(data)})
            return "changed", None
        if not data:  # its size held still for settle_seconds: not an upload in progress
            try:
                self._reject_file(f.name, "empty file (0 bytes)")
            except DB_ERRORS as exc:
                self._db_failed("recording an empty file failed", exc, file=f.name)
                return "error", None
            return "rejected", None
        if not data.endswith(b"\n"):
            log.info("last line not complete yet; waiting", extra={"file": f.name})
            return "incomplete", None
        try:
            started = time.perf_counter()
            landing = land_file(self._conn(), f.name, data)
        except DB_ERRORS as exc:
            self._db_failed("landing a CDR file failed", exc, file=f.name)
            return "error", None
        except Exception:
            log.exception("landing a CDR file failed; it is retried", extra={"file": f.name})
            self.metrics.errors.labels("file").inc()
            self._drop("conn")
            return "failed", None
        self._record(landing, time.perf_counter() - started)
        publish = self.s.publish and landing.outcome in ("landed", "replaced")
        if (
            publish
            and landing.rows_landed
            and not self._publish(landing.file_name, landing.kind, landing.sha256)
        ):
            return "unpublished", landing
        return "done", landing

    def _record(self, landing: Landing, seconds: float) -> None:
        m = self.metrics
        m.files.labels(landing.kind, landing.outcome).inc()
        m.rows.labels(landing.kind).inc(landing.rows_landed)
        m.rejects.labels(landing.kind).inc(landing.rows_rejected)
        extra = {
            "file": landing.file_name,
            "outcome": landing.outcome,
            "rows": landing.rows_landed,
            "rejected": landing.rows_rejected,
            "path": landing.path,
            "ms": round(seconds * 1000, 1),
        }
        if landing.outcome == "rejected":
            log.error("rejected a file that is not a CDR file", extra=extra)
        elif landing.outcome == "conflict":
            log.error(
                "file replaced under the same name: new version quarantined in "
                "cdr_data.file_conflicts, the landed version kept",
                extra=extra,
            )
        elif landing.outcome == "replaced":
            log.warning("replaced a file whose content changed", extra=extra)
        elif landing.outcome == "skipped":
            log.info("file seen again with the same checksum: skipped", extra=extra)
        else:
            log.info("landed", extra=extra)

    # -- publishing ----------------------------------------------------------------------------

    def _publish(self, file_name: str, kind: str, sha256: str) -> bool:
        try:
            count = publish_file(self._conn(), self._stream(), file_name, kind, sha256)
        except StreamError as exc:
            log.warning(
                "publishing failed; retried next poll", extra={"file": file_name, "error": str(exc)}
            )
            self.metrics.errors.labels("stream").inc()
            self._drop_stream()
            return False
        except DB_ERRORS as exc:
            self._db_failed("publishing failed; retried next poll", exc, file=file_name)
            return False
        self.metrics.published.labels(kind).inc(count)
        log.debug("published", extra={"file": file_name, "rows": count})
        return True

    def _publish_pending(self, result: PollResult) -> None:
        try:
            pending = unpublished_files(self._conn())
        except DB_ERRORS as exc:
            self._db_failed("reading the unpublished files failed", exc)
            result.errors += 1
            return
        if not pending:
            return
        log.info("publishing files whose publish did not complete", extra={"files": len(pending)})
        futures = [self._pool.submit(self._publish, *row) for row in pending]
        for future in futures:
            if future.result():
                result.published += 1
            else:
                result.errors += 1

    # -- failures ------------------------------------------------------------------------------

    def _sftp_failed(self, msg: str, exc: BaseException, **extra: Any) -> None:
        log.warning(msg, extra={**extra, "error": f"{type(exc).__name__}: {exc}"})
        self.metrics.errors.labels("sftp").inc()
        self._drop("sftp")

    def _db_failed(self, msg: str, exc: BaseException, **extra: Any) -> None:
        log.warning(msg, extra={**extra, "error": f"{type(exc).__name__}: {exc}".strip()})
        self.metrics.errors.labels("postgres").inc()
        self._drop("conn")
        self._known = None

    # -- run modes -----------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        return backoff(attempt + 1, longest=self.s.backoff_max)

    def run_once(self) -> bool:
        """Land every complete file, then return. False if failures persisted (see settings)."""
        failures = 0
        while not self.stop.is_set():
            try:
                result = self.poll_once()
            except Exception:
                log.exception("poll failed")
                result = PollResult(errors=1)
            if result.errors or result.failed:
                failures += 1
                if failures >= self.s.once_attempts:
                    log.error("giving up after %d failed polls", failures)
                    return False
                self.stop.wait(self._backoff(failures))
                continue
            failures = 0
            if not result.waiting:
                if self._incomplete:
                    log.warning(
                        "files left for later: size stable but the last line is not complete",
                        extra={"files": sorted(self._incomplete)},
                    )
                return True
            self.stop.wait(self.s.settle_seconds)
        return True

    def follow(self, on_poll: Callable[[PollResult], None] | None = None) -> None:
        """Poll until `stop` is set; back off while SFTP, Postgres or the stream are away."""
        failures = 0
        while not self.stop.is_set():
            try:
                result = self.poll_once()
            except Exception:
                log.exception("poll failed")
                result = PollResult(errors=1)
            if on_poll is not None:
                on_poll(result)
            if result.errors:
                failures += 1
                wait = self._backoff(failures)
                log.info("retrying after a failure", extra={"seconds": round(wait, 1)})
            else:
                failures = 0
                wait = self.s.poll_interval
            self.stop.wait(wait)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ingestion.cdr_loader",
        description="Land the CDR files of the SFTP directory in cdr_data.* (one transaction per "
        "file, bad rows to cdr_data.rejected_rows) and publish the landed rows to the stream "
        "topics cdr-data and cdr-voice. Settings come from the environment: WTC_ANALYTICS_DSN, "
        "SFTP_URL, STREAM_URL, CDR_DIR and CDR_* (see LoaderSettings).",
    )
    parser.add_argument(
        "--once", action="store_true", help="land every complete file, then exit (else: follow)"
    )
    parser.add_argument("--dir", help="directory on the SFTP server (CDR_DIR, default .)")
    parser.add_argument(
        "--poll-interval", type=float, help="seconds between polls in follow mode (default 5)"
    )
    parser.add_argument("--workers", type=int, help="files landed in parallel (default 2)")
    parser.add_argument(
        "--metrics-port", type=int, help="Prometheus port in follow mode (default 19101, 0: off)"
    )
    parser.add_argument("--no-publish", action="store_true", help="land only, do not publish")
    parser.add_argument(
        "--rescan",
        action="store_true",
        help="read every file once, also those whose size and modification time match what was "
        "landed (a changed file that kept both); unchanged files are skipped by their checksum",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    setup_logging()
    logging.getLogger("paramiko").setLevel(logging.WARNING)  # a line per login otherwise
    overrides: dict[str, Any] = {}
    for name, value in (
        ("cdr_dir", args.dir),
        ("poll_interval", args.poll_interval),
        ("workers", args.workers),
        ("metrics_port", args.metrics_port),
    ):
        if value is not None:
            overrides[name] = value
    if args.no_publish:
        overrides["publish"] = False
    if args.rescan:
        overrides["rescan"] = True
    settings = LoaderSettings(**overrides)
    loader = CdrLoader(settings)
    stop_on_signals(loader.stop, "stopping after the files in hand")
    mode = "once" if args.once else "follow"
    log.info(
        "cdr loader starting",
        extra={"mode": mode, "dir": settings.cdr_dir, "publish": settings.publish},
    )
    try:
        if args.once:
            return 0 if loader.run_once() else 1
        serve_metrics(loader.metrics.registry, settings.metrics_host, settings.metrics_port)
        loader.follow()
        return 0
    finally:
        loader.close()
        log.info("cdr loader stopped")


if __name__ == "__main__":
    sys.exit(main())
