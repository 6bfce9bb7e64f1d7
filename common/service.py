"""What every long-running process shares: deliberate crash points for tests, a stop event set
by SIGTERM/SIGINT, the Prometheus metrics server, command-line overrides of settings, and the
waits before retrying after a lost connection (fixed, or exponential with jitter)."""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger("common.service")

CRASH_EXIT_CODE = 75
"""Exit code of a deliberate crash at `WTC_CRASH_POINT` (tests kill the process there)."""


def crash_point(name: str) -> None:
    """Exit at once, without cleanup, when `WTC_CRASH_POINT` names this point (for tests)."""
    if os.environ.get("WTC_CRASH_POINT") == name:
        log.warning("crashing on purpose", extra={"crash_point": name})
        logging.shutdown()
        os._exit(CRASH_EXIT_CODE)


def stop_on_signals(
    stop: threading.Event | None = None, message: str = "stopping after the current batch"
) -> threading.Event:
    """Set `stop` (a new event unless given) on SIGTERM or SIGINT; returns it."""
    event = stop if stop is not None else threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info(message, extra={"signal": signum})
        event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return event


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> None:
    """Serve `registry` on http://host:port/metrics; port 0 serves nothing."""
    if port:
        start_http_server(port, addr=host, registry=registry)
        log.info("metrics served", extra={"host": host, "port": port})


def metrics_port(configured: int, once: bool, asked: int | None) -> int:
    """The port to serve on: a one-shot run is short, so it serves only when a port was asked
    for on the command line."""
    return configured if not once or asked else 0


def cli_overrides(**values: Any) -> dict[str, Any]:
    """The command-line values that were given (not None), as settings overrides."""
    return {name: value for name, value in values.items() if value is not None}


def wait_to_retry(stop: threading.Event, seconds: float, what: str, exc: BaseException) -> bool:
    """Log that `what` failed with `exc` and wait `seconds`; True when `stop` was set meanwhile."""
    log.warning(what, extra={"error": str(exc).strip(), "in_seconds": seconds})
    return stop.wait(seconds)


def backoff(attempt: int, first: float = 0.5, longest: float = 30.0) -> float:
    """Seconds to wait before retry number `attempt` (1, 2, ...): doubling from `first`, at most
    `longest`, with +-20 % jitter so that processes that failed together do not retry together."""
    return min(longest, first * 2.0 ** min(max(attempt - 1, 0), 16)) * random.uniform(0.8, 1.2)  # noqa: S311 (jitter, not a secret)
