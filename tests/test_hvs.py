"""The HVS consumer: decoding, costs against macros_py, exactly-once application on real Redis
through the real stream (Redis Streams), WAK pricing (known and pending rates), restarts,
republished batches, rejected messages, and the follow mode with SIGTERM."""

from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest
import redis
from prometheus_client import REGISTRY

from common.settings import PROJECT_ROOT
from hvs import keys as K
from hvs.decode import BadEvent, cdr_category, decode_tick, landed_at, load_cdr
from hvs.pricing import Rates, call_zar_units, data_zar_units, wak_units, wak_units_oracle
from hvs.runner import run
from hvs.settings import HvsSettings
from hvs.store import Hvs
from ingestion.generators.forex import ForexConfig, publish_ticks, tick_messages
from ingestion.stream import Message, open_consumer, open_producer
from macros_py.currency import RateLookup, fx_rates_hourly
from macros_py.indicators import Tick
from macros_py.tariffs import call_cost_zar, data_cost_zar
from ops.stack import free_port
from tests.fixtures.polling import wait_for

DATA_TYPES = ("video", "audio", "image", "text", "application")
CALL_TYPES = ("voice", "video")


# ------------------------------------------------------------------------------------ helpers


def data_event(msisdn: str, ts: datetime, up: int, down: int, dtype: str, file: str, line: int):
    return {
        "event_id": f"{file}:{line}",
        "source_file": file,
        "line_no": line,
        "msisdn": msisdn,
        "tower_id": 7,
        "up_bytes": up,
        "down_bytes": down,
        "data_type": dtype,
        "ip_address": "10.0.0.1",
        "website_url": "https://example.org/",
        "event_datetime": ts.strftime("%Y-%m-%d %H:%M:%S.%f"),
    }


def voice_event(msisdn: str, ts: datetime, seconds: int, ctype: str, file: str, line: int):
    return {
        "event_id": f"{file}:{line}",
        "source_file": file,
        "line_no": line,
        "msisdn": msisdn,
        "tower_id": 9,
        "call_type": ctype,
        "dest_nr": "0123456789012",
        "call_duration_sec": seconds,
        "start_time": ts.strftime("%Y-%m-%d %H:%M:%S.%f"),
    }


def make_events(n_files: int, rows: int, seed: int, start: datetime) -> dict[str, list[dict]]:
    """Events of `n_files` data and voice files over two days for 40 subscribers."""
    rng = random.Random(seed)
    subs = [f"{rng.randrange(10**13):013d}" for _ in range(40)]
    out: dict[str, list[dict]] = {"cdr-data": [], "cdr-voice": []}
    for f in range(n_files):
        for line in range(1, rows + 1):
            ts = start + timedelta(seconds=rng.randrange(2 * 86400))
            ts = ts.replace(microsecond=rng.randrange(1_000_000))
            out["cdr-data"].append(
                data_event(
                    rng.choice(subs),
                    ts,
                    rng.randint(100_000, 1_000_000),
                    rng.randint(100_000, 1_000_000),
                    rng.choice(DATA_TYPES),
                    f"cdr_data_{f:04d}.csv",
                    line + 1,
                )
            )
            out["cdr-voice"].append(
                voice_event(
                    rng.choice(subs),
                    ts,
                    rng.randint(1, 1800),
                    rng.choice(CALL_TYPES),
                    f"cdr_voice_{f:04d}.csv",
                    line + 1,
                )
            )
    return out


def publish(stream_url: str, topic: str, events: list[dict]) -> None:
    with open_producer(stream_url) as producer:
        producer.publish_many(
            topic, ((e["msisdn"].encode(), orjson.dumps(e), None) for e in events)
        )


def oracle_rates(ticks: list[Tick]) -> RateLookup:
    return RateLookup(fx_rates_hourly(ticks))


def expected_usage(
    events: dict[str, list[dict]], rates: RateLookup | None
) -> dict[str, dict[str, int]]:
    """{usage key: {field: value}} computed with macros_py only (tariff and currency)."""
    from macros_py.currency import zar_to_wak

    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for topic, evs in events.items():
        for e in evs:
            if topic == "cdr-data":
                ts = datetime.fromisoformat(e["event_datetime"])
                cat, typ = "data", e["data_type"]
                total = e["up_bytes"] + e["down_bytes"]
                zar = data_cost_zar(total)
            else:
                ts = datetime.fromisoformat(e["start_time"])
                cat, typ = "call", e["call_type"]
                zar = call_cost_zar(e["call_duration_sec"])
            h = out[K.usage_key(e["msisdn"], ts.strftime("%Y%m%d"))]
            p = f"{cat}:{typ}:"
            h[p + "ev"] += 1
            if cat == "data":
                h[p + "up"] += e["up_bytes"]
                h[p + "dn"] += e["down_bytes"]
            else:
                h[p + "s"] += e["call_duration_sec"]
            h[p + "zar"] += K.to_units(zar)
            rate = rates.as_of(ts.replace(minute=0, second=0, microsecond=0)) if rates else None
            if rate is None:
                h[p + "zp"] += K.to_units(zar)
            else:
                h[p + "wak"] += K.to_units(zar_to_wak(zar, rate.zar_per_wak))
    return {k: {f: v for f, v in h.items()} for k, h in out.items()}


def stored_usage(client: redis.Redis) -> dict[str, dict[str, int]]:
    """{usage key: {`category:usage_type:metric`: value}} as stored (read through the layout)."""
    out = {}
    for key in client.scan_iter(match="hvs:u:*", count=1000):
        out[key.decode()] = {
            f"{category}:{usage_type}:{metric}": v
            for (category, usage_type), metrics in K.parse_usage(client.hgetall(key)).items()
            for metric, v in metrics.items()
            if v != 0
        }
    return out


def stored_group(client: redis.Redis, key: str, category: str, usage_type: str) -> dict:
    return K.parse_usage(client.hgetall(key))[(category, usage_type)]


def settings_for(stack, **kw) -> HvsSettings:
    base = {
        "redis_url": stack.redis_url,
        "stream_url": stack.stream_url,
        "metrics_port": 0,
        "poll_timeout": 0.1,
    }
    base.update(kw)
    return HvsSettings(**base)


def drain(settings: HvsSettings) -> int:
    return run(settings, threading.Event(), drain=True)


def duplicates() -> float:
    return REGISTRY.get_sample_value("hvs_events_total", {"topic": "all", "outcome": "duplicate"})


def msg(topic: str, value: bytes, position: str = "1700000000000-0") -> Message:
    return Message(topic=topic, key=None, value=value, position=position, headers={})


# ------------------------------------------------------------------------- pure (no servers)


def test_fast_cost_paths_equal_macros_py():
    rng = random.Random(1)
    for _ in range(20_000):
        b = rng.randint(0, 10**12)
        assert data_zar_units(b) == K.to_units(data_cost_zar(b))
    for s in range(0, 5000):
        assert call_zar_units(s) == K.to_units(call_cost_zar(s))
    for _ in range(50_000):
        zar = rng.choice([rng.randint(0, 10**12), rng.randint(0, 1000), 5 * rng.randint(0, 10**6)])
        rate = rng.randint(10**9, 5 * 10**10)
        assert wak_units(zar, rate) == wak_units_oracle(zar, rate)
    # exact ties round half away from zero
    assert wak_units(1, 2 * 10**10) == wak_units_oracle(1, 2 * 10**10) == 1


def test_load_cdr_publish_format():
    m = msg(
        "cdr-data",
        orjson.dumps(
            data_event("0123456789012", datetime(2024, 1, 1, 23, 59, 59), 5, 7, "video", "f.csv", 3)
        ),
    )
    row, obj = load_cdr(m.value, cdr_category(m.topic))
    # (msisdn, day, category, usage_type, up, down, seconds, hour, source_file, line_no)
    assert row == ("0123456789012", "20240101", "data", "video", 5, 7, 0, "2024010123", "f.csv", 3)
    assert landed_at(obj, m.headers, m.position) == 1_700_000_000.0  # the entry id's publish time
    v = msg(
        "cdr-voice",
        orjson.dumps(voice_event("012345678", datetime(2024, 1, 2), 61, "voice", "v.csv", 9)),
    )
    row, _ = load_cdr(v.value, cdr_category(v.topic))
    assert row == ("012345678", "20240102", "call", "voice", 0, 0, 61, "2024010200", "v.csv", 9)


def test_landing_time_prefers_the_events_loaded_at():
    """The publisher's `loaded_at` (naive UTC, as on Kafka) wins over headers and entry ids."""
    e = data_event("0123456789012", datetime(2024, 1, 1), 5, 7, "video", "f.csv", 3)
    e["loaded_at"] = "2024-01-01 00:00:01.500000"
    headers = {"published_at": b"9"}
    want = datetime(2024, 1, 1, 0, 0, 1, 500000, tzinfo=UTC).timestamp()
    _, obj = load_cdr(orjson.dumps(e), "data")
    assert landed_at(obj, headers, "1700000000000-0") == want
    assert landed_at(obj, {}, "1700000000000-0") == want
    del e["loaded_at"]
    _, obj = load_cdr(orjson.dumps(e), "data")
    assert landed_at(obj, headers, "1-0") == 9


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"msisdn": "27abc"}, "msisdn"),
        ({"msisdn": 27123456789}, "msisdn"),
        ({"event_id": "no-line"}, "event_id"),
        ({"up_bytes": -1}, "up_bytes"),
        ({"up_bytes": 1.5}, "up_bytes"),
        ({"event_datetime": "2024-13-01 00:00:00"}, "event_datetime"),
        ({"event_datetime": "2024-01-01T00:00:00+02:00"}, "naive"),
        ({"data_type": "a:b"}, "data_type"),
    ],
)
def test_load_cdr_rejects_with_reason(change, reason):
    e = data_event("0123456789012", datetime(2024, 1, 1), 5, 7, "video", "f.csv", 3)
    e.update(change)
    with pytest.raises(BadEvent, match=reason):
        load_cdr(orjson.dumps(e), "data")
    with pytest.raises(BadEvent, match="JSON"):
        load_cdr(b"{not json", "data")


def test_rates_match_fx_rates_hourly():
    cfg = ForexConfig(start=datetime(2024, 1, 1), duration=timedelta(hours=5), step_ms=3000)
    rates = Rates()
    ticks = []
    for _, value in tick_messages(cfg):
        t = decode_tick(msg("tick-data", value))
        rates.add(t.pair, t.hour, t.price_sum)
        o = orjson.loads(value)
        ticks.append(
            Tick(
                o["pair_name"],
                datetime.fromisoformat(o["timestamp"]),
                Decimal(repr(o["bid_price"])),
                Decimal(repr(o["ask_price"])),
            )
        )
    lookup = oracle_rates(ticks)
    for h in range(-1, 8):
        hour = datetime(2024, 1, 1) + timedelta(hours=h)
        want = lookup.as_of(hour)
        got = rates.rate(hour.strftime("%Y%m%d%H"))
        assert got == (K.to_units(want.zar_per_wak) if want else None), hour


# ----------------------------------------------------------------------------- real Redis


@pytest.fixture
def hvs_env(stack, redis_client):
    return settings_for(stack)


def forex(hours: int = 50) -> ForexConfig:
    # one step every 20 s (180 ticks per pair-hour; the starter has 7200): lean and enough
    return ForexConfig(start=datetime(2024, 1, 1), duration=timedelta(hours=hours), step_ms=20_000)


def forex_oracle(cfg: ForexConfig) -> RateLookup:
    ticks = []
    for _, value in tick_messages(cfg):
        o = orjson.loads(value)
        ticks.append(
            Tick(
                o["pair_name"],
                datetime.fromisoformat(o["timestamp"]),
                Decimal(repr(o["bid_price"])),
                Decimal(repr(o["ask_price"])),
            )
        )
    return oracle_rates(ticks)


def test_stream_to_redis_exact_totals_and_wak(stack, hvs_env, redis_client):
    cfg = forex()
    publish_ticks(cfg, stack.stream_url)
    drain(hvs_env)  # rates first: every event hour then has its final rate
    events = make_events(n_files=4, rows=300, seed=7, start=datetime(2024, 1, 1, 0, 3, 20))
    for topic, evs in events.items():
        publish(stack.stream_url, topic, evs)
    assert drain(hvs_env) == 2400
    assert stored_usage(redis_client) == expected_usage(events, forex_oracle(cfg))
    # every key has the retention as its expiry
    some = next(redis_client.scan_iter(match="hvs:u:*"))
    assert 0 < redis_client.ttl(some) <= hvs_env.retention_seconds
    assert redis_client.ttl(K.seen_key("cdr_data_0000.csv")) > 0


def test_restart_mid_stream_and_republish_stay_exact(stack, hvs_env, redis_client):
    events = make_events(n_files=3, rows=400, seed=11, start=datetime(2024, 1, 1))
    for topic, evs in events.items():
        publish(stack.stream_url, topic, evs)
    topics = ["cdr-data", "cdr-voice", "tick-data"]
    hvs = Hvs(hvs_env)
    # first consumer: one batch applied and committed, the next applied but not committed (a
    # crash between the Redis commit and the stream commit), then it dies
    c1 = open_consumer(stack.stream_url, topics, "hvs", consumer_name="c1")
    b1 = c1.poll(500, 1.0)
    hvs.process(b1)
    c1.commit(b1)
    b2 = c1.poll(500, 1.0)
    assert b2
    hvs.process(b2)
    # (no commit, no close: the process crashed)
    # a restart under the same name re-reads its uncommitted entries first, then the rest
    settings = hvs_env.model_copy(update={"consumer_name": "c1", "batch_size": 700})
    dup0 = duplicates()
    drain(settings)
    assert duplicates() - dup0 == len(b2)  # the uncommitted batch came back and was skipped
    # republish a batch of already applied events (a loader retry): nothing changes
    publish(stack.stream_url, "cdr-data", events["cdr-data"][:250])
    publish(stack.stream_url, "cdr-voice", events["cdr-voice"][100:200])
    drain(settings)
    assert duplicates() - dup0 == len(b2) + 350
    assert stored_usage(redis_client) == expected_usage(events, None)
    assert c1.lag() == 0


def test_duplicates_inside_one_batch_count_once(stack, hvs_env, redis_client):
    e = data_event("0123456789012", datetime(2024, 1, 1, 5), 100, 200, "text", "d.csv", 2)
    hvs = Hvs(hvs_env)
    res = hvs.process([msg("cdr-data", orjson.dumps(e), f"1-{i}") for i in range(3)])
    assert (res.applied, res.duplicates) == (1, 2)
    res = hvs.process([msg("cdr-data", orjson.dumps(e), "2-0")])
    assert (res.applied, res.duplicates) == (0, 1)
    stored = stored_group(redis_client, K.usage_key("0123456789012", "20240101"), "data", "text")
    assert stored[K.EVENTS] == 1 and stored[K.UP] + stored[K.DOWN] == 300


def test_runs_of_lines_partly_applied_apply_the_rest_exactly(stack, hvs_env, redis_client):
    """Lines travel as runs (one BITCOUNT, SETRANGE for whole bytes, SETBIT for the ends) and
    single offsets: a batch overlapping applied lines applies exactly the others."""
    ts = datetime(2024, 1, 1, 5)

    def batch(lines: list[int], at: int) -> list[Message]:
        return [
            msg(
                "cdr-data",
                orjson.dumps(data_event("0123", ts, 1, 2, "text", "r.csv", n)),
                f"{at}-{n}",
            )
            for n in lines
        ]

    hvs = Hvs(hvs_env)
    first = [3, 4, 5, 9, *range(12, 30)]  # runs 3-5 and 12-29 (whole bytes 2 and 3), single 9
    assert hvs.process(batch(first, 1)).applied == len(first)
    bits = K.seen_key("r.csv")
    assert [n for n in range(64) if redis_client.getbit(bits, n)] == first
    second = [*range(1, 12), *range(28, 45), 50]  # overlaps 3-5, 9, 28-29
    res = hvs.process(batch(second, 2))
    assert (res.applied, res.duplicates) == (len(set(second) - set(first)), 6)
    assert [n for n in range(64) if redis_client.getbit(bits, n)] == sorted(set(first + second))
    stored = stored_group(redis_client, K.usage_key("0123", "20240101"), "data", "text")
    assert stored[K.EVENTS] == len(set(first + second))
    assert stored[K.UP] + stored[K.DOWN] == 3 * len(set(first + second))


def test_a_new_group_beside_fields_written_by_pricing_still_adds(stack, hvs_env, redis_client):
    """A usage group's first event writes its fields in one HSET; `wak` and `zp`, which WAK
    pricing also writes (even into a key that expired meanwhile), are always added to."""
    key = K.usage_key("0123456789012", "20240101")
    field = functools.partial(K.usage_field, "data", "text")
    redis_client.hset(key, mapping={field(K.WAK): 5, field(K.ZAR_PENDING): -3})
    e = data_event("0123456789012", datetime(2024, 1, 1, 5), 100, 200, "text", "p.csv", 2)
    assert Hvs(hvs_env).process([msg("cdr-data", orjson.dumps(e))]).applied == 1
    zar = data_zar_units(300)
    assert K.parse_usage(redis_client.hgetall(key)) == {
        ("data", "text"): {
            K.EVENTS: 1,
            K.UP: 100,
            K.DOWN: 200,
            K.ZAR: zar,
            K.WAK: 5,
            K.ZAR_PENDING: zar - 3,  # no rate known: the ZAR waits
        }
    }


def test_a_key_of_the_wrong_type_late_in_a_batch_changes_nothing(stack, hvs_env, redis_client):
    """The apply script checks a usage hash by its first write (under pcall), not by a TYPE per
    hash: when a later hash of the batch is of the wrong type, or holds a count that is not an
    integer, the first writes already made are undone (a field they created is deleted, one
    written twice is taken back twice) and nothing is changed: no half-applied batch."""
    hvs = Hvs(hvs_env)
    bits, kept, new, string, garbled = (
        K.seen_key("w.csv"),
        K.usage_key("2700000000001", "20240101"),
        K.usage_key("2700000000002", "20240101"),
        K.usage_key("2700000000003", "20240101"),
        K.usage_key("2700000000004", "20240101"),
    )
    redis_client.hset(kept, mapping={"a": 10, "b": 1})
    redis_client.expire(kept, 1000)
    redis_client.set(string, "garbage")
    redis_client.hset(garbled, "a", "not a number")
    before = {key: redis_client.dump(key) for key in (kept, string, garbled)}

    def script(*hashes: list) -> list:
        args: list = [K.PAUSE_KEY, 86400, 1, bits, 1, 2, 4, 0, len(hashes)]
        for h in hashes:
            args += h
        return hvs._call_script(args)

    got = script(
        [kept, 1, 1, "a", 5, "b", 2],  # an existing field, then one more
        [new, 2, 0, "a", 3, "b", 4],  # a new group (one HSET after its count)
        [kept, 0, 1, "a", 7],  # the same field again
        [string, 1, 0, "a", 1],
        [new, 0, 1, "c", 1],
        [garbled, 1, 0, "a", 1],
    )
    assert [x.decode() for x in got] == [
        "WRONGTYPE",
        string,
        "string",
        "hash",
        garbled,
        "hash with a field that is not an integer",
        "hash of integers",
    ]
    assert {key: redis_client.dump(key) for key in (kept, string, garbled)} == before
    assert redis_client.ttl(kept) > 900
    assert not redis_client.exists(new) and not redis_client.exists(bits)
    # without the wrong keys the same batch applies whole
    redis_client.delete(string, garbled)
    assert (
        script([kept, 1, 1, "a", 5, "b", 2], [new, 2, 0, "a", 3, "b", 4], [kept, 0, 1, "a", 7])
        == []
    )
    assert redis_client.hgetall(kept) == {b"a": b"22", b"b": b"3"}
    assert redis_client.hgetall(new) == {b"a": b"3", b"b": b"4"}
    assert redis_client.ttl(new) > 0 and [redis_client.getbit(bits, n) for n in range(6)] == [
        0,
        0,
        1,
        1,
        1,
        0,
    ]


def test_a_wrong_field_after_a_hashs_first_write_or_a_wrong_bitmap_changes_nothing(
    stack, hvs_env, redis_client
):
    """Every HINCRBY of the apply script runs under pcall: a field that is not an integer after a
    hash's first write (which succeeded) takes back that write and the hashes before it. A bitmap
    or set of another type is found by TYPE before anything is written."""
    hvs = Hvs(hvs_env)
    bits, pending, kept, new = (
        K.seen_key("f.csv"),
        K.PENDING_INDEX,
        K.usage_key("2700000000011", "20240101"),
        K.usage_key("2700000000012", "20240101"),
    )
    redis_client.hset(kept, mapping={"a": 10, "b": "x"})
    before = redis_client.dump(kept)

    def script(sets: list, *hashes: list) -> list:
        args: list = [K.PAUSE_KEY, 86400, 1, bits, 1, 0, 3, len(sets) // 2, *sets, len(hashes)]
        for h in hashes:
            args += h
        return [x.decode() for x in hvs._call_script(args)]

    batch = ([new, 2, 0, "a", 3, "b", 4], [kept, 0, 2, "a", 5, "b", 1])
    got = script([pending, "2024010100"], *batch)
    assert got == [
        "WRONGTYPE",
        kept,
        "hash with a field that is not an integer",
        "hash of integers",
    ]
    assert redis_client.dump(kept) == before
    assert not redis_client.exists(new) and not redis_client.exists(bits, pending)

    redis_client.hset(kept, "b", 1)
    redis_client.hset(bits, "a", 1)
    redis_client.set(pending, "x")
    wrong = {bits: redis_client.dump(bits), pending: redis_client.dump(pending)}
    got = script([pending, "2024010100"], *batch)
    assert got == ["WRONGTYPE", bits, "hash", "string", pending, "string", "set"]
    assert {key: redis_client.dump(key) for key in wrong} == wrong
    assert redis_client.hgetall(kept) == {b"a": b"10", b"b": b"1"} and not redis_client.exists(new)


def test_a_batch_with_thousands_of_fields_in_one_hash_applies_whole(stack, hvs_env, redis_client):
    """One batch's WAK-pending ZAR of 6000 usage groups in one hour goes to one hash: its 6000
    fields are added in chunks (Lua's unpack takes a few thousand values), every event counted."""
    ts = datetime(2024, 1, 1, 5)
    events = [
        data_event(f"27{n:011d}", ts, 100, 200 + n, "text", "many.csv", n + 2) for n in range(6000)
    ]
    hvs = Hvs(hvs_env)
    res = hvs.process([msg("cdr-data", orjson.dumps(e), f"1-{i}") for i, e in enumerate(events)])
    assert (res.applied, res.duplicates) == (6000, 0)
    pending = redis_client.hgetall(K.pending_key("2024010105"))
    assert len(pending) == 6000
    want = sum(data_zar_units(300 + n) for n in range(6000))
    assert sum(int(v) for v in pending.values()) == want
    for n in (0, 5999):
        got = K.parse_usage(redis_client.hgetall(K.usage_key(f"27{n:011d}", "20240101")))
        assert got[("data", "text")][K.EVENTS] == 1 and got[("data", "text")][K.DOWN] == 200 + n


def test_sums_beyond_what_lua_adds_exactly_are_left_to_redis(stack, hvs_env, redis_client):
    """A stored value of more than 15 digits (or not a plain integer) is added to by HINCRBY,
    exact in 64 bits, never by Lua's doubles."""
    key = K.usage_key("0123456789012", "20240101")
    big = 2**62 + 1  # not a double
    redis_client.hset(key, K.usage_field("data", "text", K.ZAR_PENDING), big)
    e = data_event("0123456789012", datetime(2024, 1, 1, 5), 100, 200, "text", "big.csv", 2)
    assert Hvs(hvs_env).process([msg("cdr-data", orjson.dumps(e))]).applied == 1
    got = K.parse_usage(redis_client.hgetall(key))[("data", "text")]
    assert got[K.ZAR_PENDING] == big + data_zar_units(300) and got[K.EVENTS] == 1


def test_wak_pending_until_a_rate_is_known(stack, hvs_env, redis_client):
    # events first: no tick yet, so their WAK waits; then ticks arrive and price them
    events = make_events(n_files=1, rows=200, seed=3, start=datetime(2024, 1, 1, 2))
    for topic, evs in events.items():
        publish(stack.stream_url, topic, evs)
    drain(hvs_env)
    before = stored_usage(redis_client)
    assert before == expected_usage(events, None)
    assert redis_client.scard(K.PENDING_INDEX) > 0
    cfg = forex(hours=3)  # ticks 00:00-03:00: later hours take the 02:00 rate as of
    publish_ticks(cfg, stack.stream_url)
    drain(hvs_env)
    after = stored_usage(redis_client)
    assert redis_client.scard(K.PENDING_INDEX) == 0
    lookup = forex_oracle(cfg)
    want = expected_usage(events, lookup)
    for key, fields in want.items():
        got = after[key]
        for f, v in fields.items():
            if f.endswith(":wak"):
                # pending ZAR is priced per (usage key, type, hour) sum, not per event: equal
                # within half a unit per event
                n = fields[f.replace(":wak", ":ev")]
                assert abs(got[f] - v) <= n, (key, f)
            else:
                assert got[f] == v, (key, f)
        assert not any(f.endswith(":zp") for f in got)


def test_rejected_messages_are_kept_and_committed(stack, hvs_env, redis_client):
    good = data_event("0123456789012", datetime(2024, 1, 1), 1, 2, "text", "g.csv", 2)
    publish(stack.stream_url, "cdr-data", [good])
    with open_producer(stack.stream_url) as p:
        p.publish("cdr-data", b"not json")
        p.publish("tick-data", b'{"pair_name": "XXXYYY"}')
    assert drain(hvs_env) == 1
    rejected = [orjson.loads(x) for x in redis_client.lrange(K.REJECTED_KEY, 0, -1)]
    assert sorted(r["topic"] for r in rejected) == ["cdr-data", "tick-data"]
    assert all(r["reason"] for r in rejected)
    c = open_consumer(stack.stream_url, ["cdr-data", "tick-data"], "hvs")
    assert c.lag() == 0
    c.close()


def test_follow_mode_metrics_and_sigterm(stack, redis_client):
    port = free_port()
    env = dict(
        os.environ,
        REDIS_URL=stack.redis_url,
        STREAM_URL=stack.stream_url,
        HVS_METRICS_PORT=str(port),
        HVS_POLL_TIMEOUT="0.2",
        WTC_LOG_FORMAT="json",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "hvs"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        events = make_events(n_files=1, rows=100, seed=5, start=datetime(2024, 1, 1))
        for topic, evs in events.items():
            publish(stack.stream_url, topic, evs)
        want = expected_usage(events, None)
        wait_for(lambda: stored_usage(redis_client) == want, "events applied", 30, process=proc)

        def metrics() -> str | None:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            wanted = ("hvs_landing_to_applied_seconds_count", "hvs_lag")
            return body if all(name in body for name in wanted) else None

        body = wait_for(metrics, "the latency and lag metrics", 30, process=proc)
        assert 'hvs_events_total{outcome="applied",topic="cdr"} 200.0' in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert b"hvs consumer stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_two_consumers_in_one_group_share_the_work_exactly(stack, hvs_env, redis_client):
    cfg = forex()
    publish_ticks(cfg, stack.stream_url)
    drain(hvs_env.model_copy(update={"consumer_name": "ticks"}))
    events = make_events(n_files=4, rows=300, seed=21, start=datetime(2024, 1, 1, 0, 3, 20))
    for topic, evs in events.items():
        publish(stack.stream_url, topic, evs)
    totals: dict[str, int] = {}

    def one(name: str) -> None:
        totals[name] = drain(hvs_env.model_copy(update={"consumer_name": name, "batch_size": 200}))

    threads = [threading.Thread(target=one, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(totals.values()) == 2400  # each event applied by exactly one of them
    assert stored_usage(redis_client) == expected_usage(events, forex_oracle(cfg))


def test_processes_option_runs_a_group_and_stops_on_sigterm(stack, redis_client):
    env = dict(
        os.environ,
        REDIS_URL=stack.redis_url,
        STREAM_URL=stack.stream_url,
        HVS_METRICS_PORT="0",
        HVS_POLL_TIMEOUT="0.2",
        HVS_BATCH_SIZE="100",
        WTC_LOG_FORMAT="json",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "hvs", "--processes", "2"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        events = make_events(n_files=2, rows=300, seed=8, start=datetime(2024, 1, 1))
        for topic, evs in events.items():
            publish(stack.stream_url, topic, evs)
        want = expected_usage(events, None)
        wait_for(lambda: stored_usage(redis_client) == want, "events applied", 30, process=proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        err = proc.stderr.read().decode()
        applied = [orjson.loads(x)["events_applied"] for x in err.splitlines() if "stopped" in x]
        assert len(applied) == 2 and sum(applied) == 1200
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_processes_stopped_while_starting_stop_cleanly(stack, redis_client):
    """SIGTERM right after the start (children still importing): every child stops through its
    handler (logs its stop, exit 0) instead of being killed by the default action."""
    env = dict(
        os.environ,
        REDIS_URL=stack.redis_url,
        STREAM_URL=stack.stream_url,
        HVS_METRICS_PORT="0",
        HVS_POLL_TIMEOUT="0.2",
        WTC_LOG_FORMAT="json",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "hvs", "--processes", "2"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        err = b""
        deadline = time.monotonic() + 30
        while b"hvs consumers started" not in err:  # the children exist, their imports run
            assert time.monotonic() < deadline and proc.poll() is None
            err += proc.stderr.readline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        err += proc.stderr.read()
        assert err.count(b"hvs consumer stopped") == 2, err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kafka_backend_exact_and_republish(stack, redis_client, kafka_url):
    """The same consumer on the Kafka protocol (librdkafka's mock cluster)."""
    suffix = os.urandom(4).hex()
    settings = HvsSettings(
        redis_url=stack.redis_url,
        stream_url=kafka_url,
        metrics_port=0,
        poll_timeout=0.2,
        group=f"hvs-{suffix}",
        data_topic=f"cdr-data-{suffix}",
        voice_topic=f"cdr-voice-{suffix}",
        tick_topic=f"tick-data-{suffix}",
    )
    events = make_events(n_files=1, rows=200, seed=13, start=datetime(2024, 1, 1))
    topics = {"cdr-data": settings.data_topic, "cdr-voice": settings.voice_topic}

    def publish_all(subset: slice) -> None:
        with open_producer(kafka_url) as p:
            for topic, evs in events.items():
                p.publish_many(
                    topics[topic],
                    ((e["msisdn"].encode(), orjson.dumps(e), None) for e in evs[subset]),
                )

    publish_all(slice(None))
    publish_all(slice(0, 50))  # a republished part, before the consumer even starts
    want = expected_usage(events, None)
    stop = threading.Event()
    worker = threading.Thread(target=run, args=(settings, stop))
    worker.start()
    try:
        wait_for(lambda: stored_usage(redis_client) == want, "events applied", 60, interval=0.2)
    finally:
        stop.set()
        worker.join(30)
    assert not worker.is_alive()
    assert stored_usage(redis_client) == want
