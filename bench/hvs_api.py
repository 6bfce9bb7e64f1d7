"""Benchmark of the live usage side: HVS consumer throughput, usage API vs a bare endpoint, and
Redis memory per subscriber-day. Prints figures and ratios; never fails on a timing.

    python -m bench.hvs_api                    # a private redis-server on a free port
    python -m bench.hvs_api --redis-url redis://127.0.0.1:16379  # an existing one (db 14, 15)

1. Consumer: N CDR events (data and voice, 50 000 subscribers, two days) plus ticks are
   published to Redis Streams, then `hvs.runner.run(drain=True)` applies them: events/s; in the
   same run, the same batches prebuilt and only their Lua script calls timed (the Redis-side
   ceiling) and N processes in one group.
2. API: one uvicorn worker serving `api.app:app` and one serving `bare_app` below (a GET that
   reads one Redis hash and answers it as JSON, no auth), each loaded by the same small asyncio
   HTTP/1.1 keep-alive client in this process: closed-loop throughput (rps) with 32
   connections, then an open-loop 500 requests/s run for p50/p99 (latency from the scheduled
   send time, so a stall is not hidden).
   Then a wrong-password flood: 32 connections from 32 loopback addresses (127.0.1.x, one
   client each) send wrong passwords back to back while a valid user sends 200 requests/s
   (open loop); the valid user's p50/p99 with no flood, with the flood under the failed-login
   limit (the default 10 a minute), and with the limit off (every wrong password costs a full
   PBKDF2 check).
3. Memory: Redis `used_memory` growth and `MEMORY USAGE` of the usage hashes, per
   subscriber-day.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import orjson
import redis

from common.settings import PROJECT_ROOT

HERE = Path(__file__).resolve().parent
DATA_TYPES = ("video", "audio", "image", "text", "application")
CALL_TYPES = ("voice", "video")
START = datetime(2024, 1, 1)


# --------------------------------------------------------------------------- the bare baseline


def _bare_app():  # pragma: no cover - runs inside uvicorn
    import redis.asyncio as aioredis
    from fastapi import FastAPI
    from fastapi.responses import Response

    app = FastAPI()
    client = aioredis.Redis.from_url(os.environ["REDIS_URL"], max_connections=64)
    gc.collect()  # the same process tuning as api.app's lifespan
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)

    @app.get("/bare")
    async def bare(key: str) -> Response:
        raw = await client.hgetall(key)
        body = {k.decode(): int(v) for k, v in raw.items()}
        return Response(orjson.dumps(body), media_type="application/json")

    return app


def __getattr__(name: str):
    if name == "bare_app":
        app = _bare_app()
        globals()["bare_app"] = app
        return app
    raise AttributeError(name)


# ---------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


class PrivateRedis:
    """A throwaway redis-server (no persistence) in a temp dir, stopped by its pid."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server not found (apt-get install redis-server)")
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_port(self.port)

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def events(n: int, subscribers: int, seed: int = 1):
    """Data and voice events alternately; each file has 1000 consecutive lines (2..1001), as the
    CDR publisher sends a file's landed rows in line order."""
    rng = random.Random(seed)
    subs = [f"{rng.randrange(10**13):013d}" for _ in range(subscribers)]
    for i in range(n):
        ts = START + timedelta(seconds=rng.randrange(2 * 86400), microseconds=rng.randrange(10**6))
        f, line = divmod(i // 2, 1000)
        if i % 2 == 0:
            yield (
                "cdr-data",
                {
                    "event_id": f"cdr_data_{f:05d}.csv:{line + 2}",
                    "source_file": f"cdr_data_{f:05d}.csv",
                    "line_no": line + 2,
                    "msisdn": rng.choice(subs),
                    "tower_id": rng.randint(1, 2000),
                    "up_bytes": rng.randint(100_000, 1_000_000),
                    "down_bytes": rng.randint(100_000, 1_000_000),
                    "data_type": rng.choice(DATA_TYPES),
                    "ip_address": "10.1.2.3",
                    "website_url": "https://example.org/a",
                    "event_datetime": ts.strftime("%Y-%m-%d %H:%M:%S.%f"),
                },
            )
        else:
            yield (
                "cdr-voice",
                {
                    "event_id": f"cdr_voice_{f:05d}.csv:{line + 2}",
                    "source_file": f"cdr_voice_{f:05d}.csv",
                    "line_no": line + 2,
                    "msisdn": rng.choice(subs),
                    "tower_id": rng.randint(1, 2000),
                    "call_type": rng.choice(CALL_TYPES),
                    "dest_nr": "0123456789012",
                    "call_duration_sec": rng.randint(1, 1800),
                    "start_time": ts.strftime("%Y-%m-%d %H:%M:%S.%f"),
                },
            )


# ------------------------------------------------------------------------------ 1. consumer


def consumer_processes(stream_url: str, redis_url: str, count: int, keep_keys: list) -> dict:
    """The same events again (a new group, an empty store) by `count` `python -m hvs
    --drain` processes in one group; their own run times (imports excluded)."""
    r = redis.Redis.from_url(redis_url)
    keep = {k: r.dump(k) for k in keep_keys}  # the API bench reads these
    r.flushdb()
    env = dict(
        os.environ,
        REDIS_URL=redis_url,
        STREAM_URL=stream_url,
        HVS_GROUP="bench-processes",
        HVS_METRICS_PORT="0",
        WTC_LOG_FORMAT="json",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "hvs", "--drain"],
            cwd=PROJECT_ROOT,
            env={**env, "HVS_CONSUMER_NAME": f"p{i}"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(count)
    ]
    applied, seconds = 0, 0.0
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        for line in err.decode().splitlines():
            if "hvs consumer stopped" in line:
                entry = orjson.loads(line)
                applied += entry["events_applied"]
                seconds = max(seconds, entry["seconds"])
    r.flushdb()
    for k, v in keep.items():
        r.restore(k, 0, v)
    return {
        "processes": count,
        "events": applied,
        "seconds": seconds,
        "events_per_s": applied / seconds,
    }


def apply_ceiling(redis_url: str, n: int, subscribers: int, keep_keys: list) -> dict:
    """The same events' batches decoded and built beforehand (untimed), then only their Lua
    script calls back to back into an empty store: the consumer's Redis-side ceiling, measured
    in the same run (the consumer's figure is a fraction of it)."""
    from hvs.decode import cdr_row
    from hvs.settings import HvsSettings
    from hvs.store import Hvs

    r = redis.Redis.from_url(redis_url)
    hvs = Hvs(HvsSettings(redis_url=redis_url, metrics_port=0))  # loads the rates now
    category = {"cdr-data": "data", "cdr-voice": "call"}
    rows = [cdr_row(orjson.loads(orjson.dumps(e)), category[t]) for t, e in events(n, subscribers)]
    size = hvs.settings.batch_size
    built = [hvs.build(rows[i : i + size]) for i in range(0, len(rows), size)]
    keep = {k: r.dump(k) for k in keep_keys}
    r.flushdb()
    r.config_resetstat()
    t0 = time.perf_counter()
    for b in built:
        hvs._run_script(b.bits, b.hashes, b.incr, b.sadd)
    seconds = time.perf_counter() - t0
    stats = r.info("commandstats").get("cmdstat_evalsha", {})
    r.flushdb()
    for k, v in keep.items():
        r.restore(k, 0, v)
    return {
        "events_per_s": len(rows) / seconds,
        "redis_script_us_per_event": stats.get("usec", 0) / len(rows),
    }


def bench_consumer(
    stream_url: str, redis_url: str, n: int, subscribers: int, processes: int = 2
) -> dict:
    from hvs.runner import run, tune_gc
    from hvs.settings import HvsSettings
    from ingestion.generators.forex import ForexConfig, publish_ticks
    from ingestion.stream import open_producer

    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    redis.Redis.from_url(stream_url).flushdb()
    settings = HvsSettings(redis_url=redis_url, stream_url=stream_url, metrics_port=0)
    publish_ticks(
        ForexConfig(start=START, duration=timedelta(hours=49), step_ms=10_000), stream_url
    )
    ticks_s = time.perf_counter()
    run(settings, threading.Event(), drain=True)
    ticks_s = time.perf_counter() - ticks_s
    with open_producer(stream_url) as p:
        by_topic: dict[str, list] = {"cdr-data": [], "cdr-voice": []}
        for topic, e in events(n, subscribers):
            by_topic[topic].append((e["msisdn"].encode(), orjson.dumps(e), None))
        for topic, items in by_topic.items():
            p.publish_many(topic, items)
    r.config_resetstat()
    mem0 = r.info("memory")["used_memory"]
    tune_gc()  # as `python -m hvs` does
    t0 = time.perf_counter()
    applied = run(settings, threading.Event(), drain=True)
    seconds = time.perf_counter() - t0
    mem1 = r.info("memory")["used_memory"]
    keys = r.keys("hvs:u:*")
    sample = random.Random(2).sample(keys, min(2000, len(keys)))
    per_key = sum(r.memory_usage(k, samples=0) for k in sample) / len(sample)
    fields = sum(r.hlen(k) for k in sample) / len(sample)
    stats = r.info("commandstats").get("cmdstat_evalsha", {})
    per_process = None
    if processes > 1:
        per_process = consumer_processes(stream_url, redis_url, processes, sample[:200])
    ceiling = apply_ceiling(redis_url, n, subscribers, sample[:200])
    return {
        "events": applied,
        "seconds": seconds,
        "events_per_s": applied / seconds,
        "tick_drain_s": ticks_s,
        "subscriber_days": len(keys),
        "hash_bytes_per_subscriber_day": per_key,
        "fields_per_subscriber_day": fields,
        "used_memory_per_subscriber_day": (mem1 - mem0) / len(keys),
        "redis_script_us_per_event": stats.get("usec", 0) / max(applied, 1),
        "sample_keys": [k.decode() for k in sample[:200]],
        "processes": per_process,
        "ceiling": ceiling,
    }


def _buckets(name: str) -> dict[str, float]:
    from prometheus_client import REGISTRY

    out = {}
    for metric in REGISTRY.collect():
        if metric.name == name:
            for sample in metric.samples:
                if sample.name == name + "_bucket":
                    out[sample.labels["le"]] = sample.value
    return out


def bench_latency(stream_url: str, redis_url: str, files: int = 25, every: float = 0.2) -> dict:
    """Near real time: a follow-mode consumer while files of 1000 events are published every
    `every` seconds; landing (publish) to applied, from the consumer's histogram."""
    from hvs.runner import run
    from hvs.settings import HvsSettings
    from ingestion.stream import open_producer

    settings = HvsSettings(
        redis_url=redis_url, stream_url=stream_url, metrics_port=0, group="bench-latency",
        poll_timeout=0.05,
    )  # fmt: skip
    redis.Redis.from_url(stream_url).delete("stream:cdr-data", "stream:cdr-voice")
    name = "hvs_landing_to_applied_seconds"
    before = _buckets(name)
    stop = threading.Event()
    worker = threading.Thread(target=run, args=(settings, stop))
    worker.start()
    gen = events(files * 1000, 50_000, seed=9)
    with open_producer(stream_url) as p:
        for f in range(files):
            batch = [next(gen) for _ in range(1000)]
            for topic in ("cdr-data", "cdr-voice"):
                p.publish_many(
                    topic,
                    [
                        (
                            e["msisdn"].encode(),
                            orjson.dumps({**e, "event_id": f"lat{f}.csv:{i}"}),
                            None,
                        )
                        for i, (t, e) in enumerate(batch)
                        if t == topic
                    ],
                )
            time.sleep(every)
    time.sleep(1.0)
    stop.set()
    worker.join(30)
    after = _buckets(name)
    counts = {le: after[le] - before.get(le, 0) for le in after}
    total = counts.get("+Inf", 0)

    def bound(q: float) -> str:
        for le, c in sorted(counts.items(), key=lambda kv: float(kv[0])):
            if c >= q * total:
                return le
        return "+Inf"

    return {"observations": total, "p50_le_s": bound(0.5), "p99_le_s": bound(0.99)}


# ----------------------------------------------------------------------------------- 2. API


async def _request_loop(port: int, paths: list[bytes], auth: bytes, stop_at: float, lat: list):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    rng = random.Random()
    try:
        while time.perf_counter() < stop_at:
            path = rng.choice(paths)
            t0 = time.perf_counter()
            writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: bench\r\n" + auth + b"\r\n")
            await _read_response(reader)
            lat.append(time.perf_counter() - t0)
    finally:
        writer.close()


async def _flood_loop(port: int, path: bytes, address: str, stop_at: float, counts: dict):
    """Wrong passwords back to back from one client address; counts the answers by status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))
    wrong = b"Authorization: Basic " + base64.b64encode(b"wtc:wrong-" + address.encode())
    try:
        while time.perf_counter() < stop_at:
            writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: bench\r\n" + wrong + b"\r\n\r\n")
            status = await _read_response(reader, ok=(401, 429))
            counts[status] = counts.get(status, 0) + 1
    finally:
        writer.close()


async def flood(port: int, paths, auth: bytes, seconds: float, flooders: int) -> dict:
    """A valid user at 200 requests/s (open loop) during a wrong-password flood from
    `flooders` client addresses; the valid user's latency and the flood's answers."""
    counts: dict[int, int] = {}
    stop_at = time.perf_counter() + seconds + 0.5
    tasks = [
        asyncio.create_task(_flood_loop(port, paths[0], f"127.0.1.{i + 1}", stop_at, counts))
        for i in range(flooders)
    ]
    await asyncio.sleep(0.2)  # the flood is on before the first measured request
    valid = await open_loop(port, paths, auth, 200, seconds)
    await asyncio.gather(*tasks)
    return {**valid, "flood_answers": dict(sorted(counts.items()))}


def bench_flood(redis_url: str, keys: list[str], seconds: float, flooders: int = 32) -> dict:
    """The valid user's p99 with no flood, with a flood under the failed-login limit and with
    a flood and the limit off, each on a fresh API process (fresh limiter)."""
    auth = b"Authorization: Basic " + base64.b64encode(b"wtc:wtc-dev") + b"\r\n"
    paths = [_api_path(k) for k in keys]
    out: dict = {}
    for name, limit, flooding in (("no_flood", "10", 0), ("flood_limited", "10", flooders),
                                  ("flood_no_limit", "0", flooders)):  # fmt: skip
        port = free_port()
        env = dict(os.environ, REDIS_URL=redis_url, API_AUTH_FAILURES_PER_MINUTE=limit,
                   API_METRICS_PORT="0")  # fmt: skip
        proc = serve("api.app:app", port, env)
        try:

            async def go(port: int = port, flooding: int = flooding) -> dict:
                await closed_loop(port, paths, auth, 0.5, 4)  # warm up, the login cached
                if not flooding:
                    return await open_loop(port, paths, auth, 200, seconds)
                return await flood(port, paths, auth, seconds, flooding)

            out[name] = asyncio.run(go())
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    return out


def _api_path(key: str) -> bytes:
    _, _, msisdn, day = key.split(":")
    end = (datetime.strptime(day, "%Y%m%d") + timedelta(days=1)).strftime("%Y%m%d%H%M%S")
    return f"/data_usage?msisdn={msisdn}&start_time={day}000000&end_time={end}".encode()


async def _read_response(reader: asyncio.StreamReader, ok: tuple[int, ...] = (200,)) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    if status not in ok:
        raise RuntimeError(f"HTTP {status}: {head[:200]!r}")
    return status


async def closed_loop(port: int, paths, auth: bytes, seconds: float, conns: int) -> dict:
    lat: list[float] = []
    stop_at = time.perf_counter() + seconds
    t0 = time.perf_counter()
    await asyncio.gather(*(_request_loop(port, paths, auth, stop_at, lat) for _ in range(conns)))
    return {"rps": len(lat) / (time.perf_counter() - t0), **_pcts(lat)}


async def open_loop(port: int, paths, auth: bytes, rate: float, seconds: float) -> dict:
    """Requests sent at a fixed rate over a pool of connections; latency from schedule."""
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(64):
        pool.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    lat: list[float] = []
    rng = random.Random(3)
    start = time.perf_counter() + 0.05
    total = int(rate * seconds)

    async def one(i: int) -> None:
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        reader, writer = await pool.get()
        writer.write(b"GET " + rng.choice(paths) + b" HTTP/1.1\r\nHost: bench\r\n" + auth + b"\r\n")
        await _read_response(reader)
        lat.append(time.perf_counter() - due)
        pool.put_nowait((reader, writer))

    await asyncio.gather(*(one(i) for i in range(total)))
    while not pool.empty():
        pool.get_nowait()[1].close()
    return {"rate": rate, "sent": total, **_pcts(lat)}


def _pcts(lat: list[float]) -> dict:
    s = sorted(lat)
    if not s:
        return {"p50_ms": None, "p99_ms": None}
    return {"p50_ms": s[len(s) // 2] * 1000, "p99_ms": s[int(len(s) * 0.99)] * 1000}


def serve(app: str, port: int, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--no-access-log", "--log-level", "warning"],
        cwd=PROJECT_ROOT,
        env=env,
    )  # fmt: skip
    wait_port(port)
    return proc


KINDS = ("bare_closed", "api_closed", "bare_open_500", "api_open_500")


def bench_api(redis_url: str, keys: list[str], seconds: float, conns: int, rounds: int = 3) -> dict:
    env = dict(os.environ, REDIS_URL=redis_url, API_METRICS_PORT="0")
    api_port, bare_port = free_port(), free_port()
    api = serve("api.app:app", api_port, env)
    bare = serve("bench.hvs_api:bare_app", bare_port, env)
    auth = b"Authorization: Basic " + base64.b64encode(b"wtc:wtc-dev") + b"\r\n"
    api_paths, bare_paths = [], []
    for k in keys:
        api_paths.append(_api_path(k))
        bare_paths.append(f"/bare?key={k}".encode())
    out: dict = {}
    try:

        async def go() -> None:
            # warm up both (connections, auth cache), then alternate the measured runs
            await closed_loop(api_port, api_paths, auth, 1.0, conns)
            await closed_loop(bare_port, bare_paths, b"", 1.0, conns)
            runs: dict[str, list[dict]] = {k: [] for k in KINDS}
            for _ in range(rounds):  # alternate, so a load spike hits both sides alike
                runs["bare_closed"].append(
                    await closed_loop(bare_port, bare_paths, b"", seconds, conns)
                )
                runs["api_closed"].append(
                    await closed_loop(api_port, api_paths, auth, seconds, conns)
                )
                runs["bare_open_500"].append(
                    await open_loop(bare_port, bare_paths, b"", 500, seconds)
                )
                runs["api_open_500"].append(
                    await open_loop(api_port, api_paths, auth, 500, seconds)
                )
            for kind, results in runs.items():  # the median run of each kind (by rps / p99)
                key = "rps" if kind.endswith("closed") else "p99_ms"
                out[kind] = sorted(results, key=lambda r: r[key])[len(results) // 2]
                out[kind]["all_" + key] = [round(r[key], 2) for r in results]

        asyncio.run(go())
    finally:
        for proc in (api, bare):
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    out["rps_ratio"] = out["api_closed"]["rps"] / out["bare_closed"]["rps"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hvs_api", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--redis-url", help="an existing Redis (uses db 14 and 15, flushed)")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--subscribers", type=int, default=50_000)
    parser.add_argument("--seconds", type=float, default=3.0, help="per API run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating API rounds (median)")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    private = None if args.redis_url else PrivateRedis()
    try:
        if private:
            hvs_url, stream_url = private.url(0), private.url(1)
        else:
            parts = urlsplit(args.redis_url)
            hvs_url = urlunsplit(parts._replace(path="/14"))
            stream_url = urlunsplit(parts._replace(path="/15"))
        c = bench_consumer(stream_url, hvs_url, args.events, args.subscribers)
        print(f"consumer: {c['events']} events in {c['seconds']:.2f} s = "
              f"{c['events_per_s']:,.0f} events/s (goal > 50 000); Redis script "
              f"{c['redis_script_us_per_event']:.1f} us/event")  # fmt: skip
        ce = c["ceiling"]
        print(f"same run, the script alone on prebuilt batches (Redis-side ceiling): "
              f"{ce['events_per_s']:,.0f} events/s, {ce['redis_script_us_per_event']:.1f} "
              f"us/event in Redis; the consumer reaches "
              f"{c['events_per_s'] / ce['events_per_s']:.0%} of it")  # fmt: skip
        lat = bench_latency(stream_url, hvs_url)
        print(f"near real time: {lat['observations']:.0f} file-batches, publish to applied "
              f"p50 <= {lat['p50_le_s']} s, p99 <= {lat['p99_le_s']} s (goal < 60 s)")  # fmt: skip
        if c["processes"]:
            pp = c["processes"]
            print(f"consumer, {pp['processes']} processes in one group: {pp['events']} events, "
                  f"{pp['events_per_s']:,.0f} events/s")  # fmt: skip
        print(f"memory: {c['subscriber_days']} subscriber-days, "
              f"{c['hash_bytes_per_subscriber_day']:.0f} B per usage hash "
              f"({c['fields_per_subscriber_day']:.1f} fields), "
              f"{c['used_memory_per_subscriber_day']:.0f} B used_memory growth per "
              f"subscriber-day (incl. applied-event bitmaps)")  # fmt: skip
        a = bench_api(hvs_url, c["sample_keys"], args.seconds, args.connections, args.rounds)
        bc, ac = a["bare_closed"], a["api_closed"]
        print(f"API: median of {args.rounds} alternating rounds; rps per round: bare "
              f"{bc['all_rps']}, API {ac['all_rps']}")  # fmt: skip
        print(f"bare endpoint: {bc['rps']:,.0f} rps (p50 {bc['p50_ms']:.2f} ms, p99 "
              f"{bc['p99_ms']:.2f} ms, {args.connections} connections)")  # fmt: skip
        print(f"usage API:     {ac['rps']:,.0f} rps (p50 {ac['p50_ms']:.2f} ms, p99 "
              f"{ac['p99_ms']:.2f} ms) = {a['rps_ratio']:.0%} of bare (goal >= 60 %)")  # fmt: skip
        for name in ("bare_open_500", "api_open_500"):
            o = a[name]
            print(f"{name}: {o['sent']} requests at {o['rate']:.0f}/s: p50 {o['p50_ms']:.2f} ms, "
                  f"p99 {o['p99_ms']:.2f} ms (rounds: {o['all_p99_ms']}; goal p99 < 10 ms "
                  f"for the API)")  # fmt: skip
        f = bench_flood(hvs_url, c["sample_keys"], args.seconds)
        for name in ("no_flood", "flood_limited", "flood_no_limit"):
            o = f[name]
            print(f"valid user at 200/s, {name}: p50 {o['p50_ms']:.2f} ms, p99 {o['p99_ms']:.2f} "
                  f"ms; flood answers {o.get('flood_answers', {})} (goal p99 < 20 ms)")  # fmt: skip
        print(f"load average during the run: {os.getloadavg()[0]:.2f} (2 cores, shared)")
    finally:
        if private:
            private.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
