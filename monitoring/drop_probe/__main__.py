"""`python -m monitoring.drop_probe`: serve the CDR drop-folder probe's metrics (probe.py)."""

from __future__ import annotations

import argparse
import logging
import sys

from prometheus_client import CollectorRegistry

from common.logs import setup_logging
from common.service import cli_overrides, serve_metrics, stop_on_signals
from monitoring.drop_probe.probe import DropProbe, ProbeSettings

log = logging.getLogger("monitoring.drop_probe")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.drop_probe",
        description="Serve metrics of the CDR drop folder as seen from outside the loader: "
        "files waiting to land, the oldest one's age, the last landing (each scrape probes).",
    )
    parser.add_argument("--metrics-port", type=int, help="port (DROP_PROBE_METRICS_PORT)")
    args = parser.parse_args(argv)
    setup_logging()
    settings = ProbeSettings(**cli_overrides(metrics_port=args.metrics_port))
    registry = CollectorRegistry()
    registry.register(DropProbe(settings))
    stop = stop_on_signals(message="stopping the drop probe")
    serve_metrics(registry, settings.metrics_host, settings.metrics_port)
    stop.wait()
    log.info("drop probe stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
