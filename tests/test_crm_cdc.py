"""CRM change data capture: the pgoutput decoder, a snapshot then inserts, updates and deletes,
the change log rebuilt equals the source, kills at the two dangerous points and reruns, the
follow mode with metrics and SIGTERM, and the CRM generator's realistic mix."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import psycopg
import pytest

from common.service import CRASH_EXIT_CODE
from ingestion import pgoutput as po
from ingestion.crm_cdc import CdcSettings, CrmCdc, Metrics, RunStats
from ops.stack import free_port
from tests.fixtures.polling import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TABLES = {
    "accounts": (
        "account_id",
        ("account_id", "owner_name", "email", "phone_number", "modified_ts"),
    ),
    "addresses": (
        "account_id",
        ("account_id", "street_address", "city", "state", "postal_code", "country", "modified_ts"),
    ),
    "devices": (
        "device_id",
        ("device_id", "account_id", "device_name", "device_type", "device_os", "modified_ts"),
    ),
}


# ------------------------------------------------------------------------------- decoder (pure)


def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def _tuple(*values: str | None) -> bytes:
    out = struct.pack("!h", len(values))
    for v in values:
        out += b"n" if v is None else b"t" + struct.pack("!i", len(v.encode())) + v.encode()
    return out


def test_decode_messages() -> None:
    begin = po.decode(b"B" + struct.pack("!QqI", 0x1D83850, 848644593187998, 731))
    assert begin == po.Begin(0x1D83850, 848644593187998, 731)
    assert begin.commit_ts_ms == 848644593187 + po.PG_EPOCH_MS
    assert datetime.fromtimestamp(begin.commit_ts_ms / 1000, UTC).year == 2026
    commit = po.decode(b"C" + struct.pack("!bQQq", 0, 0x10, 0x20, 5))
    assert commit == po.Commit(0, 0x10, 0x20, 5)
    rel = po.decode(
        b"R"
        + struct.pack("!I", 16387)
        + _s("crm_system")
        + _s("accounts")
        + b"d"
        + struct.pack("!h", 2)
        + struct.pack("!b", 1)
        + _s("account_id")
        + struct.pack("!Ii", 23, -1)
        + struct.pack("!b", 0)
        + _s("email")
        + struct.pack("!Ii", 1043, 104)
    )
    assert isinstance(rel, po.Relation)
    assert rel.qualified_name == "crm_system.accounts"
    assert rel.key_columns == ("account_id",)
    ins = po.decode(b"I" + struct.pack("!I", 16387) + b"N" + _tuple("7", "a@b"))
    assert ins == po.Insert(16387, ("7", "a@b"))
    upd = po.decode(
        b"U" + struct.pack("!I", 1) + b"K" + _tuple("7", None) + b"N" + _tuple("8", "x")
    )
    assert upd == po.Update(1, ("7", None), "K", ("8", "x"))
    plain = po.decode(b"U" + struct.pack("!I", 1) + b"N" + _tuple("8", None))
    assert plain == po.Update(1, None, None, ("8", None))
    dele = po.decode(b"D" + struct.pack("!I", 1) + b"K" + _tuple("8", None))
    assert dele == po.Delete(1, ("8", None), "K")
    toast = po.decode(b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!h", 1) + b"u")
    assert toast == po.Insert(1, (po.UNCHANGED,))
    assert po.lsn_to_int("16/B374D848") == 0x16B374D848
    assert po.int_to_lsn(0x16B374D848) == "16/B374D848"


@pytest.mark.parametrize(
    "data",
    [b"", b"Z", b"B\0\0", b"I" + struct.pack("!I", 1) + b"X", b"C" + b"\0" * 26 + b"extra"],
)
def test_decode_rejects_garbage(data: bytes) -> None:
    with pytest.raises(po.DecodeError):
        po.decode(data)


# ------------------------------------------------------------------------------- with Postgres


@dataclass
class Crm:
    prod: psycopg.Connection
    analytics: psycopg.Connection
    settings: CdcSettings

    def run(self, **kw) -> RunStats:
        with CrmCdc(self.settings.model_copy(update=kw), Metrics()) as cdc:
            return cdc.run(once=True)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            WTC_ANALYTICS_DSN=self.settings.analytics_dsn,
            WTC_PROD_DSN=self.settings.prod_dsn,
            CRM_CDC_SLOT=self.settings.slot,
            CRM_CDC_PUBLICATION=self.settings.publication,
            CRM_CDC_POLL_INTERVAL="0.2",
            WTC_LOG_FORMAT="json",
            **extra,
        )
        return env

    def slot_confirmed(self) -> str | None:
        row = self.prod.execute(
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = %s",
            (self.settings.slot,),
        ).fetchone()
        return row[0] if row else None

    def pending_changes(self) -> int:
        (n,) = self.prod.execute(
            "select count(*) from pg_logical_slot_peek_binary_changes(%s, null, null, "
            "'proto_version', '1', 'publication_names', %s)",
            (self.settings.slot, self.settings.publication),
        ).fetchone()
        return n

    def changes(self, table: str) -> list[tuple]:
        key, cols = TABLES[table]
        return self.analytics.execute(
            f"select {', '.join(cols)}, __op, __lsn, __source_ts_ms "
            f"from crm_data.{table}_changes order by {key}, __op <> 'r', __lsn"
        ).fetchall()

    def count(self) -> int:
        return sum(
            self.analytics.execute(f"select count(*) from crm_data.{t}_changes").fetchone()[0]
            for t in TABLES
        )

    def assert_rebuilt_equals_source(self) -> None:
        """The latest row per key (snapshot rows first, then changes by LSN), deletes dropped,
        equals the source table row for row, both ways."""
        for table, (key, cols) in TABLES.items():
            col_list = ", ".join(cols)
            rebuilt = self.analytics.execute(
                f"select {col_list} from ("
                f"  select distinct on ({key}) * from crm_data.{table}_changes"
                f"  order by {key}, __op <> 'r' desc, __lsn desc"
                f") latest where __op <> 'd'"
            ).fetchall()
            source = self.prod.execute(f"select {col_list} from crm_system.{table}").fetchall()
            assert len(rebuilt) == len(set(rebuilt))
            assert set(rebuilt) - set(source) == set(), table
            assert set(source) - set(rebuilt) == set(), table
            assert len(rebuilt) == len(source)


@pytest.fixture
def crm(stack, analytics) -> Iterator[Crm]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    settings = CdcSettings(
        analytics_dsn=stack.analytics_dsn,
        prod_dsn=stack.prod_dsn,
        slot=name,
        publication=name,
        batch_changes=50,  # several batches per run
        metrics_port=0,
    )
    with psycopg.connect(stack.prod_dsn, autocommit=True) as prod:
        prod.execute("truncate crm_system.accounts, crm_system.addresses, crm_system.devices")
        try:
            yield Crm(prod, analytics, settings)
        finally:
            with CrmCdc(settings) as cdc:
                cdc.drop()
            (left,) = prod.execute(
                "select count(*) from pg_replication_slots where slot_name = %s", (name,)
            ).fetchone()
            assert left == 0


def account(i: int, email: str | None = None, ts: str = "2024-01-01 00:00:00") -> tuple:
    return (i, f"Owner {i}", email or f"o{i}@example.com", f"27{i:011d}", ts)


def insert_people(prod: psycopg.Connection, ids: range) -> None:
    with prod.transaction():
        for i in ids:
            prod.execute("insert into crm_system.accounts values (%s, %s, %s, %s, %s)", account(i))
            prod.execute(
                "insert into crm_system.addresses values (%s, %s, 'Cape Town', 'WC', '8001', "
                "'ZAR', '2024-01-01 00:00:01.5')",
                (i, f"{i} Long Street"),
            )
            prod.execute(
                "insert into crm_system.devices values (%s, %s, 'Pixel 8', 'Mobile', 'Android', "
                "'2024-01-01 00:00:02')",
                (1000 + i, i),
            )


UPSERT_DEVICE = (
    "insert into crm_system.devices values (%s, %s, %s, 'Tablet', 'iOS', %s) "
    "on conflict (device_id) do update set device_name = excluded.device_name, "
    "device_type = excluded.device_type, device_os = excluded.device_os, "
    "modified_ts = excluded.modified_ts"
)


def test_snapshot_then_inserts_updates_deletes(crm: Crm) -> None:
    prod = crm.prod
    insert_people(prod, range(1, 21))
    stats = crm.run()
    assert stats.snapshot_rows == 60
    snap = crm.analytics.execute(
        "select distinct __op, __lsn, __source_ts_ms from crm_data.accounts_changes"
    ).fetchall()
    assert len(snap) == 1 and snap[0][0] == "r"
    assert crm.analytics.execute(
        "select count(*) from crm_data.devices_changes where __lsn = %s and __op = 'r'",
        (snap[0][1],),
    ).fetchone() == (20,)
    crm.assert_rebuilt_equals_source()

    t0 = int(time.time() * 1000)
    insert_people(prod, range(21, 26))  # c
    prod.execute("update crm_system.accounts set email = 'new@example.com' where account_id = 1")
    # The starter's device upsert keeps the device's old account_id.
    prod.execute(UPSERT_DEVICE, (1001, 999, "iPad Air", "2024-01-02 00:00:00"))
    for k in range(10):  # many commits to one row within a second
        prod.execute(
            "update crm_system.accounts set email = %s where account_id = 2", (f"e{k}@x.org",)
        )
    with prod.transaction():  # many changes to one row in one transaction
        for k in range(5):
            prod.execute(
                "update crm_system.accounts set owner_name = %s where account_id = 3", (f"n{k}",)
            )
    with prod.transaction():
        for table, key in (("accounts", "account_id"), ("addresses", "account_id")):
            prod.execute(f"delete from crm_system.{table} where {key} = 4")
        prod.execute("delete from crm_system.devices where device_id = 1004")
    with prod.transaction():  # delete and insert again
        prod.execute("delete from crm_system.accounts where account_id = 5")
        prod.execute("insert into crm_system.accounts values (%s, %s, %s, %s, %s)", account(5))
    prod.execute("update crm_system.accounts set account_id = 60 where account_id = 6")  # key
    prod.execute("insert into crm_system.accounts values (%s, %s, %s, %s, %s)", account(6))
    t1 = int(time.time() * 1000)

    stats = crm.run()
    assert stats.snapshot_rows == 0
    expected = {
        ("accounts", "c"): 5 + 1 + 1 + 1,  # new, re-inserted 5, key change to 60, new 6
        ("addresses", "c"): 5,
        ("devices", "c"): 5,
        ("accounts", "u"): 1 + 10 + 5,
        ("devices", "u"): 1,
        ("accounts", "d"): 1 + 1 + 1,  # 4, 5, old key 6
        ("addresses", "d"): 1,
        ("devices", "d"): 1,
    }
    assert stats.by_table_op == expected
    assert stats.changes_landed == sum(expected.values())
    crm.assert_rebuilt_equals_source()

    rows = crm.changes("accounts")
    by_id: dict[int, list[tuple]] = {}
    for row in rows:
        by_id.setdefault(row[0], []).append(row)
    # commit order is LSN order per row; the last of a burst wins
    assert [r[2] for r in by_id[2][1:]] == [f"e{k}@x.org" for k in range(10)]
    assert [r[1] for r in by_id[3][1:]] == [f"n{k}" for k in range(5)]
    assert [r[5] for r in by_id[5]] == ["r", "d", "c"]
    assert [r[5] for r in by_id[6]] == ["r", "d", "c"]
    assert by_id[6][1][6] == by_id[60][0][6]  # key change: delete and insert at one LSN
    # deletes carry the key alone
    for table, (key, cols) in TABLES.items():
        nonkey = " or ".join(f"{c} is not null" for c in cols if c != key)
        (n,) = crm.analytics.execute(
            f"select count(*) from crm_data.{table}_changes where __op = 'd' and ({nonkey})"
        ).fetchone()
        assert n == 0
    device = crm.changes("devices")
    upd = [r for r in device if r[0] == 1001 and r[6] == "u"]
    assert upd and upd[0][1] == 1 and upd[0][2] == "iPad Air"  # account_id stays old
    (lo, hi) = crm.analytics.execute(
        "select min(__source_ts_ms), max(__source_ts_ms) from crm_data.accounts_changes "
        "where __op <> 'r'"
    ).fetchone()
    assert t0 - 1000 <= lo <= hi <= t1 + 1000  # commit time, epoch ms
    assert crm.analytics.execute(
        "select modified_ts from crm_data.addresses_changes where account_id = 21"
    ).fetchone() == (datetime(2024, 1, 1, 0, 0, 1, 500000),)

    # Nothing more to read: a rerun lands nothing.
    before = crm.count()
    stats = crm.run()
    assert (stats.changes_landed, stats.changes_duplicate) == (0, 0)
    assert crm.count() == before
    assert crm.pending_changes() == 0


def test_kill_between_landing_and_slot_advance(crm: Crm) -> None:
    prod = crm.prod
    insert_people(prod, range(1, 11))
    crm.run()
    snapshot = crm.count()
    for i in range(1, 11):
        prod.execute("update crm_system.accounts set email = %s where account_id = %s", ("k@x", i))
    prod.execute("delete from crm_system.devices where device_id = 1003")
    changed = 11
    confirmed = crm.slot_confirmed()

    killed = subprocess.run(
        [sys.executable, "-m", "ingestion.crm_cdc", "--once"],
        env=crm.env(WTC_CRASH_POINT="crm_cdc.after_land", CRM_CDC_BATCH_CHANGES="100000"),
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert killed.returncode == CRASH_EXIT_CODE, killed.stderr.decode()[-2000:]
    assert crm.count() == snapshot + changed  # landed and committed ...
    assert crm.slot_confirmed() == confirmed  # ... but the slot was not advanced
    assert crm.pending_changes() > 0

    stats = crm.run()  # the rerun reads the same changes again and lands none of them twice
    assert (stats.changes_landed, stats.changes_duplicate) == (0, changed)
    assert crm.count() == snapshot + changed
    assert crm.pending_changes() == 0

    prod.execute("insert into crm_system.accounts values (%s, %s, %s, %s, %s)", account(77))
    stats = crm.run()
    assert (stats.changes_landed, stats.changes_duplicate) == (1, 0)
    assert crm.count() == snapshot + changed + 1
    crm.assert_rebuilt_equals_source()


def test_kill_after_slot_created_before_snapshot_landed(crm: Crm) -> None:
    insert_people(crm.prod, range(1, 6))
    killed = subprocess.run(
        [sys.executable, "-m", "ingestion.crm_cdc", "--once"],
        env=crm.env(WTC_CRASH_POINT="crm_cdc.after_slot_created"),
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert killed.returncode == CRASH_EXIT_CODE, killed.stderr.decode()[-2000:]
    assert crm.slot_confirmed() is not None
    assert crm.count() == 0
    # Changes after the crash: the rerun must not lose them (nor the rows before).
    crm.prod.execute("delete from crm_system.accounts where account_id = 1")
    insert_people(crm.prod, range(6, 8))
    stats = crm.run()
    assert stats.snapshot_rows == 5 * 3 - 1 + 2 * 3
    assert stats.changes_landed == 0
    crm.assert_rebuilt_equals_source()


def test_transactions_spanning_the_snapshot_point(crm: Crm) -> None:
    """A transaction that writes before the slot's consistent point and commits after it is a
    change whose LSN is below the snapshot rows' LSN: the rebuild rule still gets it right."""
    import threading

    insert_people(crm.prod, range(1, 4))
    dsn = crm.settings.prod_dsn

    opened: list[psycopg.Connection] = []

    def open_tx(account_id: int, email: str) -> tuple[psycopg.Connection, int]:
        conn = psycopg.connect(dsn)
        opened.append(conn)
        conn.execute(
            "update crm_system.accounts set email = %s where account_id = %s", (email, account_id)
        )
        (xid,) = conn.execute("select txid_current()").fetchone()
        return conn, xid

    def wait_for_lock_wait(xid: int) -> None:
        deadline = time.monotonic() + 30
        while not crm.prod.execute(
            "select 1 from pg_locks where locktype = 'transactionid' and not granted "
            "and transactionid::text = %s",
            (str(xid),),
        ).fetchone():
            assert time.monotonic() < deadline, f"slot creation never waited for {xid}"
            time.sleep(0.05)

    t0, xid0 = open_tx(1, "t0@x")
    result: list = []
    runner = threading.Thread(target=lambda: result.append(crm.run()))
    runner.start()
    try:
        wait_for_lock_wait(xid0)  # CREATE_REPLICATION_SLOT waits for t0
        t1, xid1 = open_tx(2, "t1@x")
        t0.commit()
        wait_for_lock_wait(xid1)  # ... then for t1, which began before it was ready
        t2, _ = open_tx(3, "t2@x")  # begins before the consistent point
        t1.commit()  # the slot becomes consistent here; t2 is still open
        runner.join(60)
        assert result and result[0].snapshot_rows == 9
        t2.commit()  # commits after the consistent point
    finally:
        for conn in opened:
            conn.close()
        runner.join(60)
    snapshot = {r[0]: r for r in crm.changes("accounts") if r[5] == "r"}
    assert snapshot[1][2] == "t0@x" and snapshot[2][2] == "t1@x" and snapshot[3][2] != "t2@x"
    stats = crm.run()
    assert stats.by_table_op == {("accounts", "u"): 1}
    change = next(r for r in crm.changes("accounts") if r[5] == "u")
    assert change[0] == 3 and change[2] == "t2@x"
    assert change[6] < snapshot[3][6]  # below the snapshot's LSN, yet newer
    crm.assert_rebuilt_equals_source()


def test_new_source_column_stops_the_reader(crm: Crm) -> None:
    from ingestion.crm_cdc import CdcError

    insert_people(crm.prod, range(1, 3))
    with CrmCdc(crm.settings, Metrics()) as cdc:
        stats = RunStats()
        cdc.start(stats)  # snapshot; the reader knows the columns now
        crm.prod.execute("alter table crm_system.accounts add column loyalty_tier text")
        try:
            crm.prod.execute(
                "update crm_system.accounts set loyalty_tier = 'gold' where account_id = 1"
            )
            before = crm.count()
            with pytest.raises(CdcError, match="new columns"):  # while running
                cdc.step(stats)
            with pytest.raises(CdcError, match="lacks columns"):  # at a restart
                crm.run()
            assert crm.count() == before  # nothing landed without the column
            assert crm.pending_changes() > 0  # and the change is still in the slot
        finally:
            crm.prod.execute("alter table crm_system.accounts drop column loyalty_tier")


def test_truncate_stops_the_reader_naming_the_table(crm: Crm) -> None:
    """Case 8: a TRUNCATE of a captured table is never ignored. The changes committed before it
    land; then the reader stops with an error naming the table, at every restart, and the
    TRUNCATE stays in the slot (docs/failure-handling.md: the chosen policy and the way on)."""
    from ingestion.crm_cdc import CdcError

    insert_people(crm.prod, range(1, 3))
    crm.run()  # snapshot
    insert_people(crm.prod, range(3, 4))  # a good change before the TRUNCATE
    crm.prod.execute("truncate crm_system.devices")
    before = crm.count()
    with pytest.raises(CdcError, match=r"TRUNCATE of crm_system\.devices at "):
        crm.run()
    assert crm.count() == before + 3  # the insert before it landed (account, address, device)
    with pytest.raises(CdcError, match=r"TRUNCATE of crm_system\.devices"):
        crm.run()  # a restart stops at the same place
    assert crm.pending_changes() > 0


def test_follow_metrics_and_sigterm(crm: Crm) -> None:
    insert_people(crm.prod, range(1, 4))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingestion.crm_cdc", "--metrics-port", str(port)],
        env=crm.env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )

    def metrics() -> str:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
        except httpx.TransportError:
            return ""

    try:
        wait_for(lambda: crm.count() == 9, "the snapshot", process=proc)
        # The server drops the reader's connections: it reconnects and carries on.
        wait_for(
            lambda: (
                crm.prod.execute(
                    "select count(pg_terminate_backend(pid)) from pg_stat_activity "
                    "where application_name = 'wtc_crm_cdc'"
                ).fetchone()[0]
                == 2
            ),
            "the reader's connections to terminate",
            process=proc,
        )
        crm.prod.execute("update crm_system.accounts set email = 'f@x' where account_id = 2")
        wait_for(lambda: crm.count() == 10, "a change while following", process=proc)
        wait_for(
            lambda: 'wtc_crm_cdc_changes_total{op="u",table="accounts"} 1.0' in metrics(),
            "the metrics",
            process=proc,
        )
        text = metrics()
        assert "wtc_crm_cdc_lag_bytes " in text and "wtc_crm_cdc_lag_seconds " in text
        assert 'wtc_crm_cdc_changes_total{op="r",table="devices"} 3.0' in text
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert b"database unavailable, retrying" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    crm.assert_rebuilt_equals_source()


def test_generator_mix_snapshot_then_stream(crm: Crm) -> None:
    """The CRM generator's realistic mix (upserts, repeats as updates, deletes) before and
    after the snapshot."""
    from ingestion.generators.crm import CrmConfig, run_crm

    run_crm(
        CrmConfig(profile="realistic", seed=1, subscribers=300, transactions=300),
        crm.settings.prod_dsn,
    )
    crm.run()
    run_crm(
        CrmConfig(
            profile="realistic",
            seed=2,
            subscribers=300,
            transactions=600,
            start=datetime(2024, 1, 2),
        ),
        crm.settings.prod_dsn,
    )
    stats = crm.run()
    assert {op for _, op in stats.by_table_op} == {"c", "u", "d"}
    crm.assert_rebuilt_equals_source()


def test_cli_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ingestion.crm_cdc", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    assert "--once" in out.stdout and "pgoutput" in out.stdout


def test_cli_once_without_a_database_is_a_clear_error() -> None:
    unreachable = f"postgresql://postgres:x@127.0.0.1:{free_port()}/wtc_prod"
    out = subprocess.run(
        [sys.executable, "-m", "ingestion.crm_cdc", "--once"],
        cwd=ROOT,
        env={**os.environ, "WTC_PROD_DSN": unreachable, "WTC_ANALYTICS_DSN": unreachable},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "crm cdc failed" in out.stderr and "Traceback" not in out.stderr
