"""The CDR loader against a real Postgres and a real OpenSSH SFTP server (the `stack` fixture).

Every test works in a directory of its own under the SFTP user's start directory.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from common.settings import PROJECT_ROOT
from ingestion.cdr_format import (
    DATA,
    KINDS,
    MAX_FIELD_BYTES,
    MAX_ROW_BYTES,
    VOICE,
    Column,
    copy_ready,
    header_problem,
    invalid_sql,
    kind_of,
    parse_line,
    split_lines,
)
from ingestion.cdr_landing import copy_body, prepare_session, sha256_hex
from ingestion.cdr_loader import CdrLoader, LoaderSettings
from ingestion.cdr_publish import CDR_DATA_TOPIC, CDR_VOICE_TOPIC
from ingestion.cdr_sftp import READ_REQUEST_SIZE, CdrSftp
from ingestion.generators.cdr import CdrConfig, cdr_files, upload_cdr_files
from ingestion.stream import open_consumer
from ops.stack import free_port
from tests.fixtures.polling import wait_for

DATA_HEADER = DATA.header.decode()
VOICE_HEADER = VOICE.header.decode()


# -- helpers -----------------------------------------------------------------------------------


def query(stack, sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(stack.analytics_dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def landed_counts(stack) -> dict[str, int]:
    rows = query(
        stack,
        "select source_file, count(*) from cdr_data.data_records group by 1 union all "
        "select source_file, count(*) from cdr_data.voice_records group by 1",
    )
    return dict(rows)


def csv_bytes(header: str, rows: list[str], newline: str = "\r\n") -> bytes:
    return (newline.join([header, *rows]) + newline).encode()


def config(start: datetime, pairs: int, rows: int, **kw: object) -> CdrConfig:
    return CdrConfig(
        start=start,
        duration=timedelta(seconds=200 * pairs),
        window_seconds=200,
        rows_per_file=rows,
        subscribers=500,
        **kw,
    )


def generated(start: datetime, pairs: int, rows: int, **kw: object) -> list[tuple[str, bytes]]:
    return list(cdr_files(config(start, pairs, rows, **kw)))


@pytest.fixture
def cdr_dir(stack, analytics) -> Iterator[tuple[str, Path]]:
    """`(name, local path)` of an empty directory of this test on the SFTP server."""
    name = f"t_{uuid.uuid4().hex[:8]}"
    path = stack.cdr_dir / name
    path.mkdir()
    shutil.chown(path, stack.settings.sftp_user)
    yield name, path
    shutil.rmtree(path, ignore_errors=True)


def settings_for(stack, directory: str, **kw: object) -> LoaderSettings:
    values = {
        "analytics_dsn": stack.analytics_dsn,
        "sftp_url": stack.sftp_url,
        "stream_url": stack.stream_url,
        "cdr_dir": directory,
        "settle_seconds": 0,
        "poll_interval": 0.1,
        "backoff_max": 0.5,
        "publish": False,
        "metrics_port": 0,
    }
    values.update(kw)
    return LoaderSettings(**values)


def loader_env(stack, directory: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "WTC_ANALYTICS_DSN": stack.analytics_dsn,
        "SFTP_URL": stack.sftp_url,
        "STREAM_URL": stack.stream_url,
        "CDR_DIR": directory,
        "CDR_SETTLE_SECONDS": "0",
        "WTC_LOG_FORMAT": "json",
        **extra,
    }


# -- the file format (no servers) --------------------------------------------------------------


def test_names_headers_and_lines() -> None:
    assert kind_of("cdr_data_20240101_000320.csv") is DATA
    assert kind_of("cdr_voice_20240101_000320.csv") is VOICE
    for bad in ("cdr_data_20241301_000320.csv", "cdr_sms_20240101_000320.csv", "notes.txt"):
        assert kind_of(bad) is None
    assert header_problem(DATA, DATA.header + b"\r") is None
    assert header_problem(DATA, b"\xef\xbb\xbf" + DATA.header) is None
    assert "voice header" in header_problem(DATA, VOICE.header)
    assert parse_line(b'1,"a,b",c') == ('1,"a,b",c', None, ["1", "a,b", "c"])
    assert parse_line(b"\xff,1")[1] == "not valid UTF-8"
    assert parse_line(b"")[1] == "empty line"
    assert parse_line(b'1,"a"b,c')[1].startswith("bad CSV")
    assert copy_ready(b"a,b\r\nc,d\n", [b"a,b", b"c,d"])
    assert not copy_ready(b'a,"b"\n', [b'a,"b"'])
    long = b"a," + b"x" * MAX_FIELD_BYTES
    assert not copy_ready(long + b"\n", [long])  # the line path checks its sizes
    # the whole name must match: no trailing newline, ASCII digits only
    assert kind_of("cdr_data_20240101_000320.csv\n") is None
    assert kind_of("cdr_data_２０２４0101_000320.csv") is None
    assert parse_line(b"1," + b"x" * MAX_ROW_BYTES)[1] == (
        f"row too long: {MAX_ROW_BYTES + 2} bytes > {MAX_ROW_BYTES}"
    )
    assert parse_line(b"1," + b"x" * (MAX_FIELD_BYTES + 1))[1] == (
        f"field 2 too long: {MAX_FIELD_BYTES + 1} bytes > {MAX_FIELD_BYTES}"
    )


def test_split_lines_strips_lf_and_crlf_endings() -> None:
    assert split_lines(b"h\na\nb\n") == [b"h", b"a", b"b"]
    assert split_lines(b"h\r\na\nb\r\n") == [b"h", b"a", b"b"]
    assert split_lines(b"h\na\rb\n") == [b"h", b"a\rb"]  # a CR inside a line stays
    assert split_lines(b"") == []


def _probes(col: Column) -> list[str]:
    """Values around the edges of a column's check, as text (each one casts to its type)."""
    check = col.check
    if check[0] == "digits":
        n = check[1]
        return [
            "1" * n, "0" * n, "9" * n, "1" * (n - 1), "1" * (n + 1), "1" * (n - 1) + "a",
            "+" + "1" * (n - 1), " " + "1" * (n - 1), "1" * (n - 1) + "\u0663", "",
        ]  # fmt: skip
    if check[0] == "range":
        low, high = check[1], check[2]
        return [str(v) for v in (low, high, low - 1, high + 1, -1, 0, -high)]
    if check[0] == "one_of":
        return [*check[1], check[1][0].upper(), check[1][0] + " ", "hologram", ""]
    assert check[0] == "time_range"
    return [
        check[1], check[2], "1999-12-31 23:59:59.999999", "2099-12-31 23:59:59.999999",
        "infinity", "-infinity", "epoch", "2031-04-01 00:00:01.25",
    ]  # fmt: skip


GOOD_ROWS = {
    "data": "0712345678901,7,150000,250000,video,10.0.0.1,https://x.org/,2031-04-01 00:00:01",
    "voice": "0712345678901,12,voice,0712345678902,60,2031-04-01 00:00:01",
}


@pytest.mark.parametrize("kind_name", sorted(KINDS))
def test_raw_table_constraints_reject_exactly_what_the_rules_reject(analytics, kind_name) -> None:
    """The value rules are written twice, in `ingestion/cdr_format.py` (the reasons) and as the
    raw tables' constraints (`contracts/wtc_analytics.sql`, which the COPY path relies on): every
    probe at the edges of every check must be accepted or refused by both alike."""
    kind = KINDS[kind_name]
    good = dict(zip(kind.column_names, GOOD_ROWS[kind_name].split(","), strict=True))
    cols = ", ".join(kind.column_names)
    typed = ", ".join(f"%({c.name})s::{c.pg_type} as {c.name}" for c in kind.columns)
    seen = Counter()
    for col in (c for c in kind.columns if c.check):
        for value in _probes(col):
            row = {**good, col.name: value}
            with analytics.transaction(force_rollback=True):
                breaks_rules = analytics.execute(
                    f"select {invalid_sql(kind)} from (select {typed}) as r", row
                ).fetchone()[0]
            with analytics.transaction(force_rollback=True):
                try:
                    analytics.execute(
                        f"insert into {kind.table} (source_file, line_no, {cols})"
                        f" values ('probe', 2, {', '.join(f'%({c})s' for c in kind.column_names)})",
                        row,
                    )
                    refused = False
                except psycopg.errors.CheckViolation as exc:
                    assert exc.diag.constraint_name == kind.rules_constraint
                    refused = True
            assert refused == breaks_rules, (col.name, value, breaks_rules)
            seen[refused] += 1
    assert seen[True] >= 3 * len([c for c in kind.columns if c.check])
    assert seen[False] >= 2 * len([c for c in kind.columns if c.check])


def test_the_loader_refuses_raw_tables_without_their_value_rules(stack, analytics) -> None:
    """The COPY path relies on the constraints; a database bootstrapped before them gets them
    on its next bootstrap."""
    analytics.execute(f"alter table {VOICE.table} drop constraint {VOICE.rules_constraint}")
    try:
        with (
            psycopg.connect(stack.analytics_dsn, autocommit=True) as conn,
            pytest.raises(RuntimeError, match=f"value-rule constraints {VOICE.rules_constraint}:"),
        ):
            prepare_session(conn)
    finally:
        stack.stack.bootstrap()
    names = {kind.rules_constraint for kind in KINDS.values()}
    with psycopg.connect(stack.analytics_dsn, autocommit=True) as conn:
        prepare_session(conn)
        found = conn.execute(
            "select conname from pg_constraint where conname = any(%s)", (list(names),)
        ).fetchall()
    assert {row[0] for row in found} == names


def test_copy_body_numbers_physical_lines() -> None:
    lines = [b"h", b"r1", b"r2", b"r3"]
    assert copy_body("f.csv", lines) == b"f.csv,2,r1\nf.csv,3,r2\nf.csv,4,r3\n"
    assert copy_body("f.csv", [b"h"]) == b""
    many = [b"h"] + [b"x"] * 2500
    assert copy_body("f", many).splitlines()[-1] == b"f,2501,x"


# -- landing -----------------------------------------------------------------------------------


def test_sftp_reads_whole_files_whatever_their_size_and_the_hint(stack, cdr_dir) -> None:
    """One request per small file, prefetch for a large one, and the size hint (the listed
    size) never cuts a file short: a file that grew since its listing is read whole."""
    directory, path = cdr_dir
    sizes = [0, 1, 90_000, READ_REQUEST_SIZE - 1, READ_REQUEST_SIZE, READ_REQUEST_SIZE + 1]
    sizes += [2 * READ_REQUEST_SIZE, 3_000_000]
    for size in sizes:
        (path / f"f{size}").write_bytes(os.urandom(size))
    with CdrSftp(stack.sftp_url, directory) as sftp:
        for size in sizes:
            content = (path / f"f{size}").read_bytes()
            for hint in {0, size, max(0, size - 5000)}:
                assert sftp.read(f"f{size}", hint) == content, (size, hint)


def test_generated_files_land_exactly(stack, cdr_dir) -> None:
    directory, _ = cdr_dir
    run = config(datetime(2031, 1, 1), pairs=3, rows=150, whole_second_share=0.3)
    files = list(cdr_files(run))
    upload_cdr_files(run, stack.sftp_url, directory)
    with CdrLoader(settings_for(stack, directory), progress=False) as loader:
        assert loader.run_once()
    assert landed_counts(stack) == {name: 150 for name, _ in files}
    files_rows = query(
        stack,
        "select file_name, kind, size_bytes, sha256, rows_landed, rows_rejected,"
        " first_event_at is not null from cdr_data.files",
    )
    assert {r[0] for r in files_rows} == {name for name, _ in files}
    for name, kind, size, _sha, landed, rejected, has_times in files_rows:
        assert (kind, landed, rejected, has_times) == (kind_of(name).name, 150, 0, True)
        assert size == len(dict(files)[name])
    assert query(stack, "select count(*) from cdr_data.rejected_rows") == [(0,)]
    # Every value arrived as written, both timestamp forms included.
    name, content = files[0]
    rows = list(csv.reader(io.StringIO(content.decode())))[1:]
    assert any("." not in r[-1] for r in rows) and any("." in r[-1] for r in rows)
    db = query(
        stack,
        "select msisdn, tower_id::text, up_bytes::text, down_bytes::text, data_type, ip_address,"
        " website_url, event_datetime from cdr_data.data_records where source_file = %s"
        " order by line_no",
        name,
    )
    expected = [(*r[:7], datetime.fromisoformat(r[7])) for r in rows]
    assert db == expected


def test_file_still_being_written_is_not_taken_early(stack, cdr_dir) -> None:
    directory, path = cdr_dir
    name, content = generated(datetime(2031, 2, 1), pairs=1, rows=300)[0]
    cut = content.index(b"\r\n", len(content) // 2) + 5  # in the middle of a line
    target = path / name
    target.write_bytes(content[:cut])
    with CdrLoader(settings_for(stack, directory), progress=False) as loader:
        first, second = loader.poll_once(), loader.poll_once()
        assert (first.waiting, second.incomplete) == (1, 1)
        assert landed_counts(stack) == {}
        assert query(stack, "select count(*) from cdr_data.files") == [(0,)]
        with target.open("ab") as handle:
            handle.write(content[cut:])
        assert loader.poll_once().landed == []  # the size changed: wait for it to settle
        landed = loader.poll_once().landed
    assert [(x.file_name, x.rows_landed) for x in landed] == [(name, 300)]
    assert landed_counts(stack) == {name: 300}


def test_metrics_count_files_rows_rejects_and_the_backlog(stack, cdr_dir) -> None:
    """The Prometheus metrics: files by outcome, rows, rejects, and the pending files and lag
    that a file waiting for its last line keeps up until it is complete. The LF file without
    quotes takes the COPY path."""
    directory, path = cdr_dir
    v = "0712345678901,12,voice,0712345678902,60,2031-02-15 00:00:01"
    good, bad, waiting = (f"cdr_voice_20310215_{t}.csv" for t in ("000000", "000320", "000640"))
    (path / good).write_bytes(csv_bytes(VOICE_HEADER, [v, v, v], "\n"))
    (path / bad).write_bytes(csv_bytes(VOICE_HEADER, [v, v.replace(",voice,", ",fax,")]))
    content = csv_bytes(VOICE_HEADER, [v, v])
    (path / waiting).write_bytes(content[:-2])  # the last line has no ending yet
    os.utime(path / waiting, (time.time() - 100, time.time() - 100))
    with CdrLoader(settings_for(stack, directory), progress=False) as loader:
        loader.poll_once()
        landed = {x.file_name: (x.path, x.rows_landed) for x in loader.poll_once().landed}
        sample = loader.metrics.registry.get_sample_value
        assert landed == {good: ("copy", 3), bad: ("lines", 1)}
        assert sample("cdr_loader_files_total", {"kind": "voice", "outcome": "landed"}) == 2
        assert sample("cdr_loader_rows_landed_total", {"kind": "voice"}) == 4
        assert sample("cdr_loader_rows_rejected_total", {"kind": "voice"}) == 1
        assert sample("cdr_loader_pending_files", {}) == 1
        assert sample("cdr_loader_lag_seconds", {}) >= 100
        assert loader.poll_once().incomplete == 0  # known incomplete: not read again...
        assert sample("cdr_loader_lag_seconds", {}) >= 100  # ...and still lagging
        (path / waiting).write_bytes(content)
        loader.poll_once()
        assert [x.file_name for x in loader.poll_once().landed] == [waiting]
        assert sample("cdr_loader_pending_files", {}) == 0
        assert sample("cdr_loader_lag_seconds", {}) == 0
    assert landed_counts(stack) == {good: 3, bad: 1, waiting: 2}


def test_reuploaded_file_same_is_skipped_changed_is_quarantined(stack, cdr_dir, caplog) -> None:
    """A landed file uploaded again: the same bytes are skipped; other bytes are a conflict, the
    new version quarantined whole in cdr_data.file_conflicts and the landed one kept (its rows
    were published: raw and HVS must agree, docs/failure-handling.md)."""
    directory, path = cdr_dir
    name = "cdr_voice_20310301_000000.csv"
    good = "0712345678901,12,voice,0712345678902,60,2031-03-01 00:00:01"
    bad = "0712345678901,12,telepathy,0712345678902,60,2031-03-01 00:00:02"
    first = csv_bytes(VOICE_HEADER, [good, bad, good])
    (path / name).write_bytes(first)
    with CdrLoader(settings_for(stack, directory), progress=False) as loader:
        assert loader.run_once()
        assert landed_counts(stack) == {name: 2}
        # Uploaded again, same bytes: a new modification time, the same checksum.
        os.utime(path / name, (time.time() + 10, time.time() + 10))
        again = loader.poll_once().landed + loader.poll_once().landed
        assert [x.outcome for x in again] == ["skipped"]
        changed = csv_bytes(VOICE_HEADER, [good, good, good, good])
        (path / name).write_bytes(changed)
        os.utime(path / name, (time.time() + 20, time.time() + 20))
        with caplog.at_level("WARNING"):
            conflict = loader.poll_once().landed + loader.poll_once().landed
    assert [(x.outcome, x.rows_landed) for x in conflict] == [("conflict", 0)]
    assert "quarantined" in caplog.text
    assert landed_counts(stack) == {name: 2}
    assert query(stack, "select count(*) from cdr_data.rejected_rows") == [(1,)]
    assert query(stack, "select rows_landed, sha256 from cdr_data.files") == [
        (2, sha256_hex(first))
    ]
    assert query(stack, "select file_name, sha256 from cdr_data.file_conflicts") == [
        (name, conflict[0].sha256)
    ]


def test_a_file_rejected_whole_is_replaced_by_a_good_upload(stack, cdr_dir) -> None:
    """Nothing of a file rejected as a whole (here: its header) was landed or published, so a
    corrected upload under the same name replaces it."""
    directory, path = cdr_dir
    name = "cdr_voice_20310302_000000.csv"
    good = "0712345678901,12,voice,0712345678902,60,2031-03-02 00:00:01"
    (path / name).write_bytes(csv_bytes("not,a,header", [good]))
    with CdrLoader(settings_for(stack, directory), progress=False) as loader:
        assert loader.run_once()
        (path / name).write_bytes(csv_bytes(VOICE_HEADER, [good, good]))
        os.utime(path / name, (time.time() + 20, time.time() + 20))
        replaced = loader.poll_once().landed + loader.poll_once().landed
    assert [(x.outcome, x.rows_landed) for x in replaced] == [("replaced", 2)]
    assert landed_counts(stack) == {name: 2}
    assert query(stack, "select count(*) from cdr_data.rejected_rows") == [(0,)]


def test_a_changed_file_that_kept_size_and_mtime_is_found_by_a_rescan(stack, cdr_dir) -> None:
    """A re-upload that keeps the length and the old modification time (`sftp put -p`) is not
    read again by a plain run; `rescan` reads every file and the checksum finds the change (a
    conflict: quarantined, the landed version kept)."""
    directory, path = cdr_dir
    name = "cdr_voice_20310310_000000.csv"
    v = "0712345678901,12,voice,0712345678902,60,2031-03-10 00:00:01"
    (path / name).write_bytes(csv_bytes(VOICE_HEADER, [v, v]))
    stamp = time.time() - 600
    os.utime(path / name, (stamp, stamp))
    with CdrLoader(settings_for(stack, directory), progress=False) as loader:
        assert loader.run_once()
    (path / name).write_bytes(csv_bytes(VOICE_HEADER, [v, v.replace(",60,", ",61,")]))
    os.utime(path / name, (stamp, stamp))
    durations = "select call_duration_sec from cdr_data.voice_records order by line_no"
    with CdrLoader(settings_for(stack, directory), progress=False) as loader:
        assert loader.run_once()
        assert loader.poll_once().landed == []
    assert query(stack, durations) == [(60,), (60,)]  # not read again: size and mtime matched
    with CdrLoader(settings_for(stack, directory, rescan=True), progress=False) as loader:
        loader.poll_once()
        assert [x.outcome for x in loader.poll_once().landed] == ["conflict"]
        assert loader.poll_once().landed == []  # once per run
    assert query(stack, durations) == [(60,), (60,)]  # the landed version is kept
    assert query(stack, "select file_name from cdr_data.file_conflicts") == [(name,)]


def test_bad_rows_are_quarantined_with_their_reason(stack, cdr_dir, caplog) -> None:
    directory, path = cdr_dir
    ok = "0712345678901,7,150000,250000,video,10.0.0.1,https://x.org/,2031-04-01 00:00:01.250000"
    data_rows = [
        ok,  # 2
        ok.replace(".250000", ""),  # 3: whole second form
        ok.rsplit(",", 1)[0],  # 4
        ok.replace("150000", "12x45"),  # 5
        ok.replace("2031-04-01 00:00:01.250000", "2031-13-45 25:61:00"),  # 6
        ok.replace("video", "hologram"),  # 7
        ok.replace(",250000,", ",-250000,"),  # 8
        ok.replace(",7,", ",2001,"),  # 9
        ok.replace("0712345678901", "12345"),  # 10
        ok.replace("0712345678901", ""),  # 11
        ok.replace("https://x.org/", '"https://x.org/a,b"'),  # 12: quoted comma, good
        "",  # 13
        ok.replace("https://x.org/", '"https://x.org/"x'),  # 14
        ok.replace("150000", "99999999999999999999"),  # 15
    ]
    data_name = "cdr_data_20310401_000000.csv"
    (path / data_name).write_bytes(csv_bytes(DATA_HEADER, data_rows, "\n"))
    # Only value problems, no quotes, CRLF: COPY is tried, the constraints refuse a row, and
    # the line path lands the file.
    v = "0712345678901,12,voice,0712345678902,60,2031-04-01 00:00:01"
    voice_rows = [
        v,  # 2
        v.replace(",voice,", ",telepathy,"),  # 3
        v.replace(",60,", ",9999999,"),  # 4
        v.replace(",60,", ",-3,"),  # 5
        v.replace("0712345678902", "07123456789ab"),  # 6
        v.replace("2031-04-01 00:00:01", "1970-01-01 00:00:00"),  # 7
        v,  # 8
    ]
    voice_name = "cdr_voice_20310401_000000.csv"
    (path / voice_name).write_bytes(csv_bytes(VOICE_HEADER, voice_rows))
    utf8_name = "cdr_voice_20310401_000320.csv"
    (path / utf8_name).write_bytes(csv_bytes(VOICE_HEADER, [v]) + b"07\xff,1\r\n" + v.encode())
    (path / utf8_name).write_bytes((path / utf8_name).read_bytes() + b"\r\n")
    # Event times that Postgres' timestamp input would take but the contract's form is not.
    t = "2031-04-01 00:00:01"
    times_rows = [
        v,  # 2
        v.replace(t, "now"),  # 3
        v.replace(t, "2031-04-01"),  # 4
        v.replace(t, t + "+05"),  # 5
        v.replace(t, "04/01/2031 00:00:01"),  # 6
        v.replace(t, "2031-04-01T00:00:01.5"),  # 7: ISO separator, short fraction: good
    ]
    times_name = "cdr_voice_20310401_000640.csv"
    (path / times_name).write_bytes(csv_bytes(VOICE_HEADER, times_rows))
    with (
        caplog.at_level("INFO", logger="ingestion.cdr_landing"),
        CdrLoader(settings_for(stack, directory), progress=False) as loader,
    ):
        loader.poll_once()  # first sight
        paths = {x.file_name: x.path for x in loader.poll_once().landed}
        assert loader.run_once()  # nothing left to do
    causes = {
        r.file: r.cause for r in caplog.records if r.getMessage() == "file needs the line path"
    }
    assert paths == dict.fromkeys([data_name, voice_name, utf8_name, times_name], "lines")
    assert data_name not in causes  # it has quotes: the line path at once
    assert "voice_records_value_rules" in causes[voice_name]  # COPY tried, the table refused
    assert causes[times_name] == "an event time not of the written form"  # COPY not tried
    reasons = dict(
        query(
            stack,
            "select line_no, reason from cdr_data.rejected_rows where source_file = %s",
            data_name,
        )
    )
    assert {k: reasons[k].split(":")[0] for k in reasons} == {
        4: "wrong column count",
        5: "bad number",
        6: "bad timestamp",
        7: "unknown type",
        8: "negative value",
        9: "out of range",
        10: "bad value",
        11: "missing value",
        13: "empty line",
        14: "bad CSV",
        15: "bad number",
    }
    assert reasons[5] == "bad number: up_bytes='12x45'"
    assert reasons[8] == "negative value: down_bytes=-250000"
    raw = query(
        stack,
        "select raw_line from cdr_data.rejected_rows where source_file = %s and line_no = 7",
        data_name,
    )
    assert raw == [(data_rows[5],)]
    landed = query(
        stack,
        "select line_no, website_url, event_datetime from cdr_data.data_records"
        " where source_file = %s order by line_no",
        data_name,
    )
    assert landed == [
        (2, "https://x.org/", datetime(2031, 4, 1, 0, 0, 1, 250000)),
        (3, "https://x.org/", datetime(2031, 4, 1, 0, 0, 1)),
        (12, "https://x.org/a,b", datetime(2031, 4, 1, 0, 0, 1, 250000)),
    ]
    voice_reasons = dict(
        query(
            stack,
            "select line_no, reason from cdr_data.rejected_rows where source_file = %s",
            voice_name,
        )
    )
    assert voice_reasons == {
        3: "unknown type: call_type='telepathy' (expected one of voice|video)",
        4: "out of range: call_duration_sec=9999999 (expected 1..1800)",
        5: "negative value: call_duration_sec=-3",
        6: "bad value: dest_nr='07123456789ab' (13 digits expected)",
        7: "out of range: start_time=1970-01-01 00:00:00 (expected 2000-01-01..2100-01-01)",
    }
    assert query(
        stack,
        "select rows_landed, rows_rejected from cdr_data.files where file_name = %s",
        voice_name,
    ) == [(2, 5)]
    assert query(
        stack,
        "select line_no, reason from cdr_data.rejected_rows where source_file = %s",
        utf8_name,
    ) == [(3, "not valid UTF-8")]
    times_reasons = dict(
        query(
            stack,
            "select line_no, reason from cdr_data.rejected_rows where source_file = %s",
            times_name,
        )
    )
    assert times_reasons == {
        3: "bad timestamp: start_time='now'",
        4: "bad timestamp: start_time='2031-04-01'",
        5: "bad timestamp: start_time='2031-04-01 00:00:01+05'",
        6: "bad timestamp: start_time='04/01/2031 00:00:01'",
    }
    assert query(
        stack,
        "select line_no, start_time from cdr_data.voice_records where source_file = %s",
        times_name,
    ) == [(2, datetime(2031, 4, 1, 0, 0, 1)), (7, datetime(2031, 4, 1, 0, 0, 1, 500000))]
    assert landed_counts(stack) == {data_name: 3, voice_name: 2, utf8_name: 2, times_name: 2}


def test_the_copy_path_and_the_line_path_agree(stack, cdr_dir) -> None:
    """The same value problems give the same reasons whether COPY was tried first or not."""
    directory, path = cdr_dir
    v = "0712345678901,12,voice,0712345678902,60,2031-05-01 00:00:01"
    rows = [v, v.replace(",voice,", ",fax,"), v.replace(",60,", ",0,"), v.replace(",12,", ",-1,")]
    plain, quoted = "cdr_voice_20310501_000000.csv", "cdr_voice_20310501_000320.csv"
    (path / plain).write_bytes(csv_bytes(VOICE_HEADER, rows))
    (path / quoted).write_bytes(csv_bytes(VOICE_HEADER, [*rows, v.replace(",voice,", ',"voice",')]))
    good = "cdr_voice_20310501_000640.csv"
    (path / good).write_bytes(csv_bytes(VOICE_HEADER, [v, v]))
    with CdrLoader(settings_for(stack, directory), progress=False) as loader:
        loader.poll_once()
        by_path = {x.file_name: x.path for x in loader.poll_once().landed}
    # COPY tries the plain file and the table's constraints refuse it; the line path lands it
    assert by_path == {plain: "lines", quoted: "lines", good: "copy"}
    reasons = query(
        stack,
        "select source_file, line_no, reason from cdr_data.rejected_rows order by 1, 2",
    )
    assert [(n, r) for f, n, r in reasons if f == plain] == [
        (n, r) for f, n, r in reasons if f == quoted
    ]
    assert len(reasons) == 6
    assert landed_counts(stack) == {plain: 1, quoted: 2, good: 2}


def test_files_that_are_not_cdr_files_are_rejected_whole(stack, cdr_dir) -> None:
    directory, path = cdr_dir
    (path / "notes.txt").write_text("hello\n")
    wrong = "cdr_data_20310601_000000.csv"
    (path / wrong).write_bytes(csv_bytes(VOICE_HEADER, ["a,b,c,d,e,f"]))
    junk = "cdr_voice_20310601_000000.csv"
    (path / junk).write_bytes(b"PK\x03\x04 binary junk\n")
    good_name, good = generated(datetime(2031, 6, 1, 0, 3, 20), pairs=1, rows=10)[1]
    (path / good_name).write_bytes(good)
    with CdrLoader(settings_for(stack, directory), progress=False) as loader:
        assert loader.run_once()
        assert loader.run_once()  # nothing is rejected twice
    rejected = query(
        stack, "select source_file, line_no, reason from cdr_data.rejected_rows order by 1"
    )
    assert [(f, n) for f, n, _ in rejected] == [(wrong, 0), (junk, 0), ("notes.txt", 0)]
    reasons = {f: r for f, _, r in rejected}
    assert reasons[wrong] == "not a CDR data file: it has the voice header"
    assert reasons[junk].startswith("not a CDR voice file: header ")
    assert reasons["notes.txt"].startswith("not a CDR file: the name does not match")
    assert landed_counts(stack) == {good_name: 10}
    assert query(
        stack, "select file_name, rows_landed, rows_rejected from cdr_data.files order by 1"
    ) == sorted([(wrong, 0, 1), (good_name, 10, 0), (junk, 0, 1)])


# -- crashes, signals and outages --------------------------------------------------------------


def test_killed_in_the_middle_of_a_file_lands_nothing_and_the_rerun_lands_it_once(
    stack, cdr_dir
) -> None:
    directory, path = cdr_dir
    name, content = generated(datetime(2031, 7, 1), pairs=1, rows=400)[0]
    (path / name).write_bytes(content)
    env = loader_env(stack, directory)
    argv = [sys.executable, "-m", "ingestion.cdr_loader", "--once", "--no-publish"]
    # Hold the files table so that the loader stops inside its transaction, after its rows.
    blocker = psycopg.connect(stack.analytics_dsn)
    try:
        blocker.execute("lock table cdr_data.files in exclusive mode")
        proc = subprocess.Popen(
            argv, env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for(
                lambda: query(
                    stack,
                    "select count(*) from pg_stat_activity where application_name = 'cdr_loader'"
                    " and wait_event_type = 'Lock'",
                )[0][0],
                "the loader to block inside its transaction",
            )
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    finally:
        blocker.rollback()
        blocker.close()
    wait_for(
        lambda: (
            not query(stack, "select 1 from pg_stat_activity where application_name = 'cdr_loader'")
        ),
        "the killed loader's session to end",
    )
    assert landed_counts(stack) == {}
    assert query(stack, "select count(*) from cdr_data.files") == [(0,)]
    rerun = subprocess.run(argv, env=env, cwd=PROJECT_ROOT, capture_output=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert landed_counts(stack) == {name: 400}
    assert query(stack, "select count(*) from cdr_data.files") == [(1,)]


def test_sigterm_finishes_the_files_in_hand_then_exits_cleanly(stack, cdr_dir, tmp_path) -> None:
    directory, path = cdr_dir
    port = free_port()
    env = loader_env(stack, directory, CDR_POLL_INTERVAL="0.2", CDR_METRICS_PORT=str(port))
    first, second = generated(datetime(2031, 8, 1), pairs=2, rows=50)[::2]
    log_path = tmp_path / "loader.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ingestion.cdr_loader", "--no-publish"],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    blocker = psycopg.connect(stack.analytics_dsn)
    try:
        (path / first[0]).write_bytes(first[1])
        wait_for(lambda: landed_counts(stack) == {first[0]: 50}, "the first file to land")

        def landed_metric() -> bool:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.HTTPError:
                return False
            return 'cdr_loader_rows_landed_total{kind="data"} 50.0' in text

        wait_for(landed_metric, "the metrics to count the landed rows")
        # Stop the loader inside the second file's transaction, then ask it to stop.
        blocker.execute("lock table cdr_data.files in exclusive mode")
        (path / second[0]).write_bytes(second[1])
        wait_for(
            lambda: query(
                stack,
                "select count(*) from pg_stat_activity where application_name = 'cdr_loader'"
                " and wait_event_type = 'Lock'",
            )[0][0],
            "the loader to be inside the second file",
        )
        proc.send_signal(signal.SIGTERM)
        wait_for(
            lambda: "stopping after the files in hand" in log_path.read_text(),
            "the loader to take the signal while the file is in hand",
        )
        blocker.rollback()
        assert proc.wait(timeout=30) == 0
    finally:
        blocker.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert landed_counts(stack) == {first[0]: 50, second[0]: 50}
    assert "cdr loader stopped" in log_path.read_text()


def _sftp_sessions(stack) -> list[int]:
    """Pids of the per-connection sshd processes of the test stack's SFTP server."""
    listener = int(stack.stack.sshd_pidfile.read_text().split()[0])
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == listener:
                children.append(int(entry.name))
    return children


def test_follow_survives_a_postgres_restart_and_an_sftp_disconnect(stack, cdr_dir) -> None:
    directory, path = cdr_dir
    pairs = generated(datetime(2031, 9, 1), pairs=3, rows=40)
    loader = CdrLoader(settings_for(stack, directory), progress=False)
    thread = threading.Thread(target=loader.follow, daemon=True)
    thread.start()
    try:
        for name, content in pairs[:2]:
            (path / name).write_bytes(content)
        wait_for(lambda: len(landed_counts(stack)) == 2, "the first pair to land")

        stack.stack.stop_postgres()
        try:
            for name, content in pairs[2:4]:
                (path / name).write_bytes(content)
            wait_for(
                lambda: loader.metrics.registry.get_sample_value(
                    "cdr_loader_errors_total", {"where": "postgres"}
                ),
                "the loader to notice Postgres is gone",
            )
        finally:
            stack.stack.start_postgres()
        wait_for(lambda: len(landed_counts(stack)) == 4, "the second pair to land", 60)

        sessions = _sftp_sessions(stack)
        assert sessions
        for pid in sessions:
            os.kill(pid, signal.SIGTERM)
        for name, content in pairs[4:]:
            (path / name).write_bytes(content)
        wait_for(lambda: len(landed_counts(stack)) == 6, "the third pair to land", 60)
        assert loader.metrics.registry.get_sample_value(
            "cdr_loader_errors_total", {"where": "sftp"}
        )
        assert thread.is_alive()
    finally:
        loader.stop.set()
        thread.join(timeout=30)
        loader.close()
    assert landed_counts(stack) == {name: 40 for name, _ in pairs}


# -- publishing --------------------------------------------------------------------------------


def _consume(url: str, files: set[str], want: int) -> list[dict]:
    """Messages of `files` on both CDR topics, read by a fresh group until `want` arrived."""
    seen: list[dict] = []
    group = f"cdr-test-{uuid.uuid4().hex[:8]}"
    with open_consumer(url, [CDR_DATA_TOPIC, CDR_VOICE_TOPIC], group) as consumer:
        deadline = time.monotonic() + 60
        while len(seen) < want and time.monotonic() < deadline:
            batch = consumer.poll(max_messages=5000, timeout=0.5)
            for message in batch:
                value = json.loads(message.value)
                if value["source_file"] in files:
                    assert message.key == value["msisdn"].encode()
                    assert message.topic == f"cdr-{kind_of(value['source_file']).name}"
                    seen.append(value)
            consumer.commit(batch)
        # Anything beyond `want` (a duplicate) would show up within a short extra poll.
        for message in consumer.poll(max_messages=5000, timeout=1.0):
            value = json.loads(message.value)
            if value["source_file"] in files:
                seen.append(value)
    return seen


@pytest.mark.parametrize("backend", ["redis", "kafka"])
def test_landed_rows_are_published_once_with_stable_event_ids(
    stack, cdr_dir, request, backend
) -> None:
    directory, path = cdr_dir
    url = stack.stream_url if backend == "redis" else request.getfixturevalue("kafka_url")
    start = datetime(2032, 1, 1) + timedelta(days=30 * (backend == "kafka"))
    files = generated(start, pairs=2, rows=60)
    bad_name, _ = files[0]
    names = {name for name, _ in files}
    for name, content in files:
        (path / name).write_bytes(content)
    # One bad row: it is not published.
    content = dict(files)[bad_name].replace(b",video,", b",hologram,", 1)
    (path / bad_name).write_bytes(content)
    with CdrLoader(settings_for(stack, directory, stream_url=url, publish=True)) as loader:
        assert loader.run_once()
        landed = {
            f"{f}:{n}"
            for f, n in query(
                stack,
                "select source_file, line_no from cdr_data.data_records union all"
                " select source_file, line_no from cdr_data.voice_records",
            )
        }
        assert len(landed) == 60 * 4 - 1
        assert query(stack, "select count(*) from cdr_data.files where published_at is null") == [
            (0,)
        ]
        events = _consume(url, names, len(landed))
        assert Counter(e["event_id"] for e in events) == Counter(landed)
        sample = next(e for e in events if e["event_id"] == f"{files[1][0]}:2")
        first_row = files[1][1].split(b"\r\n")[1].decode().split(",")
        [(loaded_at,)] = query(
            stack,
            "select to_char(loaded_at at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')"
            " from cdr_data.voice_records where source_file = %s and line_no = 2",
            files[1][0],
        )
        assert sample == {
            "event_id": f"{files[1][0]}:2",
            "source_file": files[1][0],
            "line_no": 2,
            "msisdn": first_row[0],
            "tower_id": int(first_row[1]),
            "call_type": first_row[2],
            "dest_nr": first_row[3],
            "call_duration_sec": int(first_row[4]),
            "start_time": datetime.fromisoformat(first_row[5]).strftime("%Y-%m-%d %H:%M:%S.%f"),
            "loaded_at": loaded_at,  # naive UTC: the consumers' landing time on any backend
        }
        # A crash between commit and publish: the file is published again, same event ids.
        query(
            stack,
            "update cdr_data.files set published_at = null where file_name = %s returning 1",
            bad_name,
        )
        assert loader.poll_once().published == 1
    again = _consume(url, {bad_name}, 2 * 59)
    assert Counter(e["event_id"] for e in again) == Counter(
        {e: 2 for e in landed if e.startswith(bad_name)}
    )


def test_a_stream_outage_does_not_lose_the_publish(stack, cdr_dir, redis_client) -> None:
    directory, path = cdr_dir
    files = generated(datetime(2032, 6, 1), pairs=1, rows=20)
    for name, content in files:
        (path / name).write_bytes(content)
    dead = f"redis://127.0.0.1:{free_port()}/1"
    with CdrLoader(settings_for(stack, directory, stream_url=dead, publish=True)) as loader:
        assert not loader.run_once()  # landed, but the publish could not complete
    assert len(landed_counts(stack)) == 2
    assert query(stack, "select count(*) from cdr_data.files where published_at is null") == [(2,)]
    with CdrLoader(settings_for(stack, directory, publish=True)) as loader:
        assert loader.run_once()
    assert query(stack, "select count(*) from cdr_data.files where published_at is null") == [(0,)]
    events = _consume(stack.stream_url, {n for n, _ in files}, 40)
    assert len({e["event_id"] for e in events}) == len(events) == 40


def test_published_json_carries_free_text_and_nulls_intact(stack, cdr_dir, redis_client) -> None:
    directory, path = cdr_dir
    name = "cdr_data_20320701_000000.csv"
    url = 'https://x.org/?q="a\\b",\u00e9'
    row = [
        "0712345678901", "7", "150000", "250000", "text", "", url, "2032-07-01 00:00:01",
    ]  # fmt: skip
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerows([DATA.column_names, row])
    (path / name).write_bytes(buffer.getvalue().encode())
    with CdrLoader(settings_for(stack, directory, publish=True)) as loader:
        assert loader.run_once()
    (event,) = _consume(stack.stream_url, {name}, 1)
    assert event["website_url"] == url
    assert event["ip_address"] is None
    assert event["event_datetime"] == "2032-07-01 00:00:01.000000"


def test_the_loader_benchmark_runs_and_reports_its_ratios() -> None:
    """`make bench` must keep working: a tiny run of bench.cdr_loader (its own stack) lands
    every row on every path it measures (it asserts so) and prints the ratios."""
    tiny = ["--pairs", "2", "--rows", "50", "--repeat", "1", "--baseline-pairs", "1"]
    out = subprocess.run(
        [sys.executable, "-m", "bench.cdr_loader", *tiny],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert "4 files, 200 rows" in out
    assert "loader / ceiling" in out and "loader / row-by-row" in out
    assert "concurrent psql sessions" in out and "loader / 2 psql sessions" in out


def test_the_loader_lands_and_publishes_as_its_own_postgres_role_and_redis_user(
    stack, cdr_dir, redis_client
) -> None:
    """Least privilege suffices: the loader's role (raw schemas) and Redis user (XADD to the
    CDR streams) land and publish every file."""
    directory, _ = cdr_dir
    run = config(datetime(2031, 2, 1), pairs=2, rows=40)
    files = list(cdr_files(run))
    upload_cdr_files(run, stack.sftp_url, directory)
    own = settings_for(
        stack,
        directory,
        analytics_dsn=stack.settings.pg_dsn("wtc_analytics", "loader"),
        stream_url=stack.settings.redis_url_for("cdr_loader", 1),
        publish=True,
    )
    with CdrLoader(own, progress=False) as loader:
        assert loader.run_once()
    assert landed_counts(stack) == {name: 40 for name, _ in files}
    streams = redis.Redis.from_url(stack.stream_url)
    published = sum(streams.xlen(f"stream:{t}") for t in (CDR_DATA_TOPIC, CDR_VOICE_TOPIC))
    assert published == 40 * len(files)
