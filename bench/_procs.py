"""The pipeline benchmark's process plumbing: project commands run as their own processes, each
reaped with `wait4` for its wall time, CPU time and peak RSS; and a sampler of the servers' memory
(Postgres as the sum of its processes' PSS, Redis as it reports itself)."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis


@dataclass
class Stage:
    """One stage of the run: when it started and ended (seconds from the run's start), the
    rows it moved, and its process's resources (None for a stage that is not one process)."""

    name: str
    started: float
    ended: float | None = None
    rows: int | None = None
    unit: str = "rows"
    peak_rss_mb: float | None = None
    cpu_s: float | None = None
    exit_code: int | None = None
    phase: str = "e2e"

    @property
    def seconds(self) -> float:
        return (self.ended or self.started) - self.started

    @property
    def rate(self) -> float | None:
        return self.rows / self.seconds if self.rows and self.seconds > 0 else None


class Clock:
    """Seconds since the run's start, one origin for every stage of the timeline."""

    def __init__(self) -> None:
        self.origin = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.origin


@dataclass
class Command:
    """A project command running as a child process; `wait()` reaps it with its rusage."""

    stage: Stage
    proc: subprocess.Popen[bytes]
    clock: Clock
    done: threading.Event = field(default_factory=threading.Event)

    def _reap(self) -> None:
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.stage.ended = self.clock.now()
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.stage.exit_code = self.proc.returncode
        self.stage.peak_rss_mb = usage.ru_maxrss / 1024  # kB on Linux
        self.stage.cpu_s = usage.ru_utime + usage.ru_stime
        self.done.set()

    def wait(self, timeout: float | None = None) -> Stage:
        if not self.done.wait(timeout):
            raise TimeoutError(f"{self.stage.name} still running after {timeout} s")
        return self.stage

    def stop(self, timeout: float = 30.0) -> Stage:
        """SIGTERM (a follow-mode service), then wait."""
        if not self.done.is_set():
            self.proc.terminate()
        try:
            return self.wait(timeout)
        except TimeoutError:
            self.proc.kill()
            return self.wait(10)


def log_path(log_dir: Path, name: str) -> Path:
    """Where stage `name` writes its output."""
    return log_dir / (re.sub(r"[^\w.-]+", "_", name).strip("_") + ".log")


def start(
    clock: Clock, name: str, argv: list[str], env: dict[str, str], log_dir: Path, cwd: Path
) -> Command:
    """Start `argv` as stage `name`; its output goes to `log_dir/<name>.log` (plain logs)."""
    stage = Stage(name, clock.now())
    with log_path(log_dir, name).open("ab") as out:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    command = Command(stage, proc, clock)
    threading.Thread(target=command._reap, name=f"reap-{name}", daemon=True).start()
    return command


def run(
    clock: Clock, name: str, argv: list[str], env: dict[str, str], log_dir: Path, cwd: Path
) -> Stage:
    """Run `argv` to its end as stage `name`; raise when it fails."""
    stage = start(clock, name, argv, env, log_dir, cwd).wait()
    if stage.exit_code:
        tail = log_path(log_dir, name).read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{name} failed (exit {stage.exit_code}); its log ends:\n{tail}")
    return stage


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(parent: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            out.append(int(entry.name))
    return out


class MemorySampler:
    """Every `interval` seconds: Postgres' PSS (postmaster and every backend; shared buffers
    counted once), Redis' `used_memory` and RSS. Keeps the peaks and a series for the report."""

    def __init__(self, postmaster_pid: int, redis_url: str, clock: Clock, interval: float = 0.5):
        self.postmaster = postmaster_pid
        self.redis = redis.Redis.from_url(redis_url)
        self.clock = clock
        self.interval = interval
        self.peak = {"postgres_pss_mb": 0.0, "redis_used_mb": 0.0, "redis_rss_mb": 0.0}
        self.series: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory", daemon=True)

    def sample(self) -> None:
        pids = [self.postmaster, *_children(self.postmaster)]
        pg = sum(_pss_kb(p) for p in pids) / 1024
        try:
            info = self.redis.info("memory")
            used, rss = info["used_memory"] / 2**20, info["used_memory_rss"] / 2**20
        except redis.RedisError:
            used = rss = 0.0
        self.peak["postgres_pss_mb"] = max(self.peak["postgres_pss_mb"], pg)
        self.peak["redis_used_mb"] = max(self.peak["redis_used_mb"], used)
        self.peak["redis_rss_mb"] = max(self.peak["redis_rss_mb"], rss)
        self.series.append((self.clock.now(), pg, used))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
