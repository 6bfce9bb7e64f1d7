"""CDR rows to the stream: after a file committed, its landed rows go to `cdr-data`/`cdr-voice`.

Each message is keyed by msisdn; its value is a JSON object with the typed row, a stable
`event_id` (`<source_file>:<line_no>`), so a republish after a crash is recognisable downstream,
and the row's `loaded_at` (naive UTC), from which consumers measure landing-to-applied latency
on any stream backend.
`cdr_data.files.published_at` records a completed publish; files whose publish did not complete
(a crash or a stream outage between commit and publish) are published again.
"""

from __future__ import annotations

import logging

import psycopg

from ingestion.cdr_format import KINDS, Kind
from ingestion.stream import Producer

log = logging.getLogger(__name__)

CDR_DATA_TOPIC = "cdr-data"
CDR_VOICE_TOPIC = "cdr-voice"
TOPICS = {"data": CDR_DATA_TOPIC, "voice": CDR_VOICE_TOPIC}
"""The stream topic of each CDR file kind."""

TIMESTAMP_FORMAT = "YYYY-MM-DD HH24:MI:SS.US"
"""Event times and `loaded_at` in messages: naive UTC, always with 6 fraction digits."""


def _json_sql(kind: Kind) -> str:
    """SQL building a row's JSON text with Postgres' JSON encoder (`json_build_object`): every
    value is encoded, none pasted into the text (a file name may hold any character)."""
    args = [
        "'event_id', source_file || ':' || line_no",
        "'source_file', source_file",
        "'line_no', line_no",
    ]
    for col in kind.columns:
        if col.pg_type == "timestamp":
            args.append(f"'{col.name}', to_char({col.name}, '{TIMESTAMP_FORMAT}')")
        else:
            args.append(f"'{col.name}', {col.name}")
    args.append(f"'loaded_at', to_char(loaded_at at time zone 'UTC', '{TIMESTAMP_FORMAT}')")
    return f"json_build_object({', '.join(args)})::text"


_ROWS_SQL = {
    # names from the contract's Kind constants; the file name is a bound parameter
    name: f"select msisdn, {_json_sql(kind)}"  # noqa: S608
    f" from {kind.table} where source_file = %s order by line_no"
    for name, kind in KINDS.items()
}


def message_sql(kind_name: str) -> str:
    """The query returning `(msisdn, JSON value)` of a file's landed rows, in line order."""
    return _ROWS_SQL[kind_name]


def range_sql(kind_name: str) -> str:
    """The query returning the JSON value of every landed row of a kind whose event time is in
    `[%(start)s, %(end)s)` and whose file is not in the text array `%(skip)s`: the messages the
    loader published for them, read again by the HVS rebuild."""
    kind = KINDS[kind_name]
    return (  # names from the kind's own constants, values as parameters
        f"select {_json_sql(kind)} from {kind.table}"  # noqa: S608
        f" where {kind.event_time} >= %(start)s and {kind.event_time} < %(end)s"
        " and source_file <> all(%(skip)s::text[])"
    )


def publish_file(
    conn: psycopg.Connection, producer: Producer, file_name: str, kind_name: str, sha256: str
) -> int:
    """Publish the landed rows of one file, flush, and record the publish. Returns the count.

    The rows are read with one query and published with `publish_many`. `published_at` is set
    only if the file still has the checksum that was published.
    """
    rows = conn.execute(message_sql(kind_name), (file_name,)).fetchall()
    count = producer.publish_many(
        TOPICS[kind_name], ((key.encode(), value.encode(), None) for key, value in rows)
    )
    producer.flush()
    conn.execute(
        "update cdr_data.files set published_at = now() where file_name = %s and sha256 = %s",
        (file_name, sha256),
    )
    return count


def unpublished_files(conn: psycopg.Connection) -> list[tuple[str, str, str]]:
    """`(file_name, kind, sha256)` of landed files whose rows are not yet published."""
    return conn.execute(
        "select file_name, kind, sha256 from cdr_data.files"
        " where published_at is null order by file_name"
    ).fetchall()
