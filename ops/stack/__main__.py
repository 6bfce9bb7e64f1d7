"""`python -m ops.stack setup|start|status|stop|bootstrap`: the local stack from the shell."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys

from common.logs import setup_logging
from ops.stack import jvm
from ops.stack.local import Stack
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
    args = parser.parse_args(argv)
    setup_logging()
    stack = Stack()
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
                stack.start()
            case "stop":
                stack.stop()
            case "bootstrap":
                stack.bootstrap()
            case "status":
                rows = stack.status()
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
