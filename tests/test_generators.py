"""The source generators against the data contract (docs/generators.md, shared data contract)."""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import shutil
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta

import psycopg
import pytest

from ingestion.generators.__main__ import main as cli_main
from ingestion.generators.cdr import (
    CALL_TYPES,
    DATA_HEADER,
    DATA_TYPES,
    VOICE_HEADER,
    CdrConfig,
    cdr_files,
    upload_cdr_files,
    write_cdr_files,
)
from ingestion.generators.common import subscriber_pool
from ingestion.generators.crm import (
    DELETE_ACCOUNT,
    DELETE_ACCOUNT_DEVICES,
    DELETE_ADDRESS,
    DELETE_DEVICE,
    DEVICE_OS,
    DEVICE_TYPES,
    MAX_ID,
    MIN_ID,
    STATES,
    UPSERT_ACCOUNT,
    UPSERT_ADDRESS,
    UPSERT_DEVICE,
    CrmConfig,
    crm_transactions,
    run_crm,
)
from ingestion.generators.forex import PAIRS, ForexConfig, publish_ticks, tick_messages
from ingestion.stream import open_consumer

NAME = re.compile(r"^cdr_(data|voice)_(\d{8}_\d{6})\.csv$")
TS_FRACTION = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$")
TS_WHOLE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")
MSISDN = re.compile(r"^\d{13}$")


def small(**overrides: object) -> CdrConfig:
    knobs: dict[str, object] = {
        "subscribers": 300,
        "duration": timedelta(hours=1),
        "rows_per_file": 100,
    }
    knobs.update(overrides)
    return CdrConfig(**knobs)  # type: ignore[arg-type]


def parse(content: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(content.decode("ascii"), newline="")))


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


def window_of(name: str) -> datetime:
    match = NAME.match(name)
    assert match, name
    return datetime.strptime(match.group(2), "%Y%m%d_%H%M%S")


def events(files: list[tuple[str, bytes]]) -> list[tuple[str, datetime, str, datetime]]:
    """(msisdn, event time, tower, window start) for every row of every file."""
    out = []
    for name, content in files:
        for row in parse(content)[1:]:
            out.append((row[0], parse_ts(row[-1]), row[1], window_of(name)))
    return out


# ---------------------------------------------------------------- CDR format


def test_starter_files_match_the_contract_format() -> None:
    config = small()
    files = list(cdr_files(config))
    assert len(files) == 2 * config.windows == 2 * 18
    seen_ts = Counter()
    msisdns: set[str] = set()
    for name, content in files:
        kind = NAME.match(name).group(1)  # type: ignore[union-attr]
        header = DATA_HEADER if kind == "data" else VOICE_HEADER
        assert content.startswith(",".join(header).encode() + b"\r\n")
        assert content.endswith(b"\r\n")
        # CRLF only: every LF is preceded by a CR.
        assert content.count(b"\n") == content.count(b"\r\n") == 1 + config.rows_per_file
        rows = parse(content)
        assert rows[0] == list(header)
        start = window_of(name)
        end = start + timedelta(seconds=config.window_seconds)
        for row in rows[1:]:
            assert len(row) == len(header)
            assert MSISDN.match(row[0])
            msisdns.add(row[0])
            assert 1 <= int(row[1]) <= 2000
            ts = row[-1]
            seen_ts[
                "fraction" if TS_FRACTION.match(ts) else "whole" if TS_WHOLE.match(ts) else ts
            ] += 1
            assert start <= parse_ts(ts) < end
            if kind == "data":
                assert 100_000 <= int(row[2]) <= 1_000_000
                assert 100_000 <= int(row[3]) <= 1_000_000
                assert row[4] in DATA_TYPES
                assert len(row[5].split(".")) == 4
                assert row[6].startswith("http")
            else:
                assert row[2] in CALL_TYPES
                assert MSISDN.match(row[3])
                assert 1 <= int(row[4]) <= 1800
        times = [parse_ts(r[-1]) for r in rows[1:]]
        assert times != sorted(times), "rows inside a file are not in time order"
    assert set(seen_ts) == {"fraction", "whole"}, seen_ts
    assert seen_ts["whole"] < seen_ts["fraction"]
    zeros = sum(m.startswith("0") for m in msisdns)
    assert 0.03 < zeros / len(msisdns) < 0.2
    assert msisdns <= set(subscriber_pool(config.seed, config.subscribers))


def test_file_names_and_windows_follow_the_starter() -> None:
    config = small()
    names = [name for name, _ in cdr_files(config)]
    assert names[:4] == [
        "cdr_data_20240101_000320.csv",
        "cdr_voice_20240101_000320.csv",
        "cdr_data_20240101_000640.csv",
        "cdr_voice_20240101_000640.csv",
    ]
    starts = [window_of(n) for n in names[::2]]
    assert all(b - a == timedelta(seconds=200) for a, b in itertools.pairwise(starts))
    # The full starter run is 864 pairs; the dev run 86 pairs of 1000 s over one day.
    assert CdrConfig().windows == 864
    assert CdrConfig(window_seconds=1000, duration=timedelta(days=1)).windows == 86


def test_scale_knobs() -> None:
    config = small(rows_per_file=7, window_seconds=600, duration=timedelta(hours=2))
    files = list(cdr_files(config))
    assert len(files) == 2 * 12
    assert all(len(parse(c)) == 1 + 7 for _, c in files)
    assert window_of(files[2][0]) - window_of(files[0][0]) == timedelta(minutes=10)
    start = datetime(2024, 3, 1, 12, 0, 0)
    first = next(cdr_files(small(start=start)))
    assert first[0] == "cdr_data_20240301_120000.csv"
    pool = subscriber_pool(0, 10)
    rows = [r for _, c in cdr_files(small(subscribers=10)) for r in parse(c)[1:]]
    assert {r[0] for r in rows} <= set(pool)


def test_same_seed_same_bytes_other_seed_different() -> None:
    for profile in ("starter", "realistic"):
        a = list(cdr_files(small(profile=profile, seed=7)))
        b = list(cdr_files(small(profile=profile, seed=7)))
        c = list(cdr_files(small(profile=profile, seed=8)))
        assert a == b
        assert [n for n, _ in a] == [n for n, _ in c]
        assert all(x != y for (_, x), (_, y) in zip(a, c, strict=True))


def test_subscriber_pool_is_a_function_of_seed_and_count() -> None:
    pool = subscriber_pool(3, 5000)
    assert pool == subscriber_pool(3, 5000)
    assert pool != subscriber_pool(4, 5000)
    assert len(set(pool)) == 5000
    assert all(MSISDN.match(m) for m in pool)
    assert 0.07 < sum(m.startswith("0") for m in pool) / 5000 < 0.13


# ---------------------------------------------------------------- realistic profile


def longest_runs(rows: list[tuple[str, datetime, str, datetime]]) -> dict[str, int]:
    """Longest run of consecutive events (by time) on one tower, per msisdn."""
    by_msisdn: dict[str, list[tuple[datetime, str]]] = defaultdict(list)
    for msisdn, ts, tower, _ in rows:
        by_msisdn[msisdn].append((ts, tower))
    longest = {}
    for msisdn, seq in by_msisdn.items():
        seq.sort()
        best = run = 1
        for (_, prev), (_, cur) in itertools.pairwise(seq):
            run = run + 1 if cur == prev else 1
            best = max(best, run)
        longest[msisdn] = best
    return longest


def test_realistic_profile_has_tower_sessions_and_the_starter_has_almost_none() -> None:
    knobs = {"subscribers": 200, "duration": timedelta(hours=4), "rows_per_file": 100}
    realistic = longest_runs(events(list(cdr_files(small(profile="realistic", **knobs)))))
    starter = longest_runs(events(list(cdr_files(small(profile="starter", **knobs)))))
    with_session = sum(run >= 3 for run in realistic.values())
    assert with_session > 0.5 * len(realistic), (with_session, len(realistic))
    assert sum(run >= 3 for run in starter.values()) < 0.05 * len(starter)


def test_realistic_profile_has_late_rows_in_later_files() -> None:
    config = small(profile="realistic", duration=timedelta(hours=3), rows_per_file=200)
    rows = events(list(cdr_files(config)))
    late = [(ts, window) for _, ts, _, window in rows if ts < window]
    assert 0.005 < len(late) / len(rows) < 0.03
    assert all(window - ts <= timedelta(minutes=30) for ts, window in late)
    assert all(ts >= config.start for ts, _ in late)
    starter = events(list(cdr_files(small(duration=timedelta(hours=3)))))
    assert not [1 for _, ts, _, window in starter if ts < window]


def test_realistic_usage_follows_the_time_of_day() -> None:
    config = small(
        profile="realistic",
        start=datetime(2024, 1, 1),
        duration=timedelta(days=1),
        window_seconds=1800,
        rows_per_file=100,
    )
    rows_by_hour: Counter[int] = Counter()
    for name, content in cdr_files(config):
        rows_by_hour[window_of(name).hour] += len(parse(content)) - 1
    night = sum(rows_by_hour[h] for h in (1, 2, 3, 4))
    evening = sum(rows_by_hour[h] for h in (18, 19, 20, 21))
    assert evening > 5 * night


# ---------------------------------------------------------------- malformed rows


def classify(kind: str, row: list[str]) -> set[str]:
    header = DATA_HEADER if kind == "data" else VOICE_HEADER
    if len(row) != len(header):
        return {"column_count"}
    problems = set()
    try:
        datetime.fromisoformat(row[-1])
    except ValueError:
        problems.add("bad_timestamp")
    if kind == "data":
        if not all(re.fullmatch(r"-?\d+", v) for v in row[2:4]):
            problems.add("non_numeric_bytes")
        elif min(int(row[2]), int(row[3])) < 0:
            problems.add("negative_bytes")
        if row[4] not in DATA_TYPES:
            problems.add("unknown_data_type")
    else:
        if row[2] not in CALL_TYPES:
            problems.add("unknown_call_type")
        if not 1 <= int(row[4]) <= 1800:
            problems.add("absurd_duration")
    return problems


def malformed_kinds(config: CdrConfig) -> Counter[str]:
    found: Counter[str] = Counter()
    for name, content in cdr_files(config):
        kind = NAME.match(name).group(1)  # type: ignore[union-attr]
        for row in parse(content)[1:]:
            found.update(f"{kind}:{p}" for p in classify(kind, row))
    return found


def test_malformed_option_produces_every_kind_and_the_default_none() -> None:
    found = malformed_kinds(small(malformed_rate=0.05))
    assert set(found) == {
        "data:column_count",
        "data:non_numeric_bytes",
        "data:bad_timestamp",
        "data:unknown_data_type",
        "data:negative_bytes",
        "voice:column_count",
        "voice:bad_timestamp",
        "voice:unknown_call_type",
        "voice:absurd_duration",
    }
    total = sum(found.values())
    assert 0.02 < total / (2 * 18 * 100) < 0.09
    for profile in ("starter", "realistic"):
        assert not malformed_kinds(small(profile=profile))


# ---------------------------------------------------------------- writing and uploading


def test_write_cdr_files_writes_final_names(tmp_path) -> None:
    config = small(duration=timedelta(minutes=10))
    paths = write_cdr_files(config, tmp_path / "cdr")
    expected = list(cdr_files(config))
    assert [p.name for p in paths] == [n for n, _ in expected]
    assert [p.read_bytes() for p in paths] == [c for _, c in expected]
    assert sorted(p.name for p in (tmp_path / "cdr").iterdir()) == sorted(n for n, _ in expected)


def test_upload_cdr_files_over_sftp(stack) -> None:
    config = small(duration=timedelta(minutes=10), seed=11)
    expected = dict(cdr_files(config))
    try:
        remote = upload_cdr_files(config, stack.sftp_url)
        assert sorted(r.rsplit("/", 1)[-1] for r in remote) == sorted(expected)
        for name, content in expected.items():
            assert (stack.cdr_dir / name).read_bytes() == content
    finally:  # the SFTP directory is shared with the CDR loader's tests
        for name in expected:
            (stack.cdr_dir / name).unlink(missing_ok=True)


@pytest.mark.parametrize("bad", [{"rows_per_file": 0}, {"duration": timedelta(seconds=10)}])
def test_bad_knobs_get_a_clear_error(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        small(**bad)


# ---------------------------------------------------------------- CRM


def replay(config: CrmConfig) -> tuple[dict, dict, dict]:
    """The final CRM tables the transactions should leave, computed without SQL."""
    accounts: dict[int, tuple] = {}
    addresses: dict[int, tuple] = {}
    devices: dict[int, tuple] = {}
    for tx in crm_transactions(config):
        for sql, params in tx.statements:
            if sql == UPSERT_ACCOUNT:
                accounts[params[0]] = params
            elif sql == UPSERT_ADDRESS:
                addresses[params[0]] = params
            elif sql == UPSERT_DEVICE:
                old = devices.get(params[0])
                devices[params[0]] = params if old is None else (params[0], old[1], *params[2:])
            elif sql == DELETE_ACCOUNT:
                accounts.pop(params[0], None)
            elif sql == DELETE_ADDRESS:
                addresses.pop(params[0], None)
            elif sql == DELETE_ACCOUNT_DEVICES:
                for device_id in [d for d, row in devices.items() if row[1] == params[0]]:
                    del devices[device_id]
            elif sql == DELETE_DEVICE:
                devices.pop(params[0], None)
            else:
                raise AssertionError(sql)
    return accounts, addresses, devices


@pytest.fixture
def prod(stack) -> Iterator[psycopg.Connection]:
    """A connection to `wtc_prod` whose CRM tables start (and are left) empty."""
    tables = "crm_system.accounts, crm_system.addresses, crm_system.devices"
    with psycopg.connect(stack.prod_dsn, autocommit=True) as conn:
        conn.execute(f"truncate {tables}")
        yield conn
        conn.execute(f"truncate {tables}")


def fetch(conn: psycopg.Connection, table: str, key: str) -> dict:
    rows = conn.execute(f"select * from crm_system.{table} order by {key}").fetchall()
    return {row[0]: tuple(row) for row in rows}


def test_crm_starter_upserts_against_postgres(stack, prod) -> None:
    config = CrmConfig(seed=5, subscribers=400, transactions=2000)
    stats = run_crm(config, stack.prod_dsn)
    assert stats.transactions == stats.upserts == 2000
    assert stats.account_deletes == stats.device_deletes == 0
    accounts, addresses, devices = replay(config)
    assert fetch(prod, "accounts", "account_id") == accounts
    assert fetch(prod, "addresses", "account_id") == addresses
    assert fetch(prod, "devices", "device_id") == devices
    # Ids repeat, so some transactions were updates; 2000 draws from 90 000 ids.
    assert 1900 < len(accounts) < 2000
    assert all(MIN_ID <= a <= MAX_ID for a in accounts)
    # A device update keeps its old account_id.
    written_with = {}
    for tx in crm_transactions(config):
        device = tx.statements[2][1]
        written_with.setdefault(device[0], []).append(device[1])
    kept_old = [d for d, ids in written_with.items() if len(ids) > 1 and ids[-1] != ids[0]]
    assert kept_old
    assert all(devices[d][1] == written_with[d][0] for d in kept_old)
    # Values from the contract's sets; phone numbers from the CDR subscriber pool.
    pool = set(subscriber_pool(5, 400))
    assert {row[3] for row in accounts.values()} <= pool
    assert len({row[3] for row in accounts.values()}) < len(accounts)  # shared numbers
    assert {row[3] for row in addresses.values()} <= set(STATES)
    assert {row[5] for row in addresses.values()} == {"ZAR"}
    assert {row[3] for row in devices.values()} <= set(DEVICE_TYPES)
    assert {row[4] for row in devices.values()} <= set(DEVICE_OS)
    # The simulated clock: starts 2024-01-01 00:00 and advances about 1 s per statement.
    first, last = prod.execute(
        "select min(modified_ts), max(modified_ts) from ("
        " select modified_ts from crm_system.accounts union all"
        " select modified_ts from crm_system.devices) t"
    ).fetchone()
    assert first < datetime(2024, 1, 1, 1)
    assert timedelta(seconds=6000) < last - datetime(2024, 1, 1) < timedelta(seconds=7800)
    # Each CRM transaction committed on its own: an account and its address share a
    # transaction id, and no two accounts do.
    xids = prod.execute(
        "select a.xmin::text, d.xmin::text from crm_system.accounts a"
        " join crm_system.addresses d using (account_id)"
    ).fetchall()
    assert all(a == b for a, b in xids)
    assert len({a for a, _ in xids}) == len(accounts)


def test_crm_realistic_deletes_against_postgres(stack, prod) -> None:
    config = CrmConfig(profile="realistic", seed=6, subscribers=400, transactions=1500)
    stats = run_crm(config, stack.prod_dsn)
    assert stats.account_deletes > 10 and stats.device_deletes > 10
    assert stats.upserts + stats.account_deletes + stats.device_deletes == 1500
    accounts, addresses, devices = replay(config)
    assert fetch(prod, "accounts", "account_id") == accounts
    assert fetch(prod, "addresses", "account_id") == addresses
    assert fetch(prod, "devices", "device_id") == devices
    upserted = {tx.statements[0][1][0] for tx in crm_transactions(config) if tx.kind == "upsert"}
    assert len(accounts) < len(upserted)


def test_crm_is_deterministic_by_seed() -> None:
    def plan(seed: int) -> list:
        return list(crm_transactions(CrmConfig(seed=seed, subscribers=100, transactions=200)))

    assert plan(1) == plan(1)
    assert plan(1) != plan(2)


# ---------------------------------------------------------------- forex

VALUE = re.compile(
    r'^\{"timestamp": "(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6})", "pair_name": "(MRVZAR|WAKMRV)", '
    r'"bid_price": (\d\.\d{1,4}), "ask_price": (\d\.\d{1,4}), "spread": (0\.\d{1,4})\}$'
)


def test_tick_messages_match_the_contract() -> None:
    config = ForexConfig(seed=3, duration=timedelta(minutes=10))
    messages = list(tick_messages(config))
    # 10 minutes at one step per 500 ms on average, two pairs per step.
    assert 2280 < len(messages) < 2520
    steps: list[datetime] = []
    for i, (key, value) in enumerate(messages):
        match = VALUE.match(value.decode())
        assert match, value
        ts_text, pair, bid, ask, spread = match.groups()
        assert pair == PAIRS[i % 2]
        ts = datetime.strptime(ts_text, "%Y-%m-%d %H:%M:%S.%f")
        assert key == f'"{pair}-{ts:%Y-%m-%d %H:%M}"'.encode()
        assert json.loads(key) == f"{pair}-{ts_text[:16]}"
        assert 1.0 <= float(bid) <= 2.0
        assert 0.01 <= float(spread) <= 0.05
        assert float(ask) == round(float(bid) + float(spread), 4)
        record = json.loads(value)
        assert list(record) == ["timestamp", "pair_name", "bid_price", "ask_price", "spread"]
        if i % 2:
            assert ts == steps[-1], "both pairs of a step share the timestamp"
        else:
            steps.append(ts)
    assert steps[0] > config.start
    gaps = [(b - a) / timedelta(milliseconds=1) for a, b in itertools.pairwise(steps)]
    assert min(gaps) >= 400 and max(gaps) <= 600
    assert 480 < sum(gaps) / len(gaps) < 520
    assert steps[-1] < config.start + config.duration
    # Prices are independent draws in the starter profile.
    bids = [json.loads(v)["bid_price"] for _, v in messages[::2]]
    jumps = [abs(b - a) for a, b in itertools.pairwise(bids)]
    assert 0.25 < sum(jumps) / len(jumps) < 0.42  # E|U1 - U2| = 1/3 for independent draws


def test_tick_messages_deterministic_by_seed_and_profiles_differ() -> None:
    def run(**knobs: object) -> list[tuple[bytes, bytes]]:
        return list(tick_messages(ForexConfig(duration=timedelta(minutes=1), **knobs)))

    assert run(seed=1) == run(seed=1)
    assert run(seed=1) != run(seed=2)
    walk = [json.loads(v)["bid_price"] for _, v in run(seed=1, profile="realistic")[::2]]
    assert max(abs(b - a) for a, b in itertools.pairwise(walk)) < 0.02
    assert not [v for _, v in run(seed=1) if not VALUE.match(v.decode())]
    bad = [v for _, v in run(seed=1, malformed_rate=0.2) if not VALUE.match(v.decode())]
    assert 0.1 * 240 < len(bad) < 0.3 * 240


def test_publish_ticks_through_redis_streams(stack) -> None:
    config = ForexConfig(seed=4, duration=timedelta(minutes=2))
    topic = f"tick-data-test-{uuid.uuid4().hex[:8]}"
    published = publish_ticks(config, stack.stream_url, topic=topic, batch=100)
    expected = list(tick_messages(config))
    assert published == len(expected)
    received: list[tuple[bytes | None, bytes]] = []
    deadline = time.monotonic() + 30
    with open_consumer(stack.stream_url, [topic], "generator-test") as consumer:
        while len(received) < len(expected) and time.monotonic() < deadline:
            batch = consumer.poll(max_messages=1000, timeout=0.5)
            received.extend((m.key, m.value) for m in batch)
            consumer.commit(batch)
    assert received == expected


# ---------------------------------------------------------------- pace and command line


def test_realtime_pace_gives_the_same_output() -> None:
    fast = list(cdr_files(small(duration=timedelta(minutes=10))))
    paced = list(cdr_files(small(duration=timedelta(minutes=10), pace="realtime", speed=1e6)))
    assert paced == fast
    ticks = ForexConfig(duration=timedelta(seconds=30))
    assert list(tick_messages(ticks)) == list(
        tick_messages(ForexConfig(duration=timedelta(seconds=30), pace="realtime", speed=1e6))
    )


@pytest.mark.parametrize("source", ["cdr", "crm", "forex"])
def test_cli_help(source: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main([source, "--help"])
    assert exit_info.value.code == 0


def test_cli_runs_each_source(stack, prod, tmp_path, capsys) -> None:
    out = tmp_path / "cdr"
    assert cli_main(["cdr", "--hours", "0.5", "--rows-per-file", "20", "--out", str(out)]) == 0
    assert len(list(out.iterdir())) == 2 * 9
    assert json.loads(capsys.readouterr().out)["files"] == 18

    remote = f"cli-{uuid.uuid4().hex[:6]}"
    args = ["cdr", "--hours", "0.2", "--rows-per-file", "5", "--sftp-url", stack.sftp_url]
    try:
        assert cli_main([*args, "--remote-dir", remote, "--profile", "realistic"]) == 0
        assert len(list((stack.cdr_dir / remote).iterdir())) == 2 * 3
    finally:
        shutil.rmtree(stack.cdr_dir / remote, ignore_errors=True)
    capsys.readouterr()

    args = ["crm", "--transactions", "50", "--subscribers", "100", "--dsn", stack.prod_dsn]
    assert cli_main(args) == 0
    assert json.loads(capsys.readouterr().out)["transactions"] == 50
    assert prod.execute("select count(*) from crm_system.accounts").fetchone()[0] == 50

    topic = f"tick-cli-{uuid.uuid4().hex[:6]}"
    args = ["forex", "--hours", "0.01", "--stream-url", stack.stream_url, "--topic", topic]
    assert cli_main(args) == 0
    published = json.loads(capsys.readouterr().out)["messages"]
    assert published == len(list(tick_messages(ForexConfig(duration=timedelta(hours=0.01)))))

    assert cli_main(["cdr", "--hours", "0.01", "--out", str(out)]) == 2  # shorter than a window
