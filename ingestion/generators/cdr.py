"""CDR source stand-in: the two CSV files per window, byte for byte in the starter's format.

Per window `cdr_data_YYYYmmdd_HHMMSS.csv` and `cdr_voice_YYYYmmdd_HHMMSS.csv` (timestamp = window
start), written as Python's `csv.DictWriter` defaults write (comma, minimal quoting, CRLF, header).
See docs/generators.md for the profiles and knobs.
"""

from __future__ import annotations

import csv
import io
import logging
import posixpath
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np

from ingestion.generators.common import (
    Pace,
    Pacer,
    Profile,
    format_numbers,
    format_timestamps,
    numpy_rng,
    random_numbers,
    subscriber_pool,
    to_epoch_us,
)

log = logging.getLogger(__name__)

DATA_HEADER = (
    "msisdn",
    "tower_id",
    "up_bytes",
    "down_bytes",
    "data_type",
    "ip_address",
    "website_url",
    "event_datetime",
)
VOICE_HEADER = ("msisdn", "tower_id", "call_type", "dest_nr", "call_duration_sec", "start_time")
DATA_TYPES = ("video", "audio", "image", "text", "application")
CALL_TYPES = ("voice", "video")
MIN_BYTES, MAX_BYTES = 100_000, 1_000_000
MIN_DURATION, MAX_DURATION = 1, 1800
STARTER_CDR_START = datetime(2024, 1, 1, 0, 3, 20)

DATA_MALFORMED_KINDS = (
    "column_count",
    "non_numeric_bytes",
    "bad_timestamp",
    "unknown_data_type",
    "negative_bytes",
)
VOICE_MALFORMED_KINDS = ("column_count", "bad_timestamp", "unknown_call_type", "absurd_duration")

WEBSITES = (
    "https://www.google.com/",
    "https://www.youtube.com/",
    "https://www.facebook.com/",
    "https://www.wikipedia.org/",
    "https://www.instagram.com/",
    "https://www.netflix.com/",
    "https://www.news24.com/",
    "https://www.takealot.com/",
    "https://www.whatsapp.com/",
    "https://open.spotify.com/",
    "http://www.example.com/",
    "https://www.tiktok.com/",
    "https://www.x.com/",
    "https://www.bbc.co.uk/",
    "https://www.iol.co.za/",
    "https://www.linkedin.com/",
)

# Realistic profile: relative activity per hour of day (UTC), night quiet, evening peak.
HOURLY_ACTIVITY = np.array(
    [0.15, 0.10, 0.08, 0.08, 0.10, 0.20, 0.45, 0.80, 1.05, 1.10, 1.10, 1.15,
     1.20, 1.15, 1.10, 1.10, 1.20, 1.40, 1.70, 1.90, 1.90, 1.60, 1.00, 0.50],
)  # fmt: skip
HOURLY_ACTIVITY = HOURLY_ACTIVITY / HOURLY_ACTIVITY.mean()
REALISTIC_DATA_TYPE_WEIGHTS = np.array([0.30, 0.15, 0.20, 0.20, 0.15])
REALISTIC_VOICE_SHARE = 0.85


@dataclass(frozen=True)
class CdrConfig:
    """Knobs of the CDR generator; the defaults are the starter run (864 pairs, 1.728 M rows).

    `late_rate` defaults by profile (0 for `starter`, 0.015 for `realistic`).
    """

    profile: Profile = Profile.STARTER
    seed: int = 0
    subscribers: int = 50_000
    start: datetime = STARTER_CDR_START
    duration: timedelta = timedelta(days=2)
    rows_per_file: int = 1000
    window_seconds: int = 200
    towers: int = 2000
    pace: Pace = Pace.FAST
    speed: float = 1.0
    malformed_rate: float = 0.0
    late_rate: float | None = None
    max_late_seconds: int = 1800
    whole_second_share: float = 0.01
    home_towers: int = 4
    move_probability: float = 0.2
    outside_dest_share: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "profile", Profile(self.profile))
        object.__setattr__(self, "pace", Pace(self.pace))
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        if self.rows_per_file < 1 or self.window_seconds < 1 or self.towers < 1:
            raise ValueError("rows_per_file, window_seconds and towers must be >= 1")
        if self.windows < 1:
            raise ValueError("the duration must cover at least one window")
        for name in ("malformed_rate", "whole_second_share", "move_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within 0..1")
        if self.late_rate is not None and not 0.0 <= self.late_rate <= 1.0:
            raise ValueError("late_rate must be within 0..1")

    @property
    def windows(self) -> int:
        """Number of complete windows (file pairs) in the duration."""
        return int(self.duration.total_seconds() // self.window_seconds)

    @property
    def effective_late_rate(self) -> float:
        if self.late_rate is not None:
            return self.late_rate
        return 0.015 if self.profile is Profile.REALISTIC else 0.0

    def window_start(self, index: int) -> datetime:
        return self.start + timedelta(seconds=index * self.window_seconds)


def file_names(window_start: datetime) -> tuple[str, str]:
    """The data and voice file names of the window starting at `window_start`."""
    stamp = window_start.strftime("%Y%m%d_%H%M%S")
    return f"cdr_data_{stamp}.csv", f"cdr_voice_{stamp}.csv"


def _csv_bytes(header: tuple[str, ...], rows: list[list[str]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # the excel dialect: what csv.DictWriter uses by default
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("ascii")


class _CdrState:
    """Everything drawn once per run, plus the realistic profile's per-subscriber tower."""

    def __init__(self, config: CdrConfig) -> None:
        self.config = config
        self.realistic = config.profile is Profile.REALISTIC
        self.pool = np.array(subscriber_pool(config.seed, config.subscribers))
        self.rng = numpy_rng(config.seed, f"cdr-{config.profile}")
        self.faults = numpy_rng(config.seed, "cdr-malformed")
        self.series_start_us = to_epoch_us(config.start)
        n = config.subscribers
        if self.realistic:
            activity = self.rng.gamma(1.0, 1.0, n)
            self.activity_cdf = np.cumsum(activity) / activity.sum()
            home = self.rng.integers(0, config.towers, n)
            offsets = np.arange(config.home_towers) - config.home_towers // 2
            self.home_area = (home[:, None] + offsets[None, :]) % config.towers + 1
            self.current_tower = home + 1

    def _subscribers(self, n: int) -> np.ndarray:
        if self.realistic:
            idx = np.searchsorted(self.activity_cdf, self.rng.random(n), side="right")
            return np.minimum(idx, self.config.subscribers - 1)
        return self.rng.integers(0, self.config.subscribers, n)

    def _area_tower(self, subs: np.ndarray) -> np.ndarray:
        pick = self.rng.integers(0, self.config.home_towers, subs.size)
        return self.home_area[subs, pick]

    def _towers(self, subs: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Realistic: per subscriber, in time order, stay on the current tower or move nearby."""
        order = np.lexsort((times, subs))
        s = subs[order]
        n = s.size
        move = self.rng.random(n) < self.config.move_probability
        new_tower = self._area_tower(s)
        positions = np.arange(n)
        group_start = np.ones(n, dtype=bool)
        group_start[1:] = s[1:] != s[:-1]
        first_of_group = np.maximum.accumulate(np.where(group_start, positions, 0))
        last_move = np.maximum.accumulate(np.where(move, positions, -1))
        has_move = last_move >= first_of_group
        towers_sorted = np.where(has_move, new_tower[np.maximum(last_move, 0)], 0)
        towers_sorted = np.where(has_move, towers_sorted, self.current_tower[s])
        group_end = np.ones(n, dtype=bool)
        group_end[:-1] = s[1:] != s[:-1]
        self.current_tower[s[group_end]] = towers_sorted[group_end]
        towers = np.empty(n, dtype=np.int64)
        towers[order] = towers_sorted
        return towers

    def window(self, index: int) -> tuple[list[list[str]], list[list[str]]]:
        c = self.config
        rng = self.rng
        start = c.window_start(index)
        start_us = to_epoch_us(start)
        rows = c.rows_per_file
        if self.realistic:
            mid_hour = (start + timedelta(seconds=c.window_seconds / 2)).hour
            rows = max(1, round(c.rows_per_file * HOURLY_ACTIVITY[mid_hour]))
        n = 2 * rows
        subs = self._subscribers(n)
        window_us = c.window_seconds * 1_000_000
        times = start_us + rng.integers(0, window_us, n)
        whole = rng.random(n) < c.whole_second_share
        times = np.where(whole, times - (times % 1_000_000), times)

        if self.realistic:
            towers = np.empty(n, dtype=np.int64)
            late = np.zeros(n, dtype=bool)
            room_us = min(c.max_late_seconds * 1_000_000, start_us - self.series_start_us)
            if room_us > 0 and c.effective_late_rate > 0:
                late = rng.random(n) < c.effective_late_rate
                times[late] = start_us - rng.integers(1, room_us + 1, int(late.sum()))
                towers[late] = self._area_tower(subs[late])
            on_time = ~late
            towers[on_time] = self._towers(subs[on_time], times[on_time])
        else:
            towers = rng.integers(1, c.towers + 1, n)

        msisdn = self.pool[subs]
        stamps = format_timestamps(times)
        tower_text = towers.astype(str)

        d = slice(0, rows)
        up = rng.integers(MIN_BYTES, MAX_BYTES + 1, rows).astype(str)
        down = rng.integers(MIN_BYTES, MAX_BYTES + 1, rows).astype(str)
        if self.realistic:
            dtype_idx = rng.choice(len(DATA_TYPES), rows, p=REALISTIC_DATA_TYPE_WEIGHTS)
        else:
            dtype_idx = rng.integers(0, len(DATA_TYPES), rows)
        data_types = np.array(DATA_TYPES)[dtype_idx]
        octets = rng.integers(1, 255, (rows, 4)).astype(str)
        ips = [".".join(o) for o in octets.tolist()]
        urls = np.array(WEBSITES)[rng.integers(0, len(WEBSITES), rows)]
        data_rows = [
            list(r)
            for r in zip(
                msisdn[d].tolist(),
                tower_text[d].tolist(),
                up.tolist(),
                down.tolist(),
                data_types.tolist(),
                ips,
                urls.tolist(),
                stamps[:rows],
                strict=True,
            )
        ]

        v = slice(rows, n)
        if self.realistic:
            call_types = np.where(rng.random(rows) < REALISTIC_VOICE_SHARE, "voice", "video")
            durations = np.clip(
                np.ceil(rng.exponential(150.0, rows)), MIN_DURATION, MAX_DURATION
            ).astype(np.int64)
        else:
            call_types = np.array(CALL_TYPES)[rng.integers(0, len(CALL_TYPES), rows)]
            durations = rng.integers(MIN_DURATION, MAX_DURATION + 1, rows)
        outside = rng.random(rows) < c.outside_dest_share
        dest_inside = self.pool[rng.integers(0, c.subscribers, rows)]
        dest_outside = np.array(format_numbers(random_numbers(rng, rows)))
        dest = np.where(outside, dest_outside, dest_inside)
        voice_rows = [
            list(r)
            for r in zip(
                msisdn[v].tolist(),
                tower_text[v].tolist(),
                call_types.tolist(),
                dest.tolist(),
                durations.astype(str).tolist(),
                stamps[rows:],
                strict=True,
            )
        ]
        if c.malformed_rate > 0:
            self._inject(data_rows, DATA_MALFORMED_KINDS)
            self._inject(voice_rows, VOICE_MALFORMED_KINDS)
        return data_rows, voice_rows

    def _inject(self, rows: list[list[str]], kinds: tuple[str, ...]) -> None:
        hit = np.flatnonzero(self.faults.random(len(rows)) < self.config.malformed_rate)
        picks = self.faults.integers(0, len(kinds), hit.size)
        for row_index, kind_index in zip(hit.tolist(), picks.tolist(), strict=True):
            rows[row_index] = malform(rows[row_index], kinds[kind_index])


def malform(row: list[str], kind: str) -> list[str]:
    """A copy of a data or voice row broken in the way `kind` names (see *_MALFORMED_KINDS)."""
    bad = list(row)
    data = len(row) == len(DATA_HEADER)
    if kind == "column_count":
        return bad[:-1] if data else [*bad, "extra"]
    if kind == "bad_timestamp":
        bad[-1] = "2024-13-45 25:61:00"
    elif kind == "non_numeric_bytes" and data:
        bad[2] = "12x45"
    elif kind == "negative_bytes" and data:
        bad[3] = "-" + bad[3]
    elif kind == "unknown_data_type" and data:
        bad[4] = "hologram"
    elif kind == "unknown_call_type" and not data:
        bad[2] = "telepathy"
    elif kind == "absurd_duration" and not data:
        bad[4] = "9999999"
    else:
        raise ValueError(f"unknown malformed kind {kind!r} for this row")
    return bad


def cdr_files(config: CdrConfig) -> Iterator[tuple[str, bytes]]:
    """Yield `(file name, content)` in window order: the data file, then the voice file.

    In `realtime` pace a window's files are yielded once the simulated clock passes its end.
    """
    state = _CdrState(config)
    pacer = Pacer(config.pace, config.start, config.speed)
    for index in range(config.windows):
        start = config.window_start(index)
        data_rows, voice_rows = state.window(index)
        pacer.wait_until(start + timedelta(seconds=config.window_seconds))
        data_name, voice_name = file_names(start)
        yield data_name, _csv_bytes(DATA_HEADER, data_rows)
        yield voice_name, _csv_bytes(VOICE_HEADER, voice_rows)


def write_cdr_files(
    config: CdrConfig, directory: Path, progress: Callable[[int], None] | None = None
) -> list[Path]:
    """Write the files into `directory` in place under their final names; return the paths.

    `progress(1)` is called after every file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in cdr_files(config):
        path = directory / name
        with path.open("wb") as handle:
            handle.write(content)
        written.append(path)
        if progress:
            progress(1)
    log.info("cdr files written", extra={"files": len(written), "directory": str(directory)})
    return written


def upload_cdr_files(
    config: CdrConfig,
    sftp_url: str,
    remote_dir: str = ".",
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Upload the files over SFTP in place under their final names (no temp name).

    `sftp_url` is `sftp://user:password@host:port/`; `remote_dir` is relative to the user's start
    directory unless absolute. Returns the remote paths; `progress(1)` is called after every file.
    """
    import paramiko

    parts = urlsplit(sftp_url)
    if parts.scheme != "sftp" or not parts.hostname:
        raise ValueError(f"not an sftp:// URL: {sftp_url!r}")
    sock = socket.create_connection((parts.hostname, parts.port or 22), timeout=30)
    # Without TCP_NODELAY each file's open/close round trip waits on delayed ACKs (~20x slower).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = paramiko.Transport(sock)
    uploaded: list[str] = []
    try:
        transport.connect(
            username=unquote(parts.username or ""), password=unquote(parts.password or "")
        )
        sftp = paramiko.SFTPClient.from_transport(transport)
        if sftp is None:  # paramiko returns None only on a closed channel
            raise ConnectionError("the SFTP subsystem could not be opened")
        try:
            sftp.stat(remote_dir)
        except FileNotFoundError:
            sftp.mkdir(remote_dir)
        for name, content in cdr_files(config):
            remote = posixpath.join(remote_dir, name)
            with sftp.open(remote, "wb") as handle:
                handle.set_pipelined(True)
                handle.write(content)
            uploaded.append(remote)
            if progress:
                progress(1)
        sftp.close()
    finally:
        transport.close()
    log.info("cdr files uploaded", extra={"files": len(uploaded), "remote_dir": remote_dir})
    return uploaded
