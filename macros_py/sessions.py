"""Tower sessions: 3 or more consecutive interactions of an msisdn on one tower.

Interactions are data and voice records together, ordered by (event_ts, category, source_file,
line_no) with 'call' before 'data' and text in byte order (SQL: `collate "C"`). A run of
consecutive interactions on the same tower_id with at least MIN_INTERACTIONS members is a
session; session_end is the latest event end (a call ends at start + duration).
SQL twin: gaps and islands, row_number() over (msisdn) - row_number() over (msisdn, tower_id).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from macros_py.buckets import floor_hour
from macros_py.records import Record

MIN_INTERACTIONS = 3  # "more than 2 consecutive interactions"


def order_key(record: Record) -> tuple[datetime, str, str, int]:
    """The total order of an msisdn's interactions."""
    return (record.event_ts, record.category, record.source_file, record.line_no)


@dataclass(frozen=True, slots=True)
class Session:
    msisdn: str
    tower_id: int
    session_start: datetime
    session_end: datetime
    interactions: int

    @property
    def key(self) -> tuple[str, int, datetime]:
        return (self.msisdn, self.tower_id, self.session_start)


@dataclass(frozen=True, slots=True)
class SessionHour:
    hour_start: datetime
    msisdn: str
    tower_id: int
    sessions: int
    interactions: int


def _close(run: list[Record], min_interactions: int, out: list[Session]) -> None:
    if len(run) >= min_interactions:
        first = run[0]
        out.append(
            Session(
                msisdn=first.msisdn,
                tower_id=first.tower_id,
                session_start=first.event_ts,
                session_end=max(r.event_end for r in run),
                interactions=len(run),
            )
        )


def tower_sessions(
    records: Iterable[Record], min_interactions: int = MIN_INTERACTIONS
) -> list[Session]:
    """All sessions in the records, sorted by (msisdn, session_start, tower_id).

    The records must be each msisdn's complete history for the period (data and voice).
    """
    ordered = sorted(records, key=lambda r: (r.msisdn, *order_key(r)))
    sessions: list[Session] = []
    run: list[Record] = []
    for r in ordered:
        if run and (r.msisdn != run[0].msisdn or r.tower_id != run[0].tower_id):
            _close(run, min_interactions, sessions)
            run = []
        run.append(r)
    if run:
        _close(run, min_interactions, sessions)
    sessions.sort(key=lambda s: (s.msisdn, s.session_start, s.tower_id))
    return sessions


def replay_start(
    history: Iterable[Record], first_new: tuple[datetime, str, str, int]
) -> tuple[datetime, str, str, int] | None:
    """Where an incremental run must restart one msisdn's session scan.

    `history` is the msisdn's interactions already processed, `first_new` the order key of its
    earliest new (or late) interaction. Returns the order key of the first interaction of the run
    that holds the last interaction before `first_new` (None: replay everything). Sessions that
    start at or after that key are recomputed from the interactions at or after it; earlier
    sessions cannot change.
    """
    before = sorted((r for r in history if order_key(r) < first_new), key=order_key)
    if not before:
        return None
    i = len(before) - 1
    tower = before[i].tower_id
    while i > 0 and before[i - 1].tower_id == tower:
        i -= 1
    return order_key(before[i])


def sessions_hourly(sessions: Iterable[Session]) -> list[SessionHour]:
    """Sessions per (hour of session_start, msisdn, tower_id), sorted by that key."""
    acc: dict[tuple[datetime, str, int], list[int]] = {}
    for s in sessions:
        a = acc.setdefault((floor_hour(s.session_start), s.msisdn, s.tower_id), [0, 0])
        a[0] += 1
        a[1] += s.interactions
    return [
        SessionHour(hour_start=h, msisdn=m, tower_id=t, sessions=n, interactions=i)
        for (h, m, t), (n, i) in sorted(acc.items())
    ]
