"""Benchmark of the HVS consumer alone, optionally against another checkout of the project in
the same run (A B, B A, ...): events/s and Redis bytes per subscriber-day. Never fails on a timing.

    python -m bench.hvs_consumer                        # this checkout, 3 rounds
    python -m bench.hvs_consumer --vs /path/to/other    # and another checkout, alternately

The stream is filled once, as the CDR loader and the tick generator fill it: the starter's CDR
generator for `--hours` (default a whole day) with `--rows-per-file` (default 250 of the
starter's 1000) and as many fewer subscribers, so that a subscriber-day holds as many events as
in the starter, spread over the day alike (a batch of 5000 then spans four times the starter's
share of a day), as the loader's JSON messages keyed by msisdn; and the starter's ticks for the
same hours, as many fewer (0.4 ticks per CDR event, as in the starter). Each round runs
`python -m hvs --drain` from each checkout as its own process, with a fresh group and an empty
HVS database: events/s is the CDR events it applied over its own run time (ticks included, as
`make bench` measures it). Then `MEMORY USAGE` of every key of the HVS database over the number
of usage hashes (bytes per subscriber-day).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import orjson
import redis

from bench._ab import add_checkout_arguments, alternate, checkouts, pair_ratios, throwaway_redis


def fill_stream(stream_url: str, hours: int, rows_per_file: int = 250) -> dict:
    """The loader's CDR messages and the generator's ticks for the starter's first `hours`, at
    `rows_per_file` / 1000 of its rows, subscribers and ticks."""
    from ingestion.cdr_format import KINDS
    from ingestion.generators.cdr import CdrConfig, _CdrState, file_names
    from ingestion.generators.forex import ForexConfig, publish_ticks
    from ingestion.stream import open_producer

    share = rows_per_file / 1000
    subscribers = round(50_000 * share)
    config = CdrConfig(
        subscribers=subscribers, duration=timedelta(hours=hours), rows_per_file=rows_per_file
    )
    events = config.windows * 2 * rows_per_file
    state = _CdrState(config)
    int_cols = {
        name: {c.name for c in kind.columns if c.pg_type in ("integer", "bigint", "int")}
        for name, kind in KINDS.items()
    }
    loaded_at = "2024-01-03 00:00:00.000000"
    with open_producer(stream_url) as p:
        for index in range(config.windows):
            data_rows, voice_rows = state.window(index)
            names = file_names(config.window_start(index))
            pairs = zip(("data", "voice"), names, (data_rows, voice_rows), strict=True)
            for kind, name, rows in pairs:
                cols = KINDS[kind].column_names
                items = []
                for line, row in enumerate(rows, start=2):
                    obj: dict = {"event_id": f"{name}:{line}", "source_file": name, "line_no": line}
                    for col, v in zip(cols, row, strict=True):
                        obj[col] = int(v) if col in int_cols[kind] else v
                    if "." not in obj[cols[-1]]:
                        obj[cols[-1]] += ".000000"
                    obj["loaded_at"] = loaded_at
                    items.append((row[0].encode(), orjson.dumps(obj), None))
                p.publish_many(f"cdr-{kind}", items)
    ticks = publish_ticks(
        ForexConfig(
            start=config.start, duration=timedelta(hours=hours), step_ms=round(500 / share)
        ),
        stream_url,
    )
    return {"events": events, "subscribers": subscribers, "ticks": ticks}


def hvs_bytes(redis_url: str) -> dict:
    """MEMORY USAGE of every key of the HVS database, over the number of usage hashes."""
    r = redis.Redis.from_url(redis_url)
    keys = list(r.scan_iter(count=5000))
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.memory_usage(k, samples=0)
    sizes = pipe.execute()
    usage = [s for k, s in zip(keys, sizes, strict=True) if k.startswith(b"hvs:u:")]
    kinds: dict[str, list[int]] = {}
    for k, size in zip(keys, sizes, strict=True):
        kinds.setdefault(k.decode().split(":")[1], [0, 0])
        kinds[k.decode().split(":")[1]][0] += 1
        kinds[k.decode().split(":")[1]][1] += size
    return {
        "subscriber_days": len(usage),
        "hash_bytes": sum(usage) / max(1, len(usage)),
        "all_bytes_per_subscriber_day": sum(sizes) / max(1, len(usage)),
        "by_kind": {kind: {"keys": n, "bytes": b} for kind, (n, b) in sorted(kinds.items())},
    }


def run_once(tree: Path, stream_url: str, redis_url: str, group: str) -> dict:
    redis.Redis.from_url(redis_url).flushdb()
    env = dict(
        os.environ,
        REDIS_URL=redis_url,
        STREAM_URL=stream_url,
        HVS_GROUP=group,
        HVS_METRICS_PORT="0",
        WTC_LOG_FORMAT="json",
    )
    env.pop("PYTHONPATH", None)
    server = redis.Redis.from_url(redis_url)
    server.config_resetstat()
    cpu0 = server.info("cpu")
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # checkouts from before the `hvs` package ran the consumer as `api.hvs`
    module = "hvs" if (tree / "hvs" / "__main__.py").exists() else "api.hvs"
    done = subprocess.run(
        [sys.executable, "-m", module, "--drain"],
        cwd=tree,  # `-m` puts the checkout first on sys.path
        env=env,
        capture_output=True,
        check=True,
        timeout=900,
    )
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = server.info("cpu")
    stats = server.info("commandstats")
    top = sorted(stats.items(), key=lambda kv: -kv[1]["usec"])[:4]
    for line in done.stderr.decode().splitlines():
        if "hvs consumer stopped" in line:
            entry = orjson.loads(line)
            return {
                "events": entry["events_applied"],
                "seconds": entry["seconds"],
                "events_per_s": entry["events_applied"] / entry["seconds"],
                # whole process (imports too) and the Redis server (streams and HVS alike)
                "consumer_cpu_s": ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime,
                "redis_cpu_s": sum(cpu1[k] - cpu0[k] for k in ("used_cpu_sys", "used_cpu_user")),
                "redis_us_per_event": {
                    name.removeprefix("cmdstat_"): round(st["usec"] / entry["events_applied"], 2)
                    for name, st in top
                },
                **hvs_bytes(redis_url),
            }
    raise RuntimeError(f"no 'hvs consumer stopped' line from {tree}: {done.stderr[-2000:]!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hvs_consumer", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--hours", type=int, default=24, help="of the starter's two days")
    parser.add_argument("--rows-per-file", type=int, default=250, help="the starter: 1000")
    parser.add_argument("--rounds", type=int, default=3)
    add_checkout_arguments(parser, "the checkout measured as A")
    args = parser.parse_args(argv)
    with throwaway_redis() as private:
        stream_url, hvs_url = private.url(1), private.url(0)
        filled = fill_stream(stream_url, args.hours, args.rows_per_file)
        print(
            f"stream: {filled['events']:,} CDR events of {filled['subscribers']:,} subscribers, "
            f"{filled['ticks']:,} ticks ({args.hours} h of the starter at "
            f"{args.rows_per_file} rows per file)",
            flush=True,
        )

        def one_round(i: int, name: str, tree: Path) -> dict:
            res = run_once(tree, stream_url, hvs_url, f"bench-{i}-{name[0]}")
            print(
                f"round {i + 1} {name}: {res['events']:,} events in {res['seconds']:.2f} s = "
                f"{res['events_per_s']:,.0f} events/s (CPU s: consumer "
                f"{res['consumer_cpu_s']:.2f}, Redis {res['redis_cpu_s']:.2f}; Redis us per "
                f"event by command {res['redis_us_per_event']}); "
                f"{res['hash_bytes']:.0f} B per usage "
                f"hash, {res['all_bytes_per_subscriber_day']:.0f} B per subscriber-day",
                flush=True,
            )
            return res

        runs = alternate(checkouts(args), args.rounds, one_round)
        for name, results in runs.items():
            print(f"{name}: HVS keys by kind {results[-1]['by_kind']}")
            rates = [r["events_per_s"] for r in results]
            print(
                f"{name}: median {statistics.median(rates):,.0f} events/s "
                f"(min {min(rates):,.0f}, max {max(rates):,.0f}); "
                f"{results[-1]['all_bytes_per_subscriber_day']:.0f} B per subscriber-day"
            )
        if args.vs:
            a, b = runs.values()
            key = "all_bytes_per_subscriber_day"
            events_per_s = pair_ratios(
                "events/s", (x["events_per_s"] for x in a), (y["events_per_s"] for y in b)
            )
            print(f"{events_per_s}; bytes per subscriber-day A/B {a[-1][key] / b[-1][key]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
