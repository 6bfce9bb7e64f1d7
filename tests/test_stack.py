"""The local stack: start and stop are idempotent, nothing is left behind, the bootstrap
creates exactly the contract's tables, and the servers bind to loopback only."""

from __future__ import annotations

import pwd
import shutil
import tempfile
from pathlib import Path

import paramiko
import psycopg
import pytest
import redis

from ops.stack import Stack, alive, port_open, scratch_settings

PROD_TABLES = {
    ("crm_system", "accounts"): [
        ("account_id", "integer"),
        ("owner_name", "character varying"),
        ("email", "character varying"),
        ("phone_number", "character varying"),
        ("modified_ts", "timestamp without time zone"),
    ],
    ("crm_system", "addresses"): [
        ("account_id", "integer"),
        ("street_address", "character varying"),
        ("city", "character varying"),
        ("state", "character varying"),
        ("postal_code", "character varying"),
        ("country", "character varying"),
        ("modified_ts", "timestamp without time zone"),
    ],
    ("crm_system", "devices"): [
        ("device_id", "integer"),
        ("account_id", "integer"),
        ("device_name", "character varying"),
        ("device_type", "character varying"),
        ("device_os", "character varying"),
        ("modified_ts", "timestamp without time zone"),
    ],
}

RAW_TABLES = {
    ("cdr_data", "files"),
    ("cdr_data", "data_records"),
    ("cdr_data", "voice_records"),
    ("cdr_data", "rejected_rows"),
    ("cdr_data", "skipped_files"),
    ("cdr_data", "file_conflicts"),
    ("forex_data", "ticks"),
    ("forex_data", "rejected_messages"),
    ("crm_data", "accounts_changes"),
    ("crm_data", "addresses_changes"),
    ("crm_data", "devices_changes"),
}


def columns(dsn: str, schemas: tuple[str, ...]) -> dict[tuple[str, str], list[tuple[str, str]]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "select table_schema, table_name, column_name, data_type "
            "from information_schema.columns where table_schema = any(%s) "
            "order by table_schema, table_name, ordinal_position",
            [list(schemas)],
        ).fetchall()
    tables: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for schema, table, column, data_type in rows:
        tables.setdefault((schema, table), []).append((column, data_type))
    return tables


def test_bootstrap_creates_exactly_the_contract_tables(stack):
    assert columns(stack.prod_dsn, ("crm_system",)) == PROD_TABLES
    with psycopg.connect(stack.prod_dsn) as conn:
        keys = conn.execute(
            "select tc.table_name, kcu.column_name "
            "from information_schema.table_constraints as tc "
            "join information_schema.key_column_usage as kcu "
            "using (constraint_schema, constraint_name) "
            "where tc.table_schema = 'crm_system' and tc.constraint_type = 'PRIMARY KEY' "
            "order by 1"
        ).fetchall()
        foreign = conn.execute(
            "select count(*) from information_schema.table_constraints "
            "where table_schema = 'crm_system' and constraint_type = 'FOREIGN KEY'"
        ).fetchone()
    assert keys == [
        ("accounts", "account_id"),
        ("addresses", "account_id"),
        ("devices", "device_id"),
    ]
    assert foreign == (0,)
    analytics = columns(
        stack.analytics_dsn, ("cdr_data", "crm_data", "forex_data", "prepared_layers")
    )
    assert set(analytics) >= RAW_TABLES
    with psycopg.connect(stack.analytics_dsn) as conn:
        schemas = {
            r[0] for r in conn.execute("select schema_name from information_schema.schemata")
        }
        settings = dict(
            conn.execute(
                "select name, setting from pg_settings where name in "
                "('wal_level', 'TimeZone', 'listen_addresses')"
            ).fetchall()
        )
    assert {"cdr_data", "crm_data", "forex_data", "prepared_layers"} <= schemas
    assert settings == {"wal_level": "logical", "TimeZone": "UTC", "listen_addresses": "127.0.0.1"}


def test_bootstrap_is_idempotent(stack):
    stack.stack.bootstrap()
    stack.stack.bootstrap()
    assert set(columns(stack.analytics_dsn, ("cdr_data", "crm_data", "forex_data"))) == RAW_TABLES


def test_servers_answer_on_loopback(stack):
    assert redis.Redis.from_url(stack.redis_url).ping()


def test_redis_never_evicts_and_has_its_maxmemory(stack):
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    config = client.config_get("maxmemory*")
    assert config["maxmemory-policy"] == "noeviction"
    assert int(config["maxmemory"]) == stack.settings.redis_maxmemory_mb * 1024 * 1024
    transport = paramiko.Transport(("127.0.0.1", stack.settings.sftp_port))
    try:
        transport.connect(username=stack.settings.sftp_user, password=stack.settings.sftp_password)
        sftp = paramiko.SFTPClient.from_transport(transport)
        with sftp.open("probe.txt", "w") as remote:
            remote.write("x")
        assert (stack.cdr_dir / "probe.txt").read_text() == "x"
        sftp.remove("probe.txt")
    finally:
        transport.close()
    with pytest.raises(paramiko.AuthenticationException):
        bad = paramiko.Transport(("127.0.0.1", stack.settings.sftp_port))
        try:
            bad.connect(username=stack.settings.sftp_user, password="wrong")
        finally:
            bad.close()


def _listening_addresses(ports: set[int]) -> set[str]:
    """Local addresses of listening TCP sockets on `ports`, read from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(port, 16) in ports:
                found.add(address)
    return found


def test_nothing_binds_beyond_loopback(stack):
    s = stack.settings
    addresses = _listening_addresses({s.pg_port, s.redis_port, s.sftp_port})
    assert addresses == {"0100007F"}  # 127.0.0.1 in /proc's little-endian hex


def test_start_and_stop_are_idempotent_and_leave_nothing_behind():
    state_dir = Path(tempfile.mkdtemp(prefix="wtc-stack-"))
    state_dir.chmod(0o755)
    settings = scratch_settings(state_dir)
    stack = Stack(settings)
    try:
        stack.start()
        pids = {c.name: c.pid for c in stack.status()}
        stack.start()  # second start: nothing new
        assert {c.name: c.pid for c in stack.status()} == pids
        assert all(pids.values())
        stack.start_process("sleeper", ["sleep", "300"])
        sleeper = stack.status()[-1]
        assert sleeper.name == "sleeper" and sleeper.running
    finally:
        stack.stop()
    stack.stop()  # second stop: a no-op
    assert not any(c.running for c in stack.status())
    for pid in [*pids.values(), sleeper.pid]:
        assert not alive(pid), pid
    for port in (settings.pg_port, settings.redis_port, settings.sftp_port):
        assert not port_open("127.0.0.1", port)
    stack.remove_sftp_user()  # the machine keeps no login of a stack that is gone
    with pytest.raises(KeyError):
        pwd.getpwnam(settings.sftp_user)
    assert not settings.sftp_root.exists()
    shutil.rmtree(state_dir)
