"""Land one CDR file in Postgres: its rows, its rejects and its `cdr_data.files` row, atomically.

Two paths, one set of rules (`ingestion.cdr_format`):

- the COPY path: a file without quote characters whose event times are all written in the
  contract's form (`cdr_format.TIMESTAMP_PATTERN`, one regex scan) is streamed as it is (each
  line prefixed with the file name and line number) by `COPY ... (format csv)` straight into
  its raw table, whose constraints hold the value rules (`contracts/wtc_analytics.sql`), so every
  row is checked as it lands. This is the path of every well-formed file.
- the line path: when that COPY fails (wrong column count, a bad number or timestamp, a missing
  value, a value rule broken, bad bytes), the file's transaction is rolled back and the file
  landed again this way; a file with quote characters or an event time of another form takes
  it at once. The lines are split into fields (Python's csv reader, one line at a time, so a
  line number is always the physical line) and copied as text into a temporary staging table;
  one statement lands the good rows with casts and files the bad ones with a reason.

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
    TIMESTAMP_PATTERN,
    Kind,
    copy_ready,
    event_times_written,
    header_problem,
    kind_of,
    parse_line,
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
    """What happened to one file. `outcome`: landed, replaced (a version rejected as a whole
    before), skipped (landed before with this checksum), rejected, or conflict (another version
    was landed; this one is quarantined in `cdr_data.file_conflicts`)."""

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
    """Create the session's staging table and cast helpers (call once per new connection).

    Raises `RuntimeError` when the raw tables lack their value-rule constraints (a database
    bootstrapped by an older `contracts/wtc_analytics.sql`): the COPY path relies on them.
    """
    with conn.transaction():
        conn.execute(SESSION_SQL)
        names = [kind.rules_constraint for kind in KINDS.values()]
        found = {
            row[0]
            for row in conn.execute(
                "select conname from pg_constraint where conname = any(%s)", (names,)
            )
        }
    missing = sorted(set(names) - found)
    if missing:
        raise RuntimeError(
            f"the raw CDR tables lack the value-rule constraints {', '.join(missing)}:"
            " apply contracts/wtc_analytics.sql (`make start` does)"
        )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def land_file(conn: psycopg.Connection, file_name: str, data: bytes) -> Landing:
    """Land a complete CDR file in one transaction (skip, replace or land; see module doc).

    `conn` must be prepared with `prepare_session`; any transaction it is in becomes the file's.
    """
    kind = kind_of(file_name)
    if kind is None:
        raise ValueError(f"not a CDR file name: {file_name!r}")
    base = {
        "file_name": file_name,
        "kind": kind.name,
        "size_bytes": len(data),
        "sha256": sha256_hex(data),
    }
    lines = split_lines(data)
    if copy_ready(data, lines):
        body = copy_body(file_name, lines)
        if event_times_written(body, max(len(lines) - 1, 0)):
            try:
                return _land(conn, kind, base, lines, body)
            except _NeedsLinePath:
                pass  # rolled back: land it again, line by line
        else:
            log.info(
                "file needs the line path",
                extra={"file": file_name, "cause": "an event time not of the written form"},
            )
    return _land(conn, kind, base, lines, None)


class _NeedsLinePath(Exception):
    """The COPY path failed on the file's data; its transaction was rolled back."""


def _land(
    conn: psycopg.Connection, kind: Kind, base: dict, lines: list[bytes], body: bytes | None
) -> Landing:
    """Land the file in one transaction: by COPY of `body` (`copy_body`), or by the line path
    when `body` is None."""
    file_name = base["file_name"]
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_CLASS, file_name))
        # a statement of its own after the lock: its snapshot sees a file another loader landed
        # while this one waited
        row = conn.execute(
            "select sha256, rows_landed from cdr_data.files where file_name = %s", (file_name,)
        ).fetchone()
        if row is not None and row[0] == base["sha256"]:
            return Landing(**base, outcome="skipped")
        if row is not None and row[1] > 0:
            # Replaced under the same name: its rows are landed and published already. The
            # landed version stays; the new one is quarantined whole (docs/failure-handling.md).
            _record_conflict(conn, base, row[0])
            return Landing(**base, outcome="conflict", path="file")
        if row is not None:  # nothing of it landed (rejected as a whole): the new version lands
            _delete_file(conn, kind, file_name)
        else:  # a rejection of an earlier state of the file (empty, unreadable) is history now
            conn.execute(
                "delete from cdr_data.rejected_rows where source_file = %s and line_no = 0",
                (file_name,),
            )
        outcome = "replaced" if row is not None else "landed"

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

        if body is not None:
            landed, rejected, first_at, last_at = _copy_path(conn, kind, base, body)
        else:
            landed, rejected, first_at, last_at = _line_path(conn, kind, file_name, lines)
            _insert_files_row(conn, base, landed, rejected, first_at, last_at)
    return Landing(
        **base,
        outcome=outcome,
        rows_landed=landed,
        rows_rejected=rejected,
        first_event_at=first_at,
        last_event_at=last_at,
        path="lines" if body is None else "copy",
    )


def _record_conflict(conn: psycopg.Connection, base: dict, landed_sha256: str) -> None:
    reason = (
        f"replaced under the same name: sha256 {base['sha256']} differs from the landed "
        f"version's {landed_sha256}; the landed version is kept"
    )
    conn.execute(
        "insert into cdr_data.file_conflicts (file_name, sha256, size_bytes, reason)"
        " values (%s, %s, %s, %s) on conflict (file_name, sha256) do nothing",
        (base["file_name"], base["sha256"], base["size_bytes"], reason),
    )
    log.error("file replaced under the same name: quarantined", extra={"file": base["file_name"]})


def skip_file(conn: psycopg.Connection, file_name: str, reason: str) -> bool:
    """Record a directory entry that is not taken (dot file, symlink, not a regular file).
    False when it was recorded before."""
    cur = conn.execute(
        "insert into cdr_data.skipped_files (file_name, reason) values (%s, %s)"
        " on conflict (file_name) do nothing",
        (file_name, reason),
    )
    return cur.rowcount == 1


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


def _copy_path(conn: psycopg.Connection, kind: Kind, base: dict, body: bytes) -> Counts:
    """COPY the file's body into its table (the table's constraints check every row), then write
    its `files` row from the landed rows."""
    file_name = base["file_name"]
    cols = ", ".join(kind.column_names)
    try:
        with conn.cursor().copy(
            f"copy {kind.table} (source_file, line_no, {cols}) from stdin (format csv)"
        ) as copy:
            copy.write(body)
    except (errors.DataError, errors.IntegrityError) as exc:
        log.info(
            "file needs the line path",
            extra={"file": file_name, "cause": str(exc).splitlines()[0]},
        )
        raise _NeedsLinePath from exc
    row = conn.execute(_FILES_ROW_SQL[kind.name], {**base, "file": file_name}).fetchone()
    assert row is not None  # insert ... select count(*) ... returning: always one row
    return row


def _files_row_sql(kind: Kind) -> str:
    ev = kind.event_time
    # names from the contract's Kind constants, values bound as parameters
    return f"""
insert into cdr_data.files (file_name, kind, size_bytes, sha256, rows_landed, rows_rejected,
                            first_event_at, last_event_at, published_at)
select %(file)s, %(kind)s, %(size_bytes)s, %(sha256)s, count(*), 0, min({ev}), max({ev}),
       case when count(*) = 0 then now() end
from {kind.table} where source_file = %(file)s
returning rows_landed, rows_rejected, first_event_at, last_event_at
"""  # noqa: S608


_FILES_ROW_SQL = {name: _files_row_sql(kind) for name, kind in KINDS.items()}


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
            bad = f"{col.name} is null"
            if col.pg_type == "timestamp":
                bad = f"({bad} or {col.name}_raw !~ '^{TIMESTAMP_PATTERN}$')"
            casts.append(
                f"when {bad} and {col.name}_raw <> ''"
                f" then 'bad {what}: {col.name}=' || quote_literal({col.name}_raw)"
            )
        targets.append(col.name)
    cols = ", ".join(targets)
    ev = kind.event_time
    # names from the contract's Kind constants, values bound as parameters
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
"""  # noqa: S608


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
    row = conn.execute(_LINE_SQL[kind.name], {"file": file_name}).fetchone()
    assert row is not None  # the line path's statement returns its one counts row
    landed, rejected, first_at, last_at = row
    return landed, rejected, first_at, last_at


def _delete_file(conn: psycopg.Connection, kind: Kind, file_name: str) -> None:
    for table in (kind.table, "cdr_data.rejected_rows"):
        # the table is one of the contract's constants; the file name is a bound parameter
        conn.execute(f"delete from {table} where source_file = %s", (file_name,))  # noqa: S608
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
