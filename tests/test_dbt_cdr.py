"""The CDR prepared layers built by dbt on real Postgres, against the macros_py oracle.

One module-scoped scenario (dbt runs are slow, so each build is asserted on many times):

1. land the first part of a realistic generated CDR set; full build (`dbt build`: every model,
   its data tests and unit tests); every mart equals its oracle row for row;
2. land the rest (whose late rows fall into windows and sessions built in step 1); incremental
   build; parity again;
3. land hand-made rows at the edges (a late row on another tower in the middle of a stored
   session, a row extending a session across runs, an event exactly on a window edge, a call
   that outlasts its session); incremental build; parity again;
4. full refresh: every mart equals what the incremental runs built; totals reconcile with raw.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from ingestion.generators.cdr import CdrConfig, cdr_files
from macros_py.records import DataRecord, Record, VoiceRecord
from macros_py.sessions import sessions_hourly, tower_sessions
from macros_py.tariffs import call_cost_zar, data_cost_zar
from macros_py.usage import usage_windows
from tests.fixtures.dbt import DbtProject, land_cdr_files, truncate_cdr

CDR_MODELS = "path:models/staging/cdr path:models/intermediate/cdr path:models/marts/cdr"
SELECT = ["--select", *CDR_MODELS.split()]
CONFIG = CdrConfig(
    profile="realistic",
    seed=5,
    subscribers=2500,
    start=datetime(2024, 1, 1, 0, 0, 0),
    duration=timedelta(hours=6),
    rows_per_file=120,
    window_seconds=300,
)
FIRST_PART_FILES = 96  # 48 windows of 5 minutes: the first 4 hours

USAGE_MARTS = {"cdr_usage_15min": "15min", "cdr_usage_30min": "30min", "cdr_usage_1h": "1h"}
USAGE_COLUMNS = (
    "window_start, msisdn, category, usage_type, events, up_bytes, down_bytes, total_bytes,"
    " seconds, cost_zar"
)


def read_records(conn: psycopg.Connection) -> list[Record]:
    data = [
        DataRecord(*row)
        for row in conn.execute(
            "select msisdn, tower_id, up_bytes, down_bytes, data_type, event_datetime,"
            " source_file, line_no from cdr_data.data_records"
        )
    ]
    calls = [
        VoiceRecord(*row)
        for row in conn.execute(
            "select msisdn, tower_id, call_type, call_duration_sec, start_time,"
            " source_file, line_no from cdr_data.voice_records"
        )
    ]
    return data + calls


def mart_rows(conn: psycopg.Connection, mart: str) -> list[tuple]:
    columns = {
        "tower_sessions": "msisdn, tower_id, session_start, session_end, interactions",
        "tower_sessions_hourly": "hour_start, msisdn, tower_id, sessions, interactions",
    }.get(mart, USAGE_COLUMNS)
    return sorted(conn.execute(f"select {columns} from prepared_layers.{mart}").fetchall())


def oracle_rows(records: list[Record]) -> dict[str, list[tuple]]:
    expected = {
        mart: sorted(
            (
                r.window_start,
                r.msisdn,
                r.category,
                r.usage_type,
                r.events,
                r.up_bytes,
                r.down_bytes,
                r.total_bytes,
                r.seconds,
                r.cost_zar,
            )
            for r in usage_windows(records, width)
        )
        for mart, width in USAGE_MARTS.items()
    }
    sessions = tower_sessions(records)
    expected["tower_sessions"] = sorted(
        (s.msisdn, s.tower_id, s.session_start, s.session_end, s.interactions) for s in sessions
    )
    expected["tower_sessions_hourly"] = sorted(
        (h.hour_start, h.msisdn, h.tower_id, h.sessions, h.interactions)
        for h in sessions_hourly(sessions)
    )
    return expected


def assert_parity(conn: psycopg.Connection, step: str) -> dict[str, list[tuple]]:
    """Every mart equals its oracle on the raw tables' current rows; returns the marts."""
    expected = oracle_rows(read_records(conn))
    built = {}
    for mart, rows in expected.items():
        built[mart] = mart_rows(conn, mart)
        assert rows, f"{step}: the oracle gives no {mart} rows: the scenario tests nothing"
        if built[mart] != rows:
            missing = sorted(set(rows) - set(built[mart]))[:5]
            extra = sorted(set(built[mart]) - set(rows))[:5]
            pytest.fail(
                f"{step}: {mart} differs from the oracle ({len(built[mart])} rows built,"
                f" {len(rows)} expected); missing {missing}; unexpected {extra}"
            )
    return built


def runs_watermark(conn: psycopg.Connection) -> datetime:
    """The runs model's high-water mark (macros/landing_marks.sql): the latest landing it has
    processed, or just before its last build's horizon if that is earlier."""
    return conn.execute(
        """
        select least(
            (select max(max_loaded_at) from intermediate.int_cdr__tower_runs),
            (select horizon - interval '1 microsecond' from prepared_layers.dbt_landing_horizons
             where model = 'intermediate.int_cdr__tower_runs')
        )
        """
    ).fetchone()[0]


def recomputed_runs(conn: psycopg.Connection, watermark: datetime) -> tuple[int, int, int, int]:
    """Runs recomputed by the last build, the msisdns they belong to, all runs, and the msisdns
    the last build had to touch: those with a row loaded after `watermark` (the runs' high-water
    mark before the build)."""
    return conn.execute(
        """
        with last_build as (
            select max(computed_at) as at from intermediate.int_cdr__tower_runs
        )
        select
            count(*) filter (where computed_at = last_build.at),
            count(distinct msisdn) filter (where computed_at = last_build.at),
            count(*),
            (select count(distinct msisdn) from intermediate.int_cdr__interactions
             where loaded_at > %s)
        from intermediate.int_cdr__tower_runs, last_build
        """,
        (watermark,),
    ).fetchone()


def edge_rows(conn: psycopg.Connection, loaded_at: datetime) -> dict[str, object]:
    """Insert hand-made rows at the edges; return what they are meant to do."""
    # A stored session of >= 4 interactions on one tower, all data records, to split.
    split = conn.execute(
        """
        select s.msisdn, s.tower_id, s.session_start, s.interactions
        from prepared_layers.tower_sessions s
        where s.interactions >= 4
          and not exists (
            select 1 from cdr_data.voice_records v
            where v.msisdn = s.msisdn and v.start_time between s.session_start and s.session_end)
        order by s.session_start, s.msisdn
        limit 1
        """
    ).fetchone()
    assert split is not None, "no session of 4 or more data records to split"
    msisdn, tower, start, _ = split
    second, third = conn.execute(
        "select event_datetime from cdr_data.data_records where msisdn = %s"
        " and event_datetime >= %s order by event_datetime limit 2 offset 1",
        (msisdn, start),
    ).fetchall()
    between = second[0] + (third[0] - second[0]) / 2
    # The latest stored event of some msisdn: extend its run across the runs of the model.
    last = conn.execute(
        "select msisdn, tower_id, event_datetime from cdr_data.data_records"
        " order by event_datetime desc, msisdn limit 1"
    ).fetchone()
    edge = datetime(2024, 1, 1, 2, 15, 0)
    rows = [
        (msisdn, tower % 2000 + 1, between, "split"),
        (last[0], last[1], last[2] + timedelta(seconds=1), "extend 1"),
        (last[0], last[1], last[2] + timedelta(seconds=2), "extend 2"),
        (last[0], last[1], last[2] + timedelta(seconds=3), "extend 3"),
        ("0000000000001", 7, edge, "on the 02:15 edge"),
        ("0000000000001", 7, edge - timedelta(microseconds=1), "just before 02:15"),
        ("0000000000001", 7, edge + timedelta(minutes=1), "third on tower 7"),
    ]
    with conn.cursor().copy(
        "copy cdr_data.data_records (source_file, line_no, msisdn, tower_id, up_bytes,"
        " down_bytes, data_type, event_datetime, loaded_at) from stdin"
    ) as copy:
        for i, (m, t, ts, _) in enumerate(rows, start=2):
            copy.write_row(
                ("edge_rows.csv", i, m, t, 100_000 + i, 200_000 + i, "text", ts, loaded_at)
            )
    # A 30-minute call on tower 7 right after: it outlasts the session's last interaction.
    conn.execute(
        "insert into cdr_data.voice_records (source_file, line_no, msisdn, tower_id, call_type,"
        " dest_nr, call_duration_sec, start_time, loaded_at) values"
        " ('edge_calls.csv', 2, '0000000000001', 7, 'voice', '0000000000002', 1800, %s, %s)",
        (edge + timedelta(minutes=2), loaded_at),
    )
    return {"split": (msisdn, tower, start), "extend": last, "edge": edge}


@pytest.fixture(scope="module")
def scenario(stack, dbt_project: DbtProject) -> Iterator[dict[str, object]]:
    files = list(cdr_files(CONFIG))
    results: dict[str, object] = {}
    with psycopg.connect(stack.analytics_dsn, autocommit=True) as conn:
        truncate_cdr(conn)
        now = datetime.now(UTC)
        # each part landed in the past as in real time, so the runs see only the new part as new
        land_cdr_files(conn, files[:FIRST_PART_FILES], landed_from=now - timedelta(days=3))
        results["full_build"] = dbt_project.run("build", "--full-refresh", *SELECT)
        results["step1"] = assert_parity(conn, "step 1 (full build)")

        land_cdr_files(conn, files[FIRST_PART_FILES:], landed_from=now - timedelta(days=2))
        watermark = runs_watermark(conn)
        results["incremental_build"] = dbt_project.run("build", *SELECT)
        results["step2"] = assert_parity(conn, "step 2 (incremental, late rows)")
        results["runs_step2"] = recomputed_runs(conn, watermark)

        results["edges"] = edge_rows(conn, loaded_at=now - timedelta(days=1))
        watermark = runs_watermark(conn)
        dbt_project.run("build", *SELECT)
        results["step3"] = assert_parity(conn, "step 3 (incremental, edge rows)")
        results["runs_step3"] = recomputed_runs(conn, watermark)

        dbt_project.run("run", "--full-refresh", *SELECT)
        results["full_refresh"] = {mart: mart_rows(conn, mart) for mart in results["step3"]}
        results["records"] = read_records(conn)
        results["conn_dsn"] = stack.analytics_dsn
        yield results


def test_full_build_runs_every_data_and_unit_test(scenario):
    output = scenario["full_build"].stdout
    assert "Completed successfully" in output
    unit_tests = re.search(r"(\d+) unit tests?", output)
    assert unit_tests and int(unit_tests.group(1)) >= 10, "the unit tests did not run"
    data_tests = re.search(r"(\d+) data tests?", output)
    assert data_tests and int(data_tests.group(1)) >= 100
    done = re.search(r"Done\. PASS=(\d+) WARN=(\d+) ERROR=(\d+) SKIP=(\d+)", output)
    assert done and done.group(3) == "0" and done.group(4) == "0", done


def test_incremental_build_passes(scenario):
    assert "Completed successfully" in scenario["incremental_build"].stdout


def test_parity_holds_after_each_step(scenario):
    # assert_parity failed the fixture otherwise; check the steps grew as expected
    for mart in scenario["step1"]:
        assert len(scenario["step1"][mart]) < len(scenario["step2"][mart]), mart


def test_incremental_runs_recompute_only_the_touched_tails(scenario):
    """An incremental run recomputes the tails of the msisdns with rows landed after its
    high-water mark, and only those: not the history."""
    for step in ("runs_step2", "runs_step3"):
        recomputed, msisdns, total, touched = scenario[step]
        assert msisdns == touched, step
        assert 0 < recomputed < total, step
    recomputed, msisdns, total, touched = scenario["runs_step3"]
    assert recomputed < total / 4


def test_late_rows_landed_in_windows_built_before(scenario):
    """The second part holds rows whose windows the first build had already written."""
    step1_windows = {row[0] for row in scenario["step1"]["cdr_usage_15min"]}
    changed = set(scenario["step2"]["cdr_usage_15min"]) - set(scenario["step1"]["cdr_usage_15min"])
    assert {row[0] for row in changed} & step1_windows, "no late row reached an old window"


def test_edge_rows(scenario):
    sessions = scenario["step3"]["tower_sessions"]
    msisdn, tower, start = scenario["edges"]["split"]
    keys_before = {s[:3] for s in scenario["step2"]["tower_sessions"]}
    assert (msisdn, tower, start) in keys_before
    # the late row on another tower leaves 2 interactions before it: no longer a session
    assert (msisdn, tower, start) not in {s[:3] for s in sessions}
    extend_msisdn, extend_tower, extend_last = scenario["edges"]["extend"]
    extended = [s for s in sessions if s[0] == extend_msisdn and s[1] == extend_tower]
    assert extended, "the rows after the last event did not extend its run into a session"
    assert extended[-1][2] <= extend_last
    assert extended[-1][3] >= extend_last + timedelta(seconds=3)
    edge = scenario["edges"]["edge"]
    windows = {
        (r[0], r[1]): r
        for r in scenario["step3"]["cdr_usage_15min"]
        if r[1] == "0000000000001" and r[2] == "data"
    }
    assert windows[(edge, "0000000000001")][4] == 2  # 02:15:00 and 02:16:00
    assert windows[(edge - timedelta(minutes=15), "0000000000001")][4] == 1  # 02:14:59.999999
    session = [s for s in sessions if s[0] == "0000000000001"]
    assert session == [
        ("0000000000001", 7, edge - timedelta(microseconds=1), edge + timedelta(minutes=32), 4)
    ]


def test_incremental_equals_full_refresh(scenario):
    for mart, rows in scenario["full_refresh"].items():
        assert rows == scenario["step3"][mart], mart


def test_totals_reconcile_with_raw(scenario):
    records = scenario["records"]
    data_bytes = sum(r.total_bytes for r in records if isinstance(r, DataRecord))
    seconds = sum(r.call_duration_sec for r in records if isinstance(r, VoiceRecord))
    for mart in USAGE_MARTS:
        rows = scenario["step3"][mart]
        assert sum(r[4] for r in rows) == len(records), mart
        assert sum(r[7] for r in rows) == data_bytes, mart
        assert sum(r[8] for r in rows) == seconds, mart
        data_cost = sum((r[9] for r in rows if r[2] == "data"), Decimal(0))
        assert data_cost == data_cost_zar(data_bytes), mart
        call_rows = [r for r in rows if r[2] == "call"]
        call_cost = sum((r[9] for r in call_rows), Decimal(0))
        assert abs(call_cost - call_cost_zar(seconds)) <= len(call_rows) * Decimal("0.5e-10")
    hourly = scenario["step3"]["tower_sessions_hourly"]
    sessions = scenario["step3"]["tower_sessions"]
    assert sum(h[3] for h in hourly) == len(sessions)
    assert sum(h[4] for h in hourly) == sum(s[4] for s in sessions)
