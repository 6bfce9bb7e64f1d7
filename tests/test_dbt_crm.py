"""The CRM marts against their macros_py oracles on generated data.

CRM transactions (the generator, plus hand-written ones: a number moving between accounts, a
deleted account, a device pointing at an account that changed) go through the real CDC reader
into the change log; CDR files through the CDR loader; ticks into forex_data.ticks. Then:
the history equals `macros_py.crm_history`, the current-state views equal
`wtc_prod.crm_system`, and `crm_balance_hourly` equals `macros_py.balance` row for row, after a
full build, after an incremental run on new, late and re-attributing data, and after a full
refresh (which also equals the incremental result).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from ingestion.crm_cdc import CdcSettings, CrmCdc, Metrics
from ingestion.generators.cdr import CdrConfig, cdr_files
from ingestion.generators.common import Profile
from ingestion.generators.crm import CrmConfig, run_crm
from ingestion.generators.forex import ForexConfig, tick_messages
from macros_py.balance import (
    AccountIndex,
    AccountVersion,
    DeviceIndex,
    DeviceVersion,
    balance_rows,
    hourly_usage,
)
from macros_py.crm_history import Change, Version, history, version_at
from macros_py.currency import RateLookup, fx_rates_hourly
from macros_py.indicators import Tick
from macros_py.records import DataRecord, VoiceRecord
from tests.fixtures.dbt import DbtProject, land_cdr_files, truncate_cdr

T0 = datetime(2024, 1, 1)
SEED = 0
SUBSCRIBERS = 120
TABLES = {
    "accounts": ("account_id", ("owner_name", "email", "phone_number")),
    "addresses": ("account_id", ("street_address", "city", "state", "postal_code", "country")),
    "devices": ("device_id", ("account_id", "device_name", "device_type", "device_os")),
}
HISTORY = [f"crm_{t}_history" for t in TABLES]
CURRENT = [f"crm_{t}" for t in TABLES]
SELECT = ["--select", "+crm_balance_hourly", *CURRENT, "--indirect-selection", "cautious"]
BOOKKEEPING = (
    "cdr_loaded_through",
    "crm_landed_through",
    "rates_landed_through",
    "computed_at",
)
BALANCE_COLUMNS = (
    "account_id, hour_start, owner_name, email, phone_number, street_address, city, state, "
    "postal_code, country, device_id, device_name, device_type, device_os, device_count, "
    "call_seconds, data_bytes, cost_zar, zar_per_wak, cost_wak, balance_wak, last_event_ts"
)
# No lookback: every run of the test sees exactly the rows landed since the one before.
NO_LOOKBACK = ["--vars", json.dumps({"landing_lookback": "0 seconds", "crm_lookback": "0 seconds"})]


# -- landing ---------------------------------------------------------------------------------------


def land_ticks(conn: psycopg.Connection, start: datetime, hours: float, seed: int) -> None:
    config = ForexConfig(seed=seed, start=start, duration=timedelta(hours=hours))
    with conn.cursor().copy(
        "copy forex_data.ticks (pair_name, tick_ts, bid_price, ask_price, spread, source) "
        "from stdin"
    ) as copy:
        for _key, value in tick_messages(config):
            t = json.loads(value, parse_float=Decimal)
            copy.write_row(
                (t["pair_name"], t["timestamp"], t["bid_price"], t["ask_price"], t["spread"], "t")
            )


def land_cdr(conn: psycopg.Connection, start: datetime, hours: float) -> None:
    config = CdrConfig(
        profile=Profile.REALISTIC,
        seed=SEED,
        subscribers=SUBSCRIBERS,
        start=start,
        duration=timedelta(hours=hours),
        rows_per_file=60,
        late_rate=0.05,
    )
    land_cdr_files(conn, cdr_files(config))


def crm_statements(prod: psycopg.Connection, statements: list[tuple[str, tuple]]) -> None:
    with prod.transaction():
        for sql, params in statements:
            prod.execute(sql, params)


def account_ids(prod: psycopg.Connection) -> list[tuple[int, str]]:
    return prod.execute(
        "select account_id, phone_number from crm_system.accounts order by account_id"
    ).fetchall()


# -- oracle ----------------------------------------------------------------------------------------


def change_log(conn: psycopg.Connection) -> dict[str, list[Change]]:
    logs = {}
    for table, (key, columns) in TABLES.items():
        logs[table] = [
            Change(r[0], r[1], r[2], r[3], tuple(r[4:]))
            for r in conn.execute(
                f"select {key}, __op, __lsn, modified_ts, {', '.join(columns)} "
                f"from crm_data.{table}_changes"
            )
        ]
    return logs


def history_rows(versions: list[Version]) -> list[tuple]:
    return sorted(
        (v.key, v.version_lsn, v.valid_from, v.valid_to, v.is_current, *v.values) for v in versions
    )


def records(conn: psycopg.Connection) -> list[DataRecord | VoiceRecord]:
    data = [
        DataRecord(*r)
        for r in conn.execute(
            "select msisdn, tower_id, up_bytes, down_bytes, data_type, event_datetime, "
            "source_file, line_no from cdr_data.data_records"
        )
    ]
    voice = [
        VoiceRecord(*r)
        for r in conn.execute(
            "select msisdn, tower_id, call_type, call_duration_sec, start_time, source_file, "
            "line_no from cdr_data.voice_records"
        )
    ]
    return [*data, *voice]


def expected_balance(conn: psycopg.Connection, hist: dict[str, list[Version]]) -> list[tuple]:
    """crm_balance_hourly by the oracle: balance.py for the numbers, crm_history for the info."""
    accounts = AccountIndex(
        AccountVersion(v.key, v.values[2], v.valid_from, v.valid_to) for v in hist["accounts"]
    )
    devices = DeviceIndex(
        DeviceVersion(v.key, v.values[0], v.valid_from, v.valid_to) for v in hist["devices"]
    )
    device_values = {(v.key, v.version_lsn): v.values for v in hist["devices"]}
    device_lsn = {(v.key, v.valid_from, v.valid_to, v.values[0]): v.version_lsn
                  for v in hist["devices"]}  # fmt: skip
    by_key: dict[str, dict[int, list[Version]]] = {}
    for table in ("accounts", "addresses"):
        for v in hist[table]:
            by_key.setdefault(table, {}).setdefault(v.key, []).append(v)
    ticks = [
        Tick(*r)
        for r in conn.execute(
            "select pair_name, tick_ts, bid_price, ask_price from forex_data.ticks"
        )
    ]
    usage = hourly_usage(records(conn), accounts)
    rates = RateLookup(fx_rates_hourly(ticks))
    rows = balance_rows(usage, rates)
    out = []
    for u, b in zip(usage, rows, strict=True):
        assert (u.account_id, u.hour_start) == (b.account_id, b.hour_start)
        ts = u.last_event_ts
        account = version_at(by_key["accounts"].get(u.account_id, []), ts)
        address = version_at(by_key["addresses"].get(u.account_id, []), ts)
        valid_devices = devices.devices_at(u.account_id, ts)
        shown = valid_devices[0] if valid_devices else None
        if shown is not None:
            lsn = device_lsn[(shown.device_id, shown.valid_from, shown.valid_to, shown.account_id)]
            device = (shown.device_id, *device_values[(shown.device_id, lsn)][1:])
        else:
            device = (None, None, None, None)
        rate = rates.as_of(u.hour_start)
        out.append(
            (
                b.account_id,
                b.hour_start,
                *(account.values if account else (None, None, None)),
                *(address.values if address else (None,) * 5),
                *device,
                len(valid_devices),
                b.call_seconds,
                b.data_bytes,
                b.cost_zar,
                rate.zar_per_wak if rate else None,
                b.cost_wak,
                b.balance_wak,
                ts,
            )
        )
    return out


def stored_balance(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(
        f"select {BALANCE_COLUMNS} from prepared_layers.crm_balance_hourly "
        "order by account_id, hour_start"
    ).fetchall()


def assert_marts_equal_oracle(conn: psycopg.Connection, prod: psycopg.Connection) -> list[tuple]:
    hist = history(change_log(conn))
    for table, (key, columns) in TABLES.items():
        got = conn.execute(
            f"select {key}, version_lsn, valid_from, valid_to, is_current, {', '.join(columns)} "
            f"from prepared_layers.crm_{table}_history order by 1, 2"
        ).fetchall()
        assert got == history_rows(hist[table]), table
        cols = f"{key}, {', '.join(columns)}, modified_ts"
        current = conn.execute(
            f"select {cols} from prepared_layers.crm_{table} order by 1"
        ).fetchall()
        source = prod.execute(f"select {cols} from crm_system.{table} order by 1").fetchall()
        assert current == source, table
    got = stored_balance(conn)
    expected = expected_balance(conn, hist)
    assert len(got) == len(expected)
    assert got == expected
    return got


# -- scenario --------------------------------------------------------------------------------------

UPSERT_ACCOUNT = (
    "insert into crm_system.accounts (account_id, owner_name, email, phone_number, modified_ts) "
    "values (%s, %s, %s, %s, %s) on conflict (account_id) do update set "
    "owner_name = excluded.owner_name, email = excluded.email, "
    "phone_number = excluded.phone_number, modified_ts = excluded.modified_ts"
)
UPDATE_ADDRESS = "update crm_system.addresses set city = %s, modified_ts = %s where account_id = %s"
UPSERT_DEVICE = (
    "insert into crm_system.devices (device_id, account_id, device_name, device_type, device_os, "
    "modified_ts) values (%s, %s, %s, %s, %s, %s) on conflict (device_id) do update set "
    "device_name = excluded.device_name, modified_ts = excluded.modified_ts"
)


@pytest.fixture(scope="module")
def scenario(stack, dbt_project: DbtProject) -> Iterator[dict]:
    settings = CdcSettings(
        analytics_dsn=stack.analytics_dsn,
        prod_dsn=stack.prod_dsn,
        slot="wtc_test_dbt_crm",
        publication="wtc_test_dbt_crm",
        metrics_port=0,
    )
    with (
        psycopg.connect(stack.analytics_dsn, autocommit=True) as conn,
        psycopg.connect(stack.prod_dsn, autocommit=True) as prod,
    ):
        truncate_cdr(conn)
        conn.execute(
            "truncate forex_data.ticks, crm_data.accounts_changes, crm_data.addresses_changes, "
            "crm_data.devices_changes"
        )
        prod.execute("truncate crm_system.accounts, crm_system.addresses, crm_system.devices")
        out: dict = {}
        cdc = CrmCdc(settings, Metrics())
        try:
            # -- step 1: a CRM snapshot and changes, 3 hours of CDR, ticks from hour 1 only
            crm = CrmConfig(
                profile=Profile.REALISTIC, seed=SEED, subscribers=SUBSCRIBERS, transactions=150,
                start=T0, delete_rate=0.1,
            )  # fmt: skip
            run_crm(crm, stack.prod_dsn)
            cdc.run(once=True)  # the snapshot: `r` rows
            run_crm(
                CrmConfig(
                    profile=Profile.REALISTIC, seed=SEED, subscribers=SUBSCRIBERS,
                    transactions=100, start=T0 + timedelta(minutes=20), delete_rate=0.2,
                ),
                stack.prod_dsn,
            )  # fmt: skip
            cdc.run(once=True)
            land_cdr(conn, T0 + timedelta(seconds=200), hours=2.5)
            land_ticks(conn, T0 + timedelta(hours=1), hours=1.2, seed=1)
            # Unit tests of the incremental path read the columns of the built model.
            dbt_project.run("run", "--empty", *SELECT)
            out["full_build"] = dbt_project.run("build", "--full-refresh", *SELECT)
            out["step1"] = assert_marts_equal_oracle(conn, prod)

            # -- step 2: re-attribution in the past, a deleted account, late and new CDR rows,
            # late and new ticks
            # accounts with usage in hour 2 (after the changes below, at 01:30)
            phones = dict(account_ids(prod))
            late = sorted({r[0] for r in out["step1"] if r[1].hour == 2 and r[0] in phones})
            with_device = {a for (a,) in prod.execute("select account_id from crm_system.devices")}
            a1 = next(a for a in late if a in with_device)
            a2, a3 = [a for a in late if a != a1][:2]
            phone1 = phones[a1]
            at = T0 + timedelta(hours=1, minutes=30)
            out["moved_phone"], out["deleted"] = phone1, a2
            crm_statements(
                prod,
                [
                    # a new account takes a1's number, then a1 gets another number
                    (UPSERT_ACCOUNT, (5, "New Holder", "new@example.com", phone1, at)),
                    (
                        UPSERT_ACCOUNT,
                        (
                            a1,
                            "Old Holder",
                            "old@example.com",
                            "0000000000001",
                            at + timedelta(seconds=1),
                        ),
                    ),
                ],
            )
            crm_statements(prod, [(UPDATE_ADDRESS, ("Elsewhere", at + timedelta(seconds=2), a3))])
            # a new device for a3; an update of a device of a1 names account 5 but keeps a1
            # (the CRM's upsert does not change account_id); then a2 is deleted
            (kept,) = prod.execute(
                "select min(device_id) from crm_system.devices where account_id = %s",
                (a1,),
            ).fetchone()
            out["kept_device"] = (kept, a1)
            crm_statements(
                prod,
                [
                    (
                        UPSERT_DEVICE,
                        (6, a3, "Pixel 8", "Mobile", "Android", at + timedelta(seconds=3)),
                    ),
                    (
                        UPSERT_DEVICE,
                        (kept, 5, "iPad Air", "Tablet", "iOS", at + timedelta(seconds=4)),
                    ),
                ],
            )
            crm_statements(
                prod,
                [
                    ("delete from crm_system.accounts where account_id = %s", (a2,)),
                    ("delete from crm_system.addresses where account_id = %s", (a2,)),
                    ("delete from crm_system.devices where account_id = %s", (a2,)),
                ],
            )
            cdc.run(once=True)
            land_cdr(conn, T0 + timedelta(hours=1, minutes=50, seconds=10), hours=1.5)
            land_ticks(conn, T0 + timedelta(hours=3), hours=0.6, seed=2)
            conn.execute(
                "insert into forex_data.ticks (pair_name, tick_ts, bid_price, ask_price, spread, "
                "source) values ('MRVZAR', '2024-01-01 01:20:00.000001', 1.9, 1.95, 0.05, 'late')"
            )
            out["incremental_build"] = dbt_project.run("build", *NO_LOOKBACK, *SELECT)
            out["step2"] = assert_marts_equal_oracle(conn, prod)
            out["bookkeeping"] = conn.execute(
                "select count(*) filter (where crm_landed_through < max_crm), count(*) from ("
                "select crm_landed_through, max(crm_landed_through) over () as max_crm "
                "from prepared_layers.crm_balance_hourly) b"
            ).fetchone()
            out["incremental"] = {m: snapshot(conn, m) for m in [*HISTORY, "crm_balance_hourly"]}
            dbt_project.run("run", "--full-refresh", *SELECT)
            out["refreshed"] = {m: snapshot(conn, m) for m in [*HISTORY, "crm_balance_hourly"]}
            assert_marts_equal_oracle(conn, prod)
            yield out
        finally:
            cdc.drop()
            cdc.close()


def snapshot(conn: psycopg.Connection, mart: str) -> list[tuple]:
    columns = [
        c
        for (c,) in conn.execute(
            "select column_name from information_schema.columns where table_schema = "
            "'prepared_layers' and table_name = %s order by ordinal_position",
            (mart,),
        )
        if c not in BOOKKEEPING
    ]
    order = ", ".join(str(i) for i in range(1, len(columns) + 1))
    return conn.execute(
        f"select {', '.join(columns)} from prepared_layers.{mart} order by {order}"
    ).fetchall()


def test_full_build_runs_every_data_and_unit_test(scenario) -> None:
    log = scenario["full_build"].stdout
    assert "Completed successfully" in log
    for name in ("unit_test", "crm_balance_hourly", "crm_accounts_history"):
        assert name in log


def test_marts_equal_the_oracle_after_the_full_build(scenario) -> None:
    rows = scenario["step1"]
    assert len(rows) > 50
    assert any(r[18] is None for r in rows), "usage before the first rate: no cost_wak"
    assert any(r[18] is not None for r in rows)


def test_incremental_run_rebuilt_only_the_tail_and_matches_the_oracle(scenario) -> None:
    assert "Completed successfully" in scenario["incremental_build"].stdout
    kept, total = scenario["bookkeeping"]
    assert 0 < kept < total, "rows before the rebuild cutoff are kept as they were"
    before = {(r[0], r[1]) for r in scenario["step1"]}
    after = {(r[0], r[1]) for r in scenario["step2"]}
    deleted = scenario["deleted"]
    # the deleted account had usage in hour 2; after its delete (01:30) it has none
    assert (deleted, datetime(2024, 1, 1, 2)) in before
    assert not any(a == deleted and h.hour >= 2 for a, h in after)
    # the moved number's events from 01:30 on belong to the new account (id 5)
    assert any(a == 5 for a, _ in after)


def test_a_device_update_keeps_its_old_account(scenario, stack) -> None:
    device_id, account_id = scenario["kept_device"]
    with psycopg.connect(stack.analytics_dsn) as conn:
        versions = conn.execute(
            "select account_id, device_name, is_current from prepared_layers.crm_devices_history "
            "where device_id = %s order by version_lsn",
            (device_id,),
        ).fetchall()
    assert versions[-1] == (account_id, "iPad Air", True)


def test_incremental_equals_full_refresh(scenario) -> None:
    for mart, rows in scenario["incremental"].items():
        assert rows, mart
        assert rows == scenario["refreshed"][mart], mart
