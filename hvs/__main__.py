"""`python -m hvs`: the HVS consumer from the command line (one process, or a group of N), and
`python -m hvs rebuild`: days of the HVS rebuilt from the raw tables."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import date
from typing import Any

from prometheus_client import REGISTRY

from common.logs import setup_logging
from common.service import serve_metrics, stop_on_signals
from common.settings import redacted
from hvs.rebuild import rebuild
from hvs.runner import run, tune_gc
from hvs.settings import HvsSettings

log = logging.getLogger("hvs")

_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _block_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)


def _supervise(settings: HvsSettings, processes: int, drain: bool) -> int:
    """Start `processes` consumers of the group, pass SIGTERM/SIGINT on, wait for all."""
    base = settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
    children = []
    for i, port in enumerate(settings.process_metrics_ports(processes)):
        env = dict(os.environ, HVS_CONSUMER_NAME=f"{base}-{i}")
        env["HVS_METRICS_PORT"] = str(port)
        if settings.batch_size:
            env["HVS_BATCH_SIZE"] = str(settings.batch_size)
        cmd = [sys.executable, "-m", "hvs", *(["--drain"] if drain else [])]
        # a stop signal that arrives while a child is still importing waits (blocked) until
        # the child's handler is in place: it then stops cleanly instead of dying silently
        children.append(subprocess.Popen(cmd, env=env, preexec_fn=_block_stop_signals))

    def _forward(signum: int, _frame: object) -> None:
        log.info("stopping the consumers", extra={"signal": signum})
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    log.info("hvs consumers started", extra={"processes": processes, "names": f"{base}-N"})
    codes = [child.wait() for child in children]
    return max(128 - code if code < 0 else code for code in codes)  # killed by a signal: 128+N


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a day (YYYY-MM-DD): {text!r}") from None


def rebuild_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hvs rebuild",
        description="Rebuild the HVS for a range of days from the raw tables in Postgres "
        "(cdr_data, forex_data), while the consumer runs: each day's usage is replaced by the "
        "raw rows priced as the consumer prices them, and their events are marked applied so "
        "that the consumer does not count them again. Idempotent. Runbook: "
        "docs/failure-handling.md (WTC_ANALYTICS_DSN, REDIS_URL, HVS_* settings).",
    )
    parser.add_argument("--from", dest="first", type=_day, required=True, help="first day")
    parser.add_argument("--to", dest="last", type=_day, required=True, help="last day, included")
    args = parser.parse_args(argv)
    if args.last < args.first:
        parser.error("--to is before --from")
    setup_logging()
    t0 = time.monotonic()
    reports = rebuild(HvsSettings(), args.first, args.last)
    for report in reports:
        print(json.dumps(report.as_dict()))
    log.info(
        "hvs rebuilt",
        extra={
            "days": len(reports),
            "events": sum(r.events for r in reports),
            "seconds": round(time.monotonic() - t0, 3),
        },
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rebuild"]:
        return rebuild_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m hvs",
        description="HVS consumer: CDR events and ticks from the stream into daily usage in Redis "
        "(REDIS_URL, STREAM_URL, HVS_* settings). `python -m hvs rebuild --help`: rebuild days "
        "of the HVS from the raw tables.",
    )
    parser.add_argument("--drain", action="store_true", help="exit once the stream is empty")
    parser.add_argument("--batch-size", type=int, help="messages per batch (HVS_BATCH_SIZE)")
    parser.add_argument(
        "--metrics-port", type=int, help="Prometheus port, 0 = none (HVS_METRICS_PORT)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run N consumer processes in the group (names <name>-<i>; metrics: process 0 on "
        "HVS_METRICS_PORT, process i on HVS_GROUP_METRICS_PORT + i - 1)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    overrides: dict[str, Any] = {}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.metrics_port is not None:
        overrides["metrics_port"] = args.metrics_port
    settings = HvsSettings(**overrides)
    if args.processes > 1:
        return _supervise(settings, args.processes, args.drain)
    tune_gc()
    serve_metrics(REGISTRY, settings.metrics_host, settings.metrics_port)
    stop = stop_on_signals()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked by `_supervise`
    log.info(
        "hvs consumer starting",
        extra={
            "stream": redacted(settings.stream_url),
            "group": settings.group,
            "drain": args.drain,
        },
    )
    t0 = time.monotonic()
    total = run(settings, stop, drain=args.drain)
    log.info(
        "hvs consumer stopped",
        extra={"events_applied": total, "seconds": round(time.monotonic() - t0, 3)},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
