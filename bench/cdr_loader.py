"""Benchmark: the CDR loader's rows/s from SFTP into Postgres against two baselines, one run.

- ceiling: `psql \\copy` of the same files from local disk into the raw tables themselves
  (primary key, value-rule constraints, BRIN time indexes), one `\\copy` (one transaction) per
  file. The raw tables need the file name and line number of every row, which a CDR file does
  not carry, so each file is first written out (untimed) with them prefixed to its lines: the
  ceiling does nothing but COPY. The ceiling is one psql session, as a person would run it;
  the same COPY split over as many concurrent sessions as the loader has workers is reported
  too, so the loader's use of both cores is not mistaken for a lead over COPY;
- the loader: `CdrLoader.poll_once()` over OpenSSH SFTP into the raw tables, each file
  downloaded, checked and landed in its own transaction, publishing off;
- baseline: a row-by-row loader (read over SFTP, csv module, one INSERT per row, one
  transaction per file), on a subset of the files because it is slow.

For context, also `psql \\copy` of the files as they are into plain tables of the CSV columns
(no key, constraint or index): what the raw layout itself costs. Each measurement runs
`--repeat` times, interleaved, and the best run counts (the machine is shared). Also reported:
publishing the landed rows to Redis Streams. Starts its own stack.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import psycopg

from common.logs import setup_logging
from ingestion.cdr_format import KINDS, kind_of, split_lines
from ingestion.cdr_landing import copy_body
from ingestion.cdr_loader import CdrLoader, LoaderSettings
from ingestion.cdr_sftp import CdrSftp
from ingestion.generators.cdr import CdrConfig, cdr_files
from ops.stack import throwaway

log = logging.getLogger("bench.cdr_loader")

RAW_TABLES = "cdr_data.files, cdr_data.data_records, cdr_data.voice_records, cdr_data.rejected_rows"


def run_psql(dsn: str, script: Path, lines: list[str], sessions: int = 1) -> float:
    """Seconds for `sessions` concurrent psql sessions sharing `lines` (`\\copy` commands)
    round robin."""
    scripts = [script.with_suffix(f".{i}.sql") for i in range(sessions)]
    for i, path in enumerate(scripts):
        path.write_text("".join(lines[i::sessions]))
    started = time.perf_counter()
    procs = [
        subprocess.Popen(["psql", dsn, "-q", "-v", "ON_ERROR_STOP=1", "-f", str(path)])
        for path in scripts
    ]
    codes = [proc.wait() for proc in procs]
    elapsed = time.perf_counter() - started
    if any(codes):
        raise RuntimeError(f"psql failed: exit codes {codes}")
    return elapsed


def ceiling_copy(dsn: str, local: Path, names: list[str], sessions: int = 1) -> float:
    """Seconds for psql `\\copy` of every file, prefixed with its keys, into the raw tables
    (in `sessions` concurrent psql sessions)."""
    keyed = local / "keyed"
    keyed.mkdir(exist_ok=True)
    lines = []
    for name in names:
        kind = kind_of(name)
        path = keyed / name
        if not path.exists():
            path.write_bytes(copy_body(name, split_lines((local / name).read_bytes())))
        cols = ", ".join(kind.column_names)
        lines.append(
            f"\\copy {kind.table} (source_file, line_no, {cols}) from '{path}' (format csv)\n"
        )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"truncate {RAW_TABLES}")
        conn.execute("checkpoint")
    return run_psql(dsn, local / "ceiling.sql", lines, sessions)


def plain_copy(dsn: str, local: Path, names: list[str]) -> float:
    """Seconds for psql `\\copy` of every file as it is into plain tables of its columns."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create schema if not exists bench")
        for kind in KINDS.values():
            table = f"bench.plain_{kind.name}"
            conn.execute(f"drop table if exists {table}")
            columns = ", ".join(f"{c.name} {c.pg_type}" for c in kind.columns)
            conn.execute(f"create table {table} ({columns})")
        conn.execute("checkpoint")
    lines = [
        f"\\copy bench.plain_{kind_of(n).name} from '{local / n}' (format csv, header true)\n"
        for n in names
    ]
    return run_psql(dsn, local / "plain.sql", lines)


def loader_run(settings: LoaderSettings, dsn: str) -> tuple[float, int]:
    """Seconds and rows of one loader poll that lands every file (after a listing poll)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"truncate {RAW_TABLES}")
        conn.execute("checkpoint")
    with CdrLoader(settings, progress=False) as loader:
        loader.poll_once()  # first sight of every file; the timed poll takes them
        started = time.perf_counter()
        result = loader.poll_once()
        elapsed = time.perf_counter() - started
    return elapsed, result.rows_landed


def publish_run(settings: LoaderSettings, dsn: str) -> tuple[float, int]:
    """Seconds and rows of publishing every landed file again (as after a crash)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("update cdr_data.files set published_at = null where rows_landed > 0")
        rows = conn.execute("select sum(rows_landed) from cdr_data.files").fetchone()[0]
    with CdrLoader(settings.model_copy(update={"publish": True}), progress=False) as loader:
        started = time.perf_counter()
        loader.poll_once()
        elapsed = time.perf_counter() - started
    return elapsed, int(rows)


def row_by_row(settings: LoaderSettings, dsn: str, names: list[str]) -> tuple[float, int]:
    """The baseline: read over SFTP, parse with csv, INSERT row by row, commit per file."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"truncate {RAW_TABLES}")
        conn.execute("checkpoint")
    rows = 0
    with CdrSftp(settings.sftp_url, settings.cdr_dir) as sftp, psycopg.connect(dsn) as conn:
        started = time.perf_counter()
        for name in names:
            kind = kind_of(name)
            cols = ", ".join(kind.column_names)
            marks = ", ".join(["%s"] * (len(kind.columns) + 2))
            sql = f"insert into {kind.table} (source_file, line_no, {cols}) values ({marks})"
            reader = csv.reader(io.StringIO(sftp.read(name).decode()))
            next(reader)
            with conn.cursor() as cur:
                for line_no, row in enumerate(reader, start=2):
                    cur.execute(sql, (name, line_no, *[v or None for v in row]))
                    rows += 1
            conn.commit()
        elapsed = time.perf_counter() - started
    return elapsed, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cdr_loader", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--pairs", type=int, default=200, help="file pairs (default 200)")
    parser.add_argument("--rows", type=int, default=1000, help="rows per file (default 1000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement, best counts")
    parser.add_argument("--workers", type=int, default=2, help="loader workers (default 2)")
    parser.add_argument(
        "--baseline-pairs", type=int, default=10, help="pairs for the row-by-row baseline"
    )
    args = parser.parse_args(argv)
    setup_logging(level="WARNING")

    config = CdrConfig(
        duration=timedelta(seconds=200 * args.pairs), rows_per_file=args.rows, seed=11
    )
    with throwaway("wtc-bench-") as stack:
        local = stack.state / "local"
        local.mkdir()
        sftp_dir = stack.s.cdr_dir / "bench"
        sftp_dir.mkdir()
        names = []
        for name, content in cdr_files(config):
            (local / name).write_bytes(content)
            (sftp_dir / name).write_bytes(content)
            names.append(name)
        total_rows = len(names) * args.rows
        dsn = stack.s.analytics_dsn
        settings = LoaderSettings(
            analytics_dsn=dsn,
            sftp_url=stack.s.sftp_url,
            stream_url=stack.s.stream_url,
            cdr_dir="bench",
            settle_seconds=0,
            publish=False,
            workers=args.workers,
        )
        single = settings.model_copy(update={"workers": 1})
        ceiling, ceiling_n, plain, loader, loader_1 = [], [], [], [], []
        for round_no in range(args.repeat):
            log.warning("round %d of %d", round_no + 1, args.repeat)
            ceiling.append(ceiling_copy(dsn, local, names))
            ceiling_n.append(ceiling_copy(dsn, local, names, sessions=args.workers))
            plain.append(plain_copy(dsn, local, names))
            seconds, rows = loader_run(settings, dsn)
            assert rows == total_rows, (rows, total_rows)
            loader.append(seconds)
            seconds, rows = loader_run(single, dsn)
            assert rows == total_rows, (rows, total_rows)
            loader_1.append(seconds)
        publish_s, published = publish_run(settings, dsn)
        subset = names[: 2 * args.baseline_pairs]
        baseline_s, baseline_rows = row_by_row(settings, dsn, subset)

    ceiling_rate = total_rows / min(ceiling)
    print(
        f"CDR loader: {len(names)} files, {total_rows} rows "
        f"(starter format), best of {args.repeat} runs"
    )
    lines = [
        ("psql \\copy into the raw tables, local disk (ceiling)", total_rows, min(ceiling)),
        (f"  the same in {args.workers} concurrent psql sessions", total_rows, min(ceiling_n)),
        (f"cdr_loader over SFTP, {args.workers} workers", total_rows, min(loader)),
        ("cdr_loader over SFTP, 1 worker", total_rows, min(loader_1)),
        (f"row-by-row INSERT over SFTP ({len(subset)} files)", baseline_rows, baseline_s),
        ("psql \\copy into plain tables (no key, check, index)", total_rows, min(plain)),
    ]
    for label, rows, seconds in lines:
        rate = rows / seconds
        print(
            f"  {label:52} {seconds:7.2f} s {rate:10,.0f} rows/s"
            f"  {rate / ceiling_rate:6.1%} of ceiling"
        )
    loader_rate = total_rows / min(loader)
    print(
        f"  loader / ceiling {loader_rate / ceiling_rate:.2f} (goal >= 0.70);"
        f" loader / {args.workers} psql sessions {loader_rate * min(ceiling_n) / total_rows:.2f};"
        f" loader / row-by-row {loader_rate / (baseline_rows / baseline_s):.1f}x;"
        f" loader / plain tables {loader_rate * min(plain) / total_rows:.2f}"
    )
    print(
        f"  publishing the landed rows to Redis Streams: {published / publish_s:,.0f} rows/s"
        f" ({published} rows, {publish_s:.2f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
