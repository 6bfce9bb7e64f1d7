"""`python -m hvs --processes N` against the real stack: process 0 serves its metrics on
`HVS_METRICS_PORT`, the others on a range of their own (`HVS_GROUP_METRICS_PORT`). They used
to take `HVS_METRICS_PORT + i`, which is the drop probe's port (19105) for process 1 and the
API's metrics port (19106) for process 2 with the defaults."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

from common.settings import PROJECT_ROOT
from ops.stack import free_port


def free_range(count: int) -> int:
    """A first port with `count` free ports from it."""
    while True:
        base = free_port()
        probes = []
        try:
            for port in range(base, base + count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()


def serves_metrics(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            return b"hvs_events_total" in answer.read()
    except (OSError, urllib.error.URLError):
        return False


def test_a_consumer_group_serves_metrics_clear_of_the_next_port(stack):
    first = free_range(2)
    # what another service holds right after HVS_METRICS_PORT (the drop probe, with defaults)
    neighbour = socket.socket()
    neighbour.bind(("127.0.0.1", first + 1))
    neighbour.listen()
    group_base = free_range(2)
    env = dict(
        os.environ,
        REDIS_URL=stack.redis_url,
        STREAM_URL=stack.stream_url,
        HVS_GROUP=f"ports-{uuid.uuid4().hex[:8]}",
        HVS_METRICS_PORT=str(first),
        HVS_GROUP_METRICS_PORT=str(group_base),
        HVS_POLL_TIMEOUT="0.2",
        WTC_LOG_FORMAT="json",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "hvs", "--processes", "3"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        ports = [first, group_base, group_base + 1]
        deadline = time.monotonic() + 60
        while not all(serves_metrics(port) for port in ports):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the three consumers' metrics did not come up"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        neighbour.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
