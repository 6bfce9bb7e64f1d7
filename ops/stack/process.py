"""Process plumbing of the local stack: ports, pidfiles, waiting with a deadline, stopping."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ops.stack")


@dataclass
class Component:
    """One process of the stack as `status` reports it."""

    name: str
    port: int
    running: bool
    pid: int | None
    detail: str = ""


class StackError(RuntimeError):
    """The stack cannot be set up or started; the message says what to do."""


def is_root() -> bool:
    return os.geteuid() == 0


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    with socket.socket() as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until(
    check: Callable[[], object], what: str, timeout: float = 30.0, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def read_pid(pidfile: Path) -> int | None:
    """The pid in `pidfile` if that process is alive."""
    try:
        pid = int(pidfile.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    return pid if alive(pid) else None


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie waiting for its parent to reap it has exited."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def terminate(pidfiles: dict[Path, str], timeout: float = 30.0) -> None:
    """SIGTERM the processes in `pidfiles` (pidfile: what) at once, then wait for each to exit."""
    running: dict[Path, tuple[int, str]] = {}
    for pidfile, what in pidfiles.items():
        pid = read_pid(pidfile)
        if pid is None:
            pidfile.unlink(missing_ok=True)
            continue
        log.info("stopping %s", what, extra={"pid": pid})
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        running[pidfile] = (pid, what)
    deadline = time.monotonic() + timeout
    for pidfile, (child, what) in running.items():

        def stopped(p: int = child) -> bool:
            return not alive(p)

        try:
            wait_until(stopped, what, max(deadline - time.monotonic(), 0.1))
        except StackError:
            log.warning("%s did not stop in %.0fs; killing it", what, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        pidfile.unlink(missing_ok=True)
