"""Tower sessions: runs of 3 or more consecutive interactions on one tower."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from macros_py.records import DataRecord, VoiceRecord
from macros_py.sessions import Session, order_key, replay_start, sessions_hourly, tower_sessions

T0 = datetime(2024, 1, 1)
M = "0712345678901"


def d(tower: int, sec: float, msisdn: str = M, line: int = 0, file: str = "f.csv") -> DataRecord:
    return DataRecord(msisdn, tower, 1, 1, "text", T0 + timedelta(seconds=sec), file, line)


def v(tower: int, sec: float, dur: int, msisdn: str = M, line: int = 0) -> VoiceRecord:
    return VoiceRecord(msisdn, tower, "voice", dur, T0 + timedelta(seconds=sec), "v.csv", line)


def test_two_consecutive_is_not_a_session_three_is() -> None:
    assert tower_sessions([d(1, 0), d(1, 10)]) == []
    assert tower_sessions([d(1, 0), d(1, 10), d(1, 20)]) == [
        Session(M, 1, T0, T0 + timedelta(seconds=20), 3)
    ]


def test_another_tower_breaks_the_run() -> None:
    records = [d(1, 0), d(1, 1), d(2, 2), d(1, 3), d(1, 4)]
    assert tower_sessions(records) == []
    records = [d(1, 0), d(1, 1), d(1, 2), d(2, 3), d(1, 4), d(1, 5), d(1, 6), d(1, 7)]
    sessions = tower_sessions(records)
    assert [(s.tower_id, s.interactions) for s in sessions] == [(1, 3), (1, 4)]
    assert sessions[1].session_start == T0 + timedelta(seconds=4)


def test_data_and_voice_interleave_and_input_order_does_not_matter() -> None:
    records = [d(5, 30), v(5, 10, 5), d(5, 20), v(6, 40, 5), d(5, 50)]
    shuffled = records[:]
    random.Random(3).shuffle(shuffled)
    assert tower_sessions(shuffled) == tower_sessions(records)
    (s,) = tower_sessions(records)
    assert (s.tower_id, s.interactions, s.session_start) == (5, 3, T0 + timedelta(seconds=10))


def test_session_end_is_the_latest_call_end() -> None:
    # a long call starts the session and ends after the last interaction's start
    (s,) = tower_sessions([v(1, 0, 600), d(1, 10), d(1, 20)])
    assert s.session_end == T0 + timedelta(seconds=600)
    # a call as the last interaction ends the session at start + duration
    (s,) = tower_sessions([d(1, 0), d(1, 10), v(1, 20, 30)])
    assert s.session_end == T0 + timedelta(seconds=50)


def test_ties_in_time_order_call_before_data_then_file_then_line() -> None:
    # same instant: the call (tower 2) sorts before the data records (tower 1)
    records = [d(1, 0), d(1, 5, line=2), v(2, 5, 1, line=9), d(1, 6)]
    keys = sorted(order_key(r) for r in records)
    assert keys[1][1] == "call"
    # order: d1(0) call2(5) d1(5) d1(6) -> run of tower 1 after the call has 2 members only
    assert tower_sessions(records) == []
    # with the call later the three data records form a session
    records = [d(1, 0), d(1, 5, line=2), v(2, 7, 1, line=9), d(1, 6)]
    assert [s.interactions for s in tower_sessions(records)] == [3]
    # data ties break by source_file then line_no (byte order)
    a = [d(1, 0, file="cdr_data_2.csv", line=1), d(2, 0, file="cdr_data_1.csv", line=5)]
    assert [r.tower_id for r in sorted(a, key=order_key)] == [2, 1]
    b = [d(1, 0, line=10), d(2, 0, line=9)]
    assert [r.tower_id for r in sorted(b, key=order_key)] == [2, 1]


def test_msisdns_are_separate() -> None:
    records = [d(1, 0, "A"), d(1, 1, "B"), d(1, 2, "A"), d(1, 3, "B"), d(1, 4, "A")]
    sessions = tower_sessions(records)
    assert [(s.msisdn, s.interactions) for s in sessions] == [("A", 3)]


def test_sessions_count_in_the_hour_of_their_start() -> None:
    records = [d(1, 3590), d(1, 3595), d(1, 3700), d(2, 3800), d(2, 3801), d(2, 3802)]
    records += [d(1, 3900), d(1, 3901), d(1, 3902), d(1, 3903)]
    sessions = tower_sessions(records)
    assert [(s.tower_id, s.interactions) for s in sessions] == [(1, 3), (2, 3), (1, 4)]
    hourly = sessions_hourly(sessions)
    h0, h1 = T0, T0 + timedelta(hours=1)
    assert [(h.hour_start, h.tower_id, h.sessions, h.interactions) for h in hourly] == [
        (h0, 1, 1, 3),
        (h1, 1, 1, 4),
        (h1, 2, 1, 3),
    ]


def _islands_reference(records: list[DataRecord | VoiceRecord]) -> list[Session]:
    """The SQL formulation: row_number difference per (msisdn, tower_id), groups of >= 3."""
    ordered = sorted(records, key=lambda r: (r.msisdn, *order_key(r)))
    rn_all: dict[str, int] = {}
    rn_tower: dict[tuple[str, int], int] = {}
    groups: dict[tuple[str, int, int], list[DataRecord | VoiceRecord]] = {}
    for r in ordered:
        rn_all[r.msisdn] = rn_all.get(r.msisdn, 0) + 1
        rn_tower[(r.msisdn, r.tower_id)] = rn_tower.get((r.msisdn, r.tower_id), 0) + 1
        island = rn_all[r.msisdn] - rn_tower[(r.msisdn, r.tower_id)]
        groups.setdefault((r.msisdn, r.tower_id, island), []).append(r)
    out = [
        Session(m, t, min(r.event_ts for r in g), max(r.event_end for r in g), len(g))
        for (m, t, _), g in groups.items()
        if len(g) >= 3
    ]
    return sorted(out, key=lambda s: (s.msisdn, s.session_start, s.tower_id))


def test_run_scan_equals_gaps_and_islands_formulation() -> None:
    rng = random.Random(11)
    records: list[DataRecord | VoiceRecord] = []
    for i in range(4000):
        m = f"27{rng.randint(0, 30):011d}"
        tower = rng.choice([1, 1, 1, 2, 2, 3])
        sec = rng.randrange(0, 7200, 7)  # coarse grid: many ties in time
        if rng.random() < 0.3:
            records.append(v(tower, sec, rng.randint(1, 1800), m, line=i))
        else:
            records.append(d(tower, sec, m, line=i, file=rng.choice(["a.csv", "b.csv"])))
    sessions = tower_sessions(records)
    assert len(sessions) > 50
    assert sessions == _islands_reference(records)
    assert all(s.interactions >= 3 for s in sessions)


def test_incremental_replay_from_the_open_run_equals_a_full_computation() -> None:
    rng = random.Random(12)
    for trial in range(200):
        records = [d(rng.choice([1, 1, 2]), rng.randrange(0, 600, 10), line=i) for i in range(40)]
        if trial % 2:  # in-order arrival: the new rows follow the history
            records.sort(key=order_key)
        history, new = records[:30], records[30:]  # otherwise new rows may be late
        first_new = min(order_key(r) for r in new)
        start = replay_start(history, first_new)
        # runs wholly before the replay point keep their sessions
        kept = tower_sessions([r for r in history if start is not None and order_key(r) < start])
        replayed = [r for r in history + new if start is None or order_key(r) >= start]
        combined = sorted(
            kept + tower_sessions(replayed), key=lambda s: (s.msisdn, s.session_start, s.tower_id)
        )
        assert combined == tower_sessions(history + new)
