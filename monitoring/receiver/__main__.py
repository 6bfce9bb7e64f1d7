"""`python -m monitoring.receiver`: the Alertmanager webhook receiver (README.md)."""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from common.logs import setup_logging
from common.service import cli_overrides, stop_on_signals
from monitoring.receiver.server import ReceiverSettings, make_server

log = logging.getLogger("monitoring.receiver")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.receiver",
        description="Receive Alertmanager's webhooks on POST /alerts and append each alert as "
        "one JSON line to the alerts file; /metrics and /health besides.",
    )
    parser.add_argument("--port", type=int, help="port (WTC_RECEIVER_PORT, default 19095)")
    parser.add_argument("--alerts-file", help="file to append to (WTC_RECEIVER_ALERTS_FILE)")
    args = parser.parse_args(argv)
    setup_logging()
    settings = ReceiverSettings(**cli_overrides(port=args.port, alerts_file=args.alerts_file))
    server = make_server(settings)
    stop = stop_on_signals(message="stopping the receiver")
    thread = threading.Thread(target=server.serve_forever, name="receiver", daemon=True)
    thread.start()
    log.info(
        "receiver listening",
        extra={"host": settings.host, "port": settings.port, "file": str(settings.alerts_file)},
    )
    stop.wait()
    server.shutdown()
    server.server_close()
    log.info("receiver stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
