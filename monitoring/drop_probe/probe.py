"""What the probe measures, on every scrape: the CDR files in the SFTP drop folder that have not
landed (a CDR file name absent from `cdr_data.files`, or listed there with another size), the age
of the oldest of them, and when the last file landed.

The loader reports its own backlog too, but a loader that is dead or hung reports nothing; the
stalled-loader alert needs a witness that does not depend on it. The probe reads the folder with
the loader's own SFTP reader and names files by the loader's own rule (`kind_of`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.settings import ServiceSettings
from ingestion.cdr_format import kind_of
from ingestion.cdr_sftp import SFTP_ERRORS, CdrSftp, RemoteFile

log = logging.getLogger("monitoring.drop_probe")


class ProbeSettings(ServiceSettings):
    """Connections (`SFTP_URL`, `CDR_DIR`, `WTC_ANALYTICS_DSN`) from `common.settings`; the rest
    `DROP_PROBE_*`."""

    model_config = SettingsConfigDict(
        env_prefix="DROP_PROBE_", extra="ignore", populate_by_name=True
    )

    metrics_port: int = Field(default=19105, description="Prometheus metrics port")


@dataclass(frozen=True)
class Backlog:
    waiting: int
    oldest_waiting_age: float
    last_landed: float


def backlog(listing: list[RemoteFile], landed: dict[str, int], last: float, now: float) -> Backlog:
    """The files of `listing` with a CDR name that have not landed at their size in `landed`
    (name: size); `last` is when the newest landing happened (0 for never)."""
    waiting = [f for f in listing if kind_of(f.name) is not None and landed.get(f.name) != f.size]
    oldest = min((f.mtime for f in waiting), default=None)
    return Backlog(len(waiting), 0.0 if oldest is None else max(0.0, now - oldest), last)


class DropProbe(Collector):
    """A collector that probes the folder and the warehouse each time it is collected."""

    def __init__(self, settings: ProbeSettings) -> None:
        self.s = settings

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # registering must not probe; scrapes do

    def measure(self) -> Backlog:
        with CdrSftp(self.s.sftp_url, self.s.cdr_dir) as sftp:
            listing = sftp.listing()
        names = [f.name for f in listing]
        with psycopg.connect(
            self.s.analytics_dsn, application_name="drop_probe", connect_timeout=5
        ) as conn:
            landed: dict[str, int] = dict(
                conn.execute(
                    "select file_name, size_bytes from cdr_data.files where file_name = any(%s)",
                    (names,),
                ).fetchall()
            )
            row = conn.execute(
                "select coalesce(extract(epoch from max(loaded_at))::float8, 0) from cdr_data.files"
            ).fetchone()
        return backlog(listing, landed, row[0] if row else 0.0, time.time())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        started = time.perf_counter()
        try:
            result: Backlog | None = self.measure()
        except (*SFTP_ERRORS, psycopg.Error) as exc:  # type: ignore[misc]  # a tuple of types
            log.warning("probe failed", extra={"error": str(exc).strip()})
            result = None
        yield GaugeMetricFamily(
            "wtc_cdr_drop_probe_success",
            "1 when the SFTP folder and cdr_data.files could both be read",
            value=0 if result is None else 1,
        )
        yield GaugeMetricFamily(
            "wtc_cdr_drop_probe_duration_seconds",
            "Time the probe took",
            value=time.perf_counter() - started,
        )
        if result is None:
            return
        yield GaugeMetricFamily(
            "wtc_cdr_drop_waiting_files",
            "CDR files in the drop folder that have not landed (at their size)",
            value=result.waiting,
        )
        yield GaugeMetricFamily(
            "wtc_cdr_drop_oldest_waiting_age_seconds",
            "Age (since modification) of the oldest CDR file not landed; 0 when none waits",
            value=result.oldest_waiting_age,
        )
        yield GaugeMetricFamily(
            "wtc_cdr_last_landed_timestamp_seconds",
            "When the newest file in cdr_data.files landed; 0 when none has",
            value=result.last_landed,
        )
