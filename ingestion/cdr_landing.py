"""Land one CDR file in Postgres: its rows, its rejects and its `cdr_data.files` row, atomically.

Two paths, one set of rules (`ingestion.cdr_format`):

- the COPY path: a file without quote characters is streamed as it is (each line prefixed with
  the file name and line number) by `COPY ... (format csv)` straight into its raw table; the
  value rules then run set-based on the file's rows, and the few that break one are moved to
  `cdr_data.rejected_rows`. This is the path of every well-formed file.
- the line path: when that COPY fails (wrong column count, a bad number or timestamp, a missing
  value, bad bytes) or the file holds quote characters, the COPY is rolled back to a savepoint,
  the lines are split into fields (Python's csv reader, one line at a time, so a line number is
  always the physical line) and copied as text into a temporary staging table; one
  `insert ... select` lands the good rows with casts and one files the bad ones with a reason.

Line numbers are physical: the header is line 1, the first row line 2.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import threading
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import errors

from ingestion.cdr_format import (
    KINDS,
    MAX_COLUMNS,
    Kind,
    copy_ready,
    header_problem,
    invalid_sql,
    kind_of,
    parse_line,
    reason_sql,
    reason_whens,
    split_lines,
)

log = logging.getLogger(__name__)

LOCK_CLASS = 0x0CD5
"""First key of the advisory lock taken per file name (two loaders never land one file twice)."""

_STAGE_COLUMNS = ", ".join(f"c{i}" for i in range(1, MAX_COLUMNS + 1))

SESSION_SQL = f"""
create temp table if not exists cdr_stage (
    line_no integer not null,
    raw_line text not null,
    problem text,
    n_fields integer not null,
    {", ".join(f"c{i} text" for i in range(1, MAX_COLUMNS + 1))}
) on commit delete rows;
create or replace function pg_temp.cdr_integer(value text) returns integer
language plpgsql immutable as $$
begin return value::integer; exception when others then return null; end $$;
create or replace function pg_temp.cdr_bigint(value text) returns bigint
language plpgsql immutable as $$
begin return value::bigint; exception when others then return null; end $$;
create or replace function pg_temp.cdr_timestamp(value text) returns timestamp
language plpgsql immutable as $$
begin return value::timestamp; exception when others then return null; end $$;
"""
"""Per-connection objects of the line path: the staging table and safe casts (NULL on error)."""


@dataclass(frozen=True)
class Landing:
    """What happened to one file. `outcome`: landed, replaced, skipped or rejected."""

    file_name: str
    kind: str
    outcome: str
    size_bytes: int
    sha256: str
    rows_landed: int = 0
    rows_rejected: int = 0
    first_event_at: datetime | None = None
    last_event_at: datetime | None = None
    path: str = ""


def prepare_session(conn: psycopg.Connection) -> None:
    """Create the session's staging table and cast helpers (call once per new connection)."""
    with conn.transaction():
        conn.execute(SESSION_SQL)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def land_file(conn: psycopg.Connection, file_name: str, data: bytes) -> Landing:
    """Land a complete CDR file in one transaction (skip, replace or land; see module doc).

    `conn` must be in autocommit mode and prepared with `prepare_session`.
    """
    kind = kind_of(file_name)
    if kind is None:
        raise ValueError(f"not a CDR file name: {file_name!r}")
    digest = sha256_hex(data)
    base = {"file_name": file_name, "kind": kind.name, "size_bytes": len(data), "sha256": digest}
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_CLASS, file_name))
        row = conn.execute(
            "select sha256 from cdr_data.files where file_name = %s", (file_name,)
        ).fetchone()
        if row is not None and row[0] == digest:
            return Landing(**base, outcome="skipped")
        if row is not None:
            _delete_file(conn, kind, file_name)
        outcome = "replaced" if row is not None else "landed"

        lines = split_lines(data)
        problem = header_problem(kind, lines[0]) if lines else f"not a CDR {kind.name} file: empty"
        if problem is not None:
            first = lines[0][:1000].decode("utf-8", "backslashreplace") if lines else ""
            conn.execute(
                "insert into cdr_data.rejected_rows (source_file, line_no, raw_line, reason)"
                " values (%s, 0, %s, %s)",
                (file_name, first.replace("\x00", "\\x00"), problem),
            )
            _insert_files_row(conn, base, 0, 1, None, None)
            return Landing(**base, outcome="rejected", rows_rejected=1, path="file")

        counts = None
        path = "copy"
        if copy_ready(data):
            counts = _copy_path(conn, kind, file_name, lines)
        if counts is None:
            path = "lines"
            counts = _line_path(conn, kind, file_name, lines)
        landed, rejected, first_at, last_at = counts
        _insert_files_row(conn, base, landed, rejected, first_at, last_at)
    return Landing(
        **base,
        outcome=outcome,
        rows_landed=landed,
        rows_rejected=rejected,
        first_event_at=first_at,
        last_event_at=last_at,
        path=path,
    )


def reject_file_name(conn: psycopg.Connection, file_name: str, reason: str) -> bool:
    """Record a file that is not a CDR file (line 0). False when it was recorded before."""
    cur = conn.execute(
        "insert into cdr_data.rejected_rows (source_file, line_no, raw_line, reason)"
        " values (%s, 0, '', %s) on conflict (source_file, line_no) do nothing",
        (file_name, reason),
    )
    return cur.rowcount == 1


# -- internals ---------------------------------------------------------------------------------

Counts = tuple[int, int, datetime | None, datetime | None]

_numbers: list[bytes] = []
_numbers_lock = threading.Lock()


def _line_numbers(count: int) -> list[bytes]:
    """`[b"2,", b"3,", ...]`: the line-number prefixes of `count` rows (cached)."""
    with _numbers_lock:
        while len(_numbers) < count:
            start = len(_numbers) + 2
            _numbers.extend(b"%d," % n for n in range(start, start + max(1000, len(_numbers))))
        return _numbers[:count]


def copy_body(file_name: str, lines: list[bytes]) -> bytes:
    """The rows of `lines` (header excluded) as `file_name,line_no,<row>` lines for COPY."""
    rows = lines[1:]
    if not rows:
        return b""
    numbered = b"\n".join(map(operator.add, _line_numbers(len(rows)), rows))
    prefix = file_name.encode() + b","
    return prefix + numbered.replace(b"\n", b"\n" + prefix) + b"\n"


def _copy_path(
    conn: psycopg.Connection, kind: Kind, file_name: str, lines: list[bytes]
) -> Counts | None:
    cols = ", ".join(kind.column_names)
    ev = kind.event_time
    try:
        with conn.transaction():
            with conn.cursor().copy(
                f"copy {kind.table} (source_file, line_no, {cols}) from stdin (format csv)"
            ) as copy:
                copy.write(copy_body(file_name, lines))
            total, first_at, last_at, bad = conn.execute(
                f"select count(*), min({ev}), max({ev}),"
                f" count(*) filter (where {invalid_sql(kind)})"
                f" from {kind.table} where source_file = %s",
                (file_name,),
            ).fetchone()
            if bad:
                moved = conn.execute(
                    f"delete from {kind.table} where source_file = %s and {invalid_sql(kind)}"
                    f" returning line_no, {reason_sql(kind)}",
                    (file_name,),
                ).fetchall()
                with conn.cursor().copy(
                    "copy cdr_data.rejected_rows (source_file, line_no, raw_line, reason)"
                    " from stdin"
                ) as copy:
                    for line_no, reason in moved:
                        copy.write_row((file_name, line_no, lines[line_no - 1].decode(), reason))
                first_at, last_at = conn.execute(
                    f"select min({ev}), max({ev}) from {kind.table} where source_file = %s",
                    (file_name,),
                ).fetchone()
                return total - len(moved), len(moved), first_at, last_at
            return total, 0, first_at, last_at
    except (errors.DataError, errors.IntegrityError) as exc:
        log.info(
            "file needs the line path",
            extra={"file": file_name, "cause": str(exc).splitlines()[0]},
        )
        return None


def _line_sql(kind: Kind) -> str:
    n = len(kind.columns)
    typed, missing, casts, targets = [], [], [], []
    for i, col in enumerate(kind.columns, start=1):
        raw = f"c{i}"
        typed.append(f"{raw} as {col.name}_raw")
        if col.pg_type == "text":
            typed.append(f"nullif({raw}, '') as {col.name}")
        else:
            typed.append(f"pg_temp.cdr_{col.pg_type}({raw}) as {col.name}")
        if col.required:
            missing.append(
                f"when coalesce({col.name}_raw, '') = '' then 'missing value: {col.name}'",
            )
        if col.pg_type != "text":
            what = "timestamp" if col.pg_type == "timestamp" else "number"
            casts.append(
                f"when {col.name} is null and {col.name}_raw <> ''"
                f" then 'bad {what}: {col.name}=' || quote_literal({col.name}_raw)"
            )
        targets.append(col.name)
    cols = ", ".join(targets)
    ev = kind.event_time
    return f"""
with typed as (
    select line_no, raw_line, problem, n_fields, {", ".join(typed)}
    from pg_temp.cdr_stage
), checked as materialized (
    select *, case
        when problem is not null then problem
        when n_fields <> {n} then 'wrong column count: expected {n}, got ' || n_fields
        {" ".join(missing)}
        {" ".join(casts)}
        {reason_whens(kind)}
    end as reason
    from typed
), good as (
    insert into {kind.table} (source_file, line_no, {cols})
    select %(file)s, line_no, {cols} from checked where reason is null
    returning {ev}
), bad as (
    insert into cdr_data.rejected_rows (source_file, line_no, raw_line, reason)
    select %(file)s, line_no, raw_line, reason from checked where reason is not null
    returning 1
)
select (select count(*) from good), (select count(*) from bad),
       (select min({ev}) from good), (select max({ev}) from good)
"""


_LINE_SQL = {name: _line_sql(kind) for name, kind in KINDS.items()}


def _line_path(conn: psycopg.Connection, kind: Kind, file_name: str, lines: list[bytes]) -> Counts:
    pad = [None] * MAX_COLUMNS
    conn.execute("truncate pg_temp.cdr_stage")
    with conn.cursor().copy(
        f"copy pg_temp.cdr_stage (line_no, raw_line, problem, n_fields, {_STAGE_COLUMNS})"
        " from stdin"
    ) as copy:
        for line_no, raw in enumerate(lines[1:], start=2):
            text, problem, fields = parse_line(raw)
            copy.write_row((line_no, text, problem, len(fields), *(fields + pad)[:MAX_COLUMNS]))
    landed, rejected, first_at, last_at = conn.execute(
        _LINE_SQL[kind.name], {"file": file_name}
    ).fetchone()
    return landed, rejected, first_at, last_at


def _delete_file(conn: psycopg.Connection, kind: Kind, file_name: str) -> None:
    for table in (kind.table, "cdr_data.rejected_rows"):
        conn.execute(f"delete from {table} where source_file = %s", (file_name,))
    conn.execute("delete from cdr_data.files where file_name = %s", (file_name,))
    log.warning("file changed since it was landed: replacing its rows", extra={"file": file_name})


def _insert_files_row(
    conn: psycopg.Connection,
    base: dict,
    landed: int,
    rejected: int,
    first_at: datetime | None,
    last_at: datetime | None,
) -> None:
    conn.execute(
        "insert into cdr_data.files (file_name, kind, size_bytes, sha256, rows_landed,"
        " rows_rejected, first_event_at, last_event_at, published_at)"
        " values (%s, %s, %s, %s, %s, %s, %s, %s, case when %s then now() end)",
        (
            base["file_name"],
            base["kind"],
            base["size_bytes"],
            base["sha256"],
            landed,
            rejected,
            first_at,
            last_at,
            landed == 0,
        ),
    )
