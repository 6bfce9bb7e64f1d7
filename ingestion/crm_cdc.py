"""CRM change data capture: `wtc_prod.crm_system` to the `crm_data.*_changes` change log.

Postgres logical decoding with the built-in `pgoutput` plugin (the mechanism Debezium uses): a
publication on the three CRM tables and a logical replication slot. No extension, no triggers.

- First run: the slot is created on a replication connection with an exported snapshot; the
  three tables are read in a REPEATABLE READ transaction that imports exactly that snapshot, so
  the snapshot (`__op = 'r'`, `__lsn` = the slot's consistent point) plus the changes the slot
  decodes after that point are the source's history with nothing missing and nothing twice.
- Then: `pg_logical_slot_peek_binary_changes` returns whole transactions in commit order; they
  are decoded (ingestion.pgoutput) and landed with `on conflict do nothing` on (`__lsn`, key)
  in one `wtc_analytics` transaction; only after that commit is the slot advanced. A crash in
  between re-reads the same changes on the rerun, which land nothing new.
- A replication origin in wtc_analytics named after the slot, created in the snapshot's landing
  transaction, marks "snapshot landed": a slot without it (a crash during the snapshot) is
  dropped and the snapshot taken again.

See docs/raw-layer.md (CRM change log) for the columns and how Debezium lines up.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from psycopg import sql
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.closing import Closing
from common.logs import setup_logging
from common.service import (
    cli_overrides,
    crash_point,
    metrics_port,
    serve_metrics,
    stop_on_signals,
    wait_to_retry,
)
from common.settings import ServiceSettings
from ingestion import pgoutput as po

log = logging.getLogger("ingestion.crm_cdc")

_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


PUBLISHED_OPERATIONS = "insert, update, delete, truncate"
"""What the publication sends: TRUNCATE too, so that the reader sees it and stops (never
silent; see `changes_from_messages`)."""


class CdcError(RuntimeError):
    """The CDC reader cannot go on safely (setup, lost slot, unexpected change)."""


class CdcSettings(ServiceSettings):
    """Settings of the CRM CDC reader: the shared `WTC_ANALYTICS_DSN` and `WTC_PROD_DSN`, the rest
    `CRM_CDC_*`."""

    model_config = SettingsConfigDict(env_prefix="CRM_CDC_", extra="ignore", populate_by_name=True)

    SECRET_FIELDS = ("analytics_dsn", "prod_dsn")

    slot: str = Field(default="wtc_crm_cdc", description="logical replication slot in wtc_prod")
    publication: str = Field(default="wtc_crm_cdc", description="publication in wtc_prod")
    source_schema: str = "crm_system"
    target_schema: str = "crm_data"
    tables: tuple[str, ...] = ("accounts", "addresses", "devices")
    batch_changes: int = Field(
        default=20_000, ge=1, description="rows per peek; whole transactions are always kept"
    )
    poll_interval: float = Field(default=1.0, gt=0, description="seconds between polls, following")
    retry_seconds: float = Field(default=2.0, gt=0, description="wait after a lost connection")
    metrics_port: int = Field(default=19103, description="Prometheus metrics port; 0 = off")

    @property
    def origin(self) -> str:
        """The replication origin in wtc_analytics whose existence means "snapshot landed"."""
        return f"wtc_crm_cdc:{self.slot}"

    def target_table(self, source_table: str) -> str:
        return f"{source_table}_changes"


class Metrics:
    """Prometheus metrics of one reader (own registry, so tests can run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.changes = Counter(
            "wtc_crm_cdc_changes", "Change rows landed", ["table", "op"], registry=r
        )
        self.duplicates = Counter(
            "wtc_crm_cdc_duplicate_changes",
            "Change rows read again after a restart and not landed twice",
            registry=r,
        )
        self.transactions = Counter(
            "wtc_crm_cdc_transactions", "Source transactions landed", registry=r
        )
        self.lag_bytes = Gauge(
            "wtc_crm_cdc_lag_bytes", "WAL bytes between the server and the slot", registry=r
        )
        self.lag_seconds = Gauge(
            "wtc_crm_cdc_lag_seconds",
            "Now minus the commit time of the last landed transaction; 0 when caught up",
            registry=r,
        )
        self.last_commit = Gauge(
            "wtc_crm_cdc_last_commit_timestamp_seconds",
            "Commit time of the last landed source transaction",
            registry=r,
        )
        self.batch_seconds = Histogram(
            "wtc_crm_cdc_batch_seconds", "Time to read, land and confirm one batch", registry=r
        )


@dataclass
class RunStats:
    snapshot_rows: int = 0
    changes_landed: int = 0
    changes_duplicate: int = 0
    transactions: int = 0
    batches: int = 0
    by_table_op: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass
class _Table:
    source: str
    target: str
    source_columns: tuple[str, ...]
    key_columns: tuple[str, ...]
    rows: list[tuple] = field(default_factory=list)

    @property
    def copy_columns(self) -> tuple[str, ...]:
        return (*self.source_columns, "__op", "__lsn", "__source_ts_ms")


@dataclass(frozen=True)
class _Change:
    table: str
    op: str
    lsn: int
    ts_ms: int
    values: dict[str, str | None]


def changes_from_messages(
    rows: Iterable[tuple[int, bytes]], relations: dict[int, po.Relation]
) -> tuple[list[_Change], int | None, int | None, int, int]:
    """Turn (lsn, pgoutput bytes) rows into change rows, complete transactions only.

    Returns (changes, end_lsn of the last complete transaction, its commit time in ms, number of
    complete transactions, number of input rows consumed). `relations` is updated in place with
    the Relation messages seen. Updates that change the key become a delete of the old key and
    an insert of the new row at the same LSN, as Debezium emits them.
    """
    done: list[_Change] = []
    pending: list[_Change] = []
    begin: po.Begin | None = None
    last_end = last_ts = None
    txns = consumed = 0
    for i, (lsn, data) in enumerate(rows):
        msg = po.decode(data)
        if isinstance(msg, po.Begin):
            begin, pending = msg, []
        elif isinstance(msg, po.Commit):
            if begin is None:
                raise CdcError(f"commit without begin at {po.int_to_lsn(lsn)}")
            done.extend(pending)
            pending, last_end, last_ts = [], msg.end_lsn, begin.commit_ts_ms
            begin = None
            txns += 1
            consumed = i + 1
        elif isinstance(msg, po.Relation):
            relations[msg.relation_id] = msg
        elif isinstance(msg, po.Insert | po.Update | po.Delete):
            if begin is None:
                raise CdcError(f"change outside a transaction at {po.int_to_lsn(lsn)}")
            rel = relations.get(msg.relation_id)
            if rel is None:
                raise CdcError(f"change for unknown relation id {msg.relation_id}")
            pending.extend(_row_changes(rel, msg, lsn, begin.commit_ts_ms))
        elif isinstance(msg, po.Truncate):
            if txns:  # land the transactions before it first; it heads the next read
                break
            # Never silent: the change log has no row for "every row gone", so the reader stops
            # before it, naming the tables; its position stays before the TRUNCATE (see
            # docs/failure-handling.md for the way on).
            names = [
                relations[r].qualified_name if r in relations else f"relation id {r}"
                for r in msg.relation_ids
            ]
            raise CdcError(
                f"TRUNCATE of {', '.join(names)} at {po.int_to_lsn(lsn)}: the change log cannot "
                "record it; the reader stops here (docs/failure-handling.md, CRM TRUNCATE)"
            )
        # Origin, Type and logical messages carry nothing to land.
    return done, last_end, last_ts, txns, consumed


def _truncate_in(rows: Sequence[tuple[int, bytes]]) -> bool:
    return any(isinstance(po.decode(data), po.Truncate) for _, data in rows)


def _as_dict(rel: po.Relation, values: Sequence[po.Value], lsn: int) -> dict[str, str | None]:
    if len(values) != len(rel.columns):
        raise CdcError(
            f"{rel.qualified_name}: {len(values)} values for {len(rel.columns)} columns "
            f"at {po.int_to_lsn(lsn)}"
        )
    out: dict[str, str | None] = {}
    for col, value in zip(rel.columns, values, strict=True):
        if isinstance(value, po.Unchanged):
            raise CdcError(
                f"{rel.qualified_name}.{col.name}: unchanged TOAST value at {po.int_to_lsn(lsn)}; "
                "set REPLICA IDENTITY FULL on the table to capture it"
            )
        out[col.name] = value
    return out


def _row_changes(
    rel: po.Relation, msg: po.Insert | po.Update | po.Delete, lsn: int, ts_ms: int
) -> list[_Change]:
    name = rel.name
    if isinstance(msg, po.Insert):
        return [_Change(name, "c", lsn, ts_ms, _as_dict(rel, msg.new, lsn))]
    if isinstance(msg, po.Delete):
        old = _as_dict(rel, msg.old, lsn)
        if msg.old_kind == "K":  # REPLICA IDENTITY DEFAULT: the key alone, as documented
            old = {k: (v if k in rel.key_columns else None) for k, v in old.items()}
        return [_Change(name, "d", lsn, ts_ms, old)]
    new = _as_dict(rel, msg.new, lsn)
    if msg.old is not None:
        old = _as_dict(rel, msg.old, lsn)
        keys = rel.key_columns
        if any(old[k] != new[k] for k in keys):
            old_key = {k: (old[k] if k in keys else None) for k in old}
            return [_Change(name, "d", lsn, ts_ms, old_key), _Change(name, "c", lsn, ts_ms, new)]
    return [_Change(name, "u", lsn, ts_ms, new)]


class CrmCdc(Closing):
    """One CDC reader: a slot, a publication and an origin, landing into the change log."""

    def __init__(self, settings: CdcSettings, metrics: Metrics | None = None) -> None:
        for what, name in (("slot", settings.slot), ("publication", settings.publication)):
            if not _NAME_RE.match(name):
                raise CdcError(f"{what} name {name!r}: use lower-case letters, digits and _")
        self.s = settings
        self.metrics = metrics or Metrics()
        self.relations: dict[int, po.Relation] = {}
        self._prod: psycopg.Connection | None = None
        self._ana: psycopg.Connection | None = None
        self._tables: dict[str, _Table] = {}

    # ---------------------------------------------------------------------------- connections

    @property
    def prod(self) -> psycopg.Connection:
        if self._prod is None or self._prod.closed:
            self._prod = psycopg.connect(
                self.s.prod_dsn, autocommit=True, application_name="wtc_crm_cdc"
            )
            self._prod.execute("set datestyle = 'ISO, YMD'")
        return self._prod

    @property
    def ana(self) -> psycopg.Connection:
        if self._ana is None or self._ana.closed:
            self._ana = psycopg.connect(
                self.s.analytics_dsn, autocommit=True, application_name="wtc_crm_cdc"
            )
            self._ana.execute("set datestyle = 'ISO, YMD'")
        return self._ana

    def close(self) -> None:
        for conn in (self._prod, self._ana):
            if conn is not None and not conn.closed:
                conn.close()

    # ---------------------------------------------------------------------------- setup

    def _source_tables(self) -> list[str]:
        return [f"{self.s.source_schema}.{t}" for t in self.s.tables]

    def ensure_publication(self) -> None:
        """Create the publication if missing; check the tables and their replica identity."""
        rows = self.prod.execute(
            "select c.relname, c.relreplident, "
            "exists (select 1 from pg_index i where i.indrelid = c.oid and i.indisprimary) "
            "from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "where n.nspname = %s and c.relname = any(%s)",
            (self.s.source_schema, list(self.s.tables)),
        ).fetchall()
        found = {r[0]: (r[1], r[2]) for r in rows}
        for table in self.s.tables:
            if table not in found:
                raise CdcError(f"source table {self.s.source_schema}.{table} does not exist")
            ident, has_pk = found[table]
            if ident == "n" or (ident == "d" and not has_pk):
                raise CdcError(
                    f"{self.s.source_schema}.{table}: replica identity cannot identify rows; "
                    "give it a primary key (REPLICA IDENTITY DEFAULT) or REPLICA IDENTITY FULL"
                )
        exists = self.prod.execute(
            "select pubtruncate from pg_publication where pubname = %s", (self.s.publication,)
        ).fetchone()
        if not exists:
            self.prod.execute(
                sql.SQL("create publication {} for table {} with (publish = {})").format(
                    sql.Identifier(self.s.publication),
                    sql.SQL(", ").join(
                        sql.Identifier(self.s.source_schema, t) for t in self.s.tables
                    ),
                    sql.Literal(PUBLISHED_OPERATIONS),
                )
            )
            log.info("publication created", extra={"publication": self.s.publication})
        elif not exists[0]:  # one created before TRUNCATE was published: never silent
            try:
                self.prod.execute(
                    sql.SQL("alter publication {} set (publish = {})").format(
                        sql.Identifier(self.s.publication), sql.Literal(PUBLISHED_OPERATIONS)
                    )
                )
            except psycopg.errors.InsufficientPrivilege:
                raise CdcError(
                    f"publication {self.s.publication} does not publish TRUNCATE and this role "
                    f"does not own it: alter publication {self.s.publication} "
                    f"set (publish = '{PUBLISHED_OPERATIONS}') as its owner"
                ) from None
        published = {
            r[0]
            for r in self.prod.execute(
                "select schemaname || '.' || tablename from pg_publication_tables "
                "where pubname = %s",
                (self.s.publication,),
            )
        }
        missing = set(self._source_tables()) - published
        if missing:
            raise CdcError(
                f"publication {self.s.publication} lacks {sorted(missing)}; "
                f"alter publication {self.s.publication} add table ..."
            )

    def _load_tables(self) -> None:
        for table in self.s.tables:
            src = self.prod.execute(
                "select a.attname, coalesce(a.attnum = any(i.indkey), false) "
                "from pg_attribute a "
                "left join pg_index i on i.indrelid = a.attrelid and i.indisprimary "
                "where a.attrelid = %s::regclass and a.attnum > 0 and not a.attisdropped "
                "order by a.attnum",
                (f"{self.s.source_schema}.{table}",),
            ).fetchall()
            target = self.s.target_table(table)
            dst = {
                r[0]
                for r in self.ana.execute(
                    "select column_name from information_schema.columns "
                    "where table_schema = %s and table_name = %s",
                    (self.s.target_schema, target),
                )
            }
            if not dst:
                raise CdcError(f"target table {self.s.target_schema}.{target} does not exist")
            cols = tuple(r[0] for r in src)
            missing = [c for c in (*cols, "__op", "__lsn", "__source_ts_ms") if c not in dst]
            if missing:
                raise CdcError(f"{self.s.target_schema}.{target} lacks columns {missing}")
            keys = tuple(r[0] for r in src if r[1])
            self._tables[table] = _Table(table, target, cols, keys)

    def slot_info(self) -> dict | None:
        row = self.prod.execute(
            "select plugin, database, confirmed_flush_lsn::text, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
            "from pg_replication_slots where slot_name = %s",
            (self.s.slot,),
        ).fetchone()
        if row is None:
            return None
        return {
            "plugin": row[0],
            "database": row[1],
            "confirmed_flush_lsn": po.lsn_to_int(row[2]) if row[2] else None,
            "lag_bytes": row[3],
        }

    def snapshot_landed(self) -> bool:
        """Whether this slot's snapshot has landed (its replication origin exists)."""
        row = self.ana.execute(
            "select pg_replication_origin_oid(%s) is not null", (self.s.origin,)
        ).fetchone()
        assert row is not None  # a select without from: one row
        return bool(row[0])

    # ---------------------------------------------------------------------------- snapshot

    def snapshot(self) -> int:
        """Create the slot and land a consistent snapshot of the three tables as `r` rows."""
        ident = sql.Identifier(self.s.slot).as_string(self.prod)
        repl = psycopg.connect(self.s.prod_dsn, replication="database", autocommit=True)
        try:
            res = repl.pgconn.exec_(
                f"CREATE_REPLICATION_SLOT {ident} LOGICAL pgoutput (SNAPSHOT 'export')".encode()
            )
            if res.status != psycopg.pq.ExecStatus.TUPLES_OK:
                raise CdcError(
                    f"creating slot {self.s.slot} failed: "
                    f"{res.error_message.decode(errors='replace').strip()}"
                )
            lsn, name = res.get_value(0, 1), res.get_value(0, 2)
            assert lsn is not None and name is not None  # the slot's consistent point, snapshot
            consistent = po.lsn_to_int(lsn.decode())
            snapshot_name = name.decode()
            log.info(
                "slot created",
                extra={"slot": self.s.slot, "consistent_point": po.int_to_lsn(consistent)},
            )
            crash_point("crm_cdc.after_slot_created")
            src = psycopg.connect(self.s.prod_dsn, application_name="wtc_crm_cdc_snapshot")
            src.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            src.read_only = True
            try:
                src.execute(
                    sql.SQL("set transaction snapshot {}").format(sql.Literal(snapshot_name))
                )
                # The importing transaction holds the snapshot now; the exporter may go.
                repl.close()
                row = src.execute("select (extract(epoch from now()) * 1000)::bigint").fetchone()
                assert row is not None  # a select without from: one row
                (ts_ms,) = row
                total = self._land_snapshot(src, consistent, ts_ms)
            finally:
                src.close()
        finally:
            repl.close()
        self.metrics.last_commit.set(ts_ms / 1000)
        return total

    def _land_snapshot(self, src: psycopg.Connection, lsn: int, ts_ms: int) -> int:
        ana = self.ana
        total = 0
        with ana.transaction():
            # The origin's existence marks the snapshot as landed: same transaction as the rows.
            ana.execute("select pg_replication_origin_create(%s)", (self.s.origin,))
            for t in self._tables.values():
                cols = sql.SQL(", ").join(map(sql.Identifier, t.source_columns))
                out = sql.SQL(
                    "copy (select {}, 'r', {}::bigint, {}::bigint from {}) to stdout"
                ).format(
                    cols,
                    sql.Literal(lsn),
                    sql.Literal(ts_ms),
                    sql.Identifier(self.s.source_schema, t.source),
                )
                into = sql.SQL("copy {} ({}) from stdin").format(
                    sql.Identifier(self.s.target_schema, t.target),
                    sql.SQL(", ").join(map(sql.Identifier, t.copy_columns)),
                )
                with (
                    src.cursor().copy(out) as reader,
                    ana.cursor().copy(into) as writer,
                ):
                    for block in reader:
                        writer.write(block)
                row = ana.execute(
                    sql.SQL("select count(*) from {} where __lsn = %s and __op = 'r'").format(
                        sql.Identifier(self.s.target_schema, t.target)
                    ),
                    (lsn,),
                ).fetchone()
                assert row is not None  # count(*): one row
                (n,) = row
                total += n
                self.metrics.changes.labels(t.source, "r").inc(n)
                log.info("snapshot landed", extra={"table": t.source, "rows": n})
        return total

    # ---------------------------------------------------------------------------- changes

    def _ensure_staging(self) -> None:
        for t in self._tables.values():
            self.ana.execute(
                sql.SQL(
                    "create temp table if not exists {} on commit delete rows as "
                    "select * from {} with no data"
                ).format(
                    sql.Identifier(f"stage_{t.target}"),
                    sql.Identifier(self.s.target_schema, t.target),
                )
            )

    def _land(self, changes: list[_Change], end_lsn: int, ts_ms: int) -> tuple[int, int]:
        """Land changes and record `end_lsn` as landed, in one transaction: (new, duplicates)."""
        for table in self._tables.values():
            table.rows.clear()
        for ch in changes:
            t = self._tables.get(ch.table)
            if t is None:
                raise CdcError(f"change for table {ch.table} outside {self.s.tables}")
            t.rows.append((*(ch.values.get(c) for c in t.source_columns), ch.op, ch.lsn, ch.ts_ms))
        landed = dup = 0
        ana = self.ana
        with ana.transaction():
            for t in self._tables.values():
                if not t.rows:
                    continue
                cols = sql.SQL(", ").join(map(sql.Identifier, t.copy_columns))
                stage = sql.Identifier(f"stage_{t.target}")
                with ana.cursor().copy(
                    sql.SQL("copy {} ({}) from stdin").format(stage, cols)
                ) as copy:
                    for row in t.rows:
                        copy.write_row(row)
                cur = ana.execute(
                    sql.SQL(
                        "insert into {} ({}) select {} from {} on conflict do nothing "
                        "returning __op"
                    ).format(sql.Identifier(self.s.target_schema, t.target), cols, cols, stage)
                )
                ops: dict[str, int] = {}
                for (op,) in cur:
                    ops[op] = ops.get(op, 0) + 1
                n = sum(ops.values())
                landed += n
                dup += len(t.rows) - n
                for op, k in ops.items():
                    self.metrics.changes.labels(t.source, op).inc(k)
        return landed, dup

    def _check_relations(self) -> None:
        """A source column the change table lacks stops the reader instead of being dropped."""
        for rel in self.relations.values():
            t = self._tables.get(rel.name)
            if t is None or rel.namespace != self.s.source_schema:
                raise CdcError(f"changes of {rel.qualified_name}, which is not captured")
            extra = [c.name for c in rel.columns if c.name not in t.source_columns]
            if extra:
                raise CdcError(
                    f"{rel.qualified_name} has new columns {extra}: add them to "
                    f"{self.s.target_schema}.{t.target} (the raw contract), then restart"
                )

    def _advance(self, target: int) -> None:
        info = self.slot_info()
        if info is None:
            raise CdcError(f"slot {self.s.slot} vanished")
        if info["confirmed_flush_lsn"] is None or target > info["confirmed_flush_lsn"]:
            self.prod.execute(
                "select pg_replication_slot_advance(%s, %s::pg_lsn)",
                (self.s.slot, po.int_to_lsn(target)),
            )

    def _update_lag(self) -> None:
        info = self.slot_info()
        if info is not None:
            self.metrics.lag_bytes.set(info["lag_bytes"] or 0)

    def step(self, stats: RunStats) -> bool:
        """Read, land and confirm one batch. True when the slot has caught up."""
        started = time.monotonic()
        row = self.prod.execute("select pg_current_wal_flush_lsn()::text").fetchone()
        assert row is not None  # a select without from: one row
        (upto,) = row
        upto_lsn = po.lsn_to_int(upto)
        rows = [
            (po.lsn_to_int(lsn), data)
            for lsn, data in self.prod.execute(
                "select lsn::text, data from pg_logical_slot_peek_binary_changes("
                "%s, %s::pg_lsn, %s, 'proto_version', '1', 'publication_names', %s)",
                (self.s.slot, upto, self.s.batch_changes, self.s.publication),
            )
        ]
        changes, end_lsn, ts_ms, txns, consumed = changes_from_messages(rows, self.relations)
        self._check_relations()
        caught_up = len(rows) < self.s.batch_changes
        if consumed != len(rows) and _truncate_in(rows[consumed:]):
            caught_up = False  # land what came before; the next read meets the TRUNCATE first
        elif consumed != len(rows):
            raise CdcError(
                f"slot {self.s.slot} returned {len(rows) - consumed} rows after the last commit"
            )
        if end_lsn is not None and ts_ms is not None:
            landed, dup = self._land(changes, end_lsn, ts_ms) if changes else (0, 0)
            stats.changes_landed += landed
            stats.changes_duplicate += dup
            stats.transactions += txns
            self.metrics.transactions.inc(txns)
            self.metrics.duplicates.inc(dup)
            self.metrics.last_commit.set(ts_ms / 1000)
            self.metrics.lag_seconds.set(0 if caught_up else max(time.time() - ts_ms / 1000, 0))
            for ch in changes:
                k = (ch.table, ch.op)
                stats.by_table_op[k] = stats.by_table_op.get(k, 0) + 1
            log.info(
                "changes landed",
                extra={
                    "transactions": txns,
                    "changes": len(changes),
                    "landed": landed,
                    "duplicates": dup,
                    "upto": po.int_to_lsn(end_lsn),
                },
            )
            crash_point("crm_cdc.after_land")
        if caught_up:
            self.metrics.lag_seconds.set(0)
            # Everything committed before `upto` has been decoded and landed.
            self._advance(max(upto_lsn, end_lsn or 0))
        elif end_lsn is not None:
            self._advance(end_lsn)
        stats.batches += 1
        self._update_lag()
        self.metrics.batch_seconds.observe(time.monotonic() - started)
        return caught_up

    # ---------------------------------------------------------------------------- run

    def start(self, stats: RunStats) -> None:
        """Publication, then slot and snapshot unless this slot's snapshot has landed."""
        self.ensure_publication()
        self._load_tables()
        slot = self.slot_info()
        row = self.prod.execute("select current_database()").fetchone()
        assert row is not None  # a select without from: one row
        (db,) = row
        if slot is not None and (slot["plugin"] != "pgoutput" or slot["database"] != db):
            raise CdcError(f"slot {self.s.slot} exists for {slot['plugin']}/{slot['database']}")
        if not self.snapshot_landed():
            if slot is not None:
                log.warning(
                    "slot exists but its snapshot never landed: dropping it and starting over",
                    extra={"slot": self.s.slot},
                )
                self.prod.execute("select pg_drop_replication_slot(%s)", (self.s.slot,))
            stats.snapshot_rows = self.snapshot()
        elif slot is None:
            raise CdcError(
                f"slot {self.s.slot} is gone but its snapshot landed earlier: changes since may "
                "be lost. See docs/raw-layer.md (CRM change log, recovery)."
            )
        self._ensure_staging()

    def run(self, once: bool = False, stop: threading.Event | None = None) -> RunStats:
        """Capture until caught up (`once`) or until `stop` is set."""
        stop = stop or threading.Event()
        stats = RunStats()
        started = False
        while not stop.is_set():
            try:
                if not started:
                    self.start(stats)
                    started = True
                caught_up = self.step(stats)
            except psycopg.OperationalError as exc:
                # Following: a lost connection is retried from the slot's confirmed position.
                if once:
                    raise
                self.close()
                started = False
                self.relations.clear()
                wait_to_retry(stop, self.s.retry_seconds, "database unavailable, retrying", exc)
                continue
            if caught_up:
                if once:
                    break
                stop.wait(self.s.poll_interval)
        return stats

    def drop(self) -> None:
        """Remove the slot, the publication and the origin (the landed change log stays)."""
        self.prod.execute(
            "select pg_drop_replication_slot(slot_name) from pg_replication_slots "
            "where slot_name = %s",
            (self.s.slot,),
        )
        self.prod.execute(
            sql.SQL("drop publication if exists {}").format(sql.Identifier(self.s.publication))
        )
        self.ana.execute(
            "select pg_replication_origin_drop(%s) where pg_replication_origin_oid(%s) is not null",
            (self.s.origin, self.s.origin),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ingestion.crm_cdc",
        description=(
            "Capture changes of wtc_prod.crm_system (accounts, addresses, devices) into the "
            "crm_data.*_changes change log with pgoutput logical decoding. The first run "
            "creates the publication and slot and lands a consistent snapshot (op 'r'); later "
            "runs land inserts, updates and deletes (c/u/d) in commit order, exactly once. "
            "Settings come from the environment: WTC_ANALYTICS_DSN, WTC_PROD_DSN and CRM_CDC_* "
            "(e.g. CRM_CDC_SLOT, CRM_CDC_PUBLICATION, CRM_CDC_BATCH_CHANGES)."
        ),
    )
    parser.add_argument("--once", action="store_true", help="capture until caught up, then exit")
    parser.add_argument("--slot", help="replication slot name (default wtc_crm_cdc)")
    parser.add_argument("--publication", help="publication name (default wtc_crm_cdc)")
    parser.add_argument("--batch-changes", type=int, help="pgoutput rows per read")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (default 19103, 0 off)")
    parser.add_argument(
        "--status", action="store_true", help="print the slot's position and lag, then exit"
    )
    parser.add_argument(
        "--drop",
        action="store_true",
        help="drop the slot, publication and origin (the change log stays), then exit",
    )
    args = parser.parse_args(argv)
    setup_logging()
    settings = CdcSettings(
        **cli_overrides(
            slot=args.slot,
            publication=args.publication,
            batch_changes=args.batch_changes,
            metrics_port=args.metrics_port,
        )
    )
    with CrmCdc(settings) as cdc:
        if args.drop:
            cdc.drop()
            log.info("dropped", extra={"slot": settings.slot, "publication": settings.publication})
            return 0
        if args.status:
            info = cdc.slot_info()
            landed = cdc.snapshot_landed()
            print(
                f"slot {settings.slot}: "
                + (
                    "absent"
                    if info is None
                    else f"confirmed {po.int_to_lsn(info['confirmed_flush_lsn'] or 0)}, "
                    f"lag {info['lag_bytes']} bytes"
                )
                + ("; snapshot landed" if landed else "; no snapshot landed yet")
            )
            return 0
        stop = stop_on_signals()
        serve_metrics(
            cdc.metrics.registry,
            settings.metrics_host,
            metrics_port(settings.metrics_port, args.once, args.metrics_port),
        )
        try:
            stats = cdc.run(once=args.once, stop=stop)
        except CdcError as exc:
            log.error(str(exc))
            return 2
        except psycopg.OperationalError as exc:  # --once: a database that cannot be reached
            log.error("crm cdc failed", extra={"error": str(exc).strip()})
            return 1
        log.info(
            "crm cdc finished",
            extra={
                "snapshot_rows": stats.snapshot_rows,
                "changes_landed": stats.changes_landed,
                "duplicates": stats.changes_duplicate,
                "transactions": stats.transactions,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
