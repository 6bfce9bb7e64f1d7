"""CRM versions rebuilt from the change log (crm_accounts_history, _addresses_, _devices_).

The change log holds one row per change (`__op` r/c/u/d, `__lsn`, the row after the change, the
key alone for a delete). Per key, in log order (the snapshot row `r` first, then the changes by
`__lsn`: docs/raw-layer.md, "Rebuilding the current state"), every non-delete change starts a
version and ends the one before. Versions live in the CRM's own time, `modified_ts`:

- a version is valid on `[valid_from, valid_to)`, `valid_from` = its `modified_ts`;
- `valid_to` = the time of the key's next change; null while the version is current;
- a delete carries no `modified_ts`, so its time is the CRM clock at the delete: the
  `modified_ts` of the latest non-delete change logged before it (lower `__lsn`; among changes
  at that same `__lsn`, such as the rows of a snapshot, the greatest `modified_ts`) in any of the
  three tables. A delete ends a version and starts none; a later insert of the same key starts a
  new one.
- `valid_to` never precedes `valid_from` (a change that carries an older `modified_ts` than the
  version it ends closes that version empty, at its `valid_from`).

docs/business-rules.md, section 8. SQL twin: dbt/models/intermediate/crm and marts/crm.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

OPS = ("r", "c", "u", "d")


@dataclass(frozen=True, slots=True)
class Change:
    """One row of a crm_data.*_changes table."""

    key: int
    op: str  # r, c, u, d
    lsn: int
    modified_ts: datetime | None
    values: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class Version:
    key: int
    version_lsn: int
    valid_from: datetime
    valid_to: datetime | None
    values: tuple[Any, ...]

    @property
    def is_current(self) -> bool:
        return self.valid_to is None

    def valid_at(self, ts: datetime) -> bool:
        return self.valid_from <= ts and (self.valid_to is None or ts < self.valid_to)


def _check(changes: Iterable[Change]) -> None:
    for c in changes:
        if c.op not in OPS:
            raise ValueError(f"unknown operation {c.op!r} at lsn {c.lsn}")
        if c.op != "d" and c.modified_ts is None:
            raise ValueError(f"key {c.key} lsn {c.lsn}: a {c.op!r} change without modified_ts")


class CrmClock:
    """The CRM's clock at a log position: the modified_ts of the latest non-delete change before."""

    def __init__(self, changes: Iterable[Change]) -> None:
        changes = list(changes)
        _check(changes)
        stamped = sorted((c.lsn, c.modified_ts) for c in changes if c.op != "d")
        self._lsns = [lsn for lsn, _ in stamped]
        self._ts = [ts for _, ts in stamped]

    def before(self, lsn: int) -> datetime | None:
        """The clock just before log position `lsn` (None before the first non-delete change)."""
        i = bisect.bisect_left(self._lsns, lsn)
        return self._ts[i - 1] if i else None


def log_order(change: Change) -> tuple[bool, int]:
    """A key's changes in log order: its snapshot row first, then by `__lsn`."""
    return (change.op != "r", change.lsn)


def versions(changes: Sequence[Change], clock: CrmClock) -> list[Version]:
    """The versions of one table's keys, sorted by (key, version_lsn).

    `clock` must be built from the changes of all three tables (a delete's time comes from any).
    """
    _check(changes)
    by_key: dict[int, list[Change]] = {}
    for c in changes:
        by_key.setdefault(c.key, []).append(c)
    out: list[Version] = []
    for key in sorted(by_key):
        log = sorted(by_key[key], key=log_order)
        for a, b in itertools.pairwise(log):
            if a.lsn == b.lsn:
                raise ValueError(f"key {key}: two changes at lsn {a.lsn}")
        for i, c in enumerate(log):
            if c.op == "d":
                continue
            assert c.modified_ts is not None  # noqa: S101 type narrowing: _check rejects None
            valid_to = None
            if i + 1 < len(log):
                nxt = log[i + 1]
                end = nxt.modified_ts if nxt.op != "d" else clock.before(nxt.lsn)
                valid_to = max(end, c.modified_ts) if end is not None else c.modified_ts
            out.append(Version(key, c.lsn, c.modified_ts, valid_to, c.values))
    return out


def history(tables: Mapping[str, Sequence[Change]]) -> dict[str, list[Version]]:
    """The versions of every table, with one CRM clock over the changes of all of them."""
    clock = CrmClock(c for changes in tables.values() for c in changes)
    return {name: versions(changes, clock) for name, changes in tables.items()}


def current(versions_: Iterable[Version]) -> list[Version]:
    """The current state: the versions still open (keys deleted last are absent)."""
    return [v for v in versions_ if v.is_current]


def version_at(versions_: Iterable[Version], ts: datetime) -> Version | None:
    """Of the given versions (usually one key's), the one valid at `ts` with the latest
    valid_from, ties to the highest version_lsn (versions of one key overlap only when the CRM
    clock goes backwards)."""
    best: Version | None = None
    for v in versions_:
        if v.valid_at(ts) and (
            best is None or (v.valid_from, v.version_lsn) > (best.valid_from, best.version_lsn)
        ):
            best = v
    return best
