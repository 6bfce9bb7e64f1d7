"""`python -m ops.stack setup|start|status|stop|bootstrap`: the local stack from the shell."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys

from common.logs import setup_logging
from ops.stack import jvm
from ops.stack.kafka import KafkaStack
from ops.stack.local import Component, Stack
from ops.stack.process import StackError

log = logging.getLogger("ops.stack")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ops.stack",
        description="Start, report and stop the embedded local stack "
        "(Postgres, Redis, OpenSSH SFTP) under the state folder.",
    )
    parser.add_argument(
        "command",
        choices=["setup", "jvm", "start", "status", "stop", "bootstrap"],
        help="setup: install missing packages and users, fetch the Kafka path's pinned jars "
        "when a JDK is there; jvm: fetch those jars; start: setup, start and bootstrap; "
        "status: report; stop: stop the project's processes and the servers; "
        "bootstrap: create the databases and raw tables",
    )
    parser.add_argument(
        "--stream",
        choices=["redis", "kafka"],
        default="redis",
        help="start: also run the Kafka path (3 KRaft brokers and a Connect worker; needs `make "
        "setup` with a JDK); stop and status always include it when it runs",
    )
    args = parser.parse_args(argv)
    setup_logging()
    stack = Stack()
    kafka = KafkaStack(stack.s)
    try:
        match args.command:
            case "setup":
                stack.setup()
                if jvm.java_available():
                    jvm.fetch()
                else:
                    log.warning("no java: the Kafka path's JVM parts are not fetched")
            case "jvm":
                jvm.fetch()
            case "start":
                if args.stream == "kafka":
                    stack.monitoring.expect_kafka_path(kafka)
                stack.start()
                if args.stream == "kafka":
                    kafka.start()
                    if stack.s.monitoring:
                        stack.monitoring.scrape_kafka()
            case "stop":
                stack.stop_processes()  # the consumers and loaders before their brokers
                kafka.stop()
                stack.stop()
            case "bootstrap":
                stack.bootstrap()
            case "status":
                rows = stack.status()
                if kafka.any_running():
                    rows += [
                        Component(*row[:2], row[2] is not None, row[2], row[3])
                        for row in kafka.status()
                    ]
                for c in rows:
                    state = "up" if c.running else "down"
                    port = f":{c.port}" if c.port else ""
                    print(f"{c.name:<14} {state:<5} pid={c.pid or '-':<8} {port:<7} {c.detail}")
                return 0 if all(c.running for c in rows[:3]) else 3
    except (StackError, subprocess.CalledProcessError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
