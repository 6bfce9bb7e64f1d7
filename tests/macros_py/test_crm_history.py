"""CRM history from the change log: versions, delete times from the shared CRM clock, edges."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from macros_py.crm_history import Change, CrmClock, Version, current, history, version_at, versions

T0 = datetime(2024, 1, 1)


def t(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_updates_chain_versions_on_modified_ts_not_commit_order_of_other_keys() -> None:
    log = [
        Change(1, "r", 100, t(0), ("a",)),
        Change(2, "r", 100, t(5), ("b",)),  # snapshot rows share one lsn
        Change(1, "u", 200, t(10), ("a2",)),
        Change(1, "u", 300, t(20), ("a3",)),
    ]
    got = versions(log, CrmClock(log))
    assert got == [
        Version(1, 100, t(0), t(10), ("a",)),
        Version(1, 200, t(10), t(20), ("a2",)),
        Version(1, 300, t(20), None, ("a3",)),
        Version(2, 100, t(5), None, ("b",)),
    ]
    assert [v.key for v in current(got)] == [1, 2]


def test_delete_time_is_the_crm_clock_from_any_table_and_reinsert_starts_again() -> None:
    accounts = [
        Change(7, "c", 10, t(0), ("x",)),
        Change(7, "d", 40, None),  # deleted after the device change at lsn 30 (clock t(9))
        Change(7, "c", 60, t(30), ("y",)),
    ]
    devices = [
        Change(70, "c", 20, t(2), (7,)),
        Change(70, "u", 30, t(9), (7,)),
        Change(70, "d", 41, None),  # same transaction as the account delete: clock still t(9)
        Change(71, "c", 50, t(25), (7,)),
    ]
    got = history({"accounts": accounts, "devices": devices})
    assert got["accounts"] == [
        Version(7, 10, t(0), t(9), ("x",)),
        Version(7, 60, t(30), None, ("y",)),
    ]
    assert got["devices"] == [
        Version(70, 20, t(2), t(9), (7,)),
        Version(70, 30, t(9), t(9), (7,)),  # updated and deleted at the same CRM instant: empty
        Version(71, 50, t(25), None, (7,)),
    ]
    assert [v.key for v in current(got["accounts"])] == [7]
    assert [v.key for v in current(got["devices"])] == [71]


def test_clock_takes_the_greatest_modified_ts_at_the_latest_lower_lsn() -> None:
    log = [
        Change(1, "r", 100, t(50)),
        Change(2, "r", 100, t(80)),
        Change(3, "r", 100, t(60)),
        Change(9, "c", 90, t(999)),  # lower lsn: not the latest
    ]
    clock = CrmClock(log)
    assert clock.before(100) == t(999)
    assert clock.before(101) == t(80)
    assert clock.before(90) is None


def test_valid_to_never_precedes_valid_from() -> None:
    # the CRM clock went backwards: the older stamp closes the version empty at its start
    log = [Change(1, "c", 1, t(10), ("a",)), Change(1, "u", 2, t(5), ("b",))]
    got = versions(log, CrmClock(log))
    assert got == [Version(1, 1, t(10), t(10), ("a",)), Version(1, 2, t(5), None, ("b",))]
    # a delete whose clock is older than the version's start does the same
    log = [Change(1, "c", 1, t(10)), Change(2, "c", 2, t(3)), Change(1, "d", 3, None)]
    assert versions(log, CrmClock(log))[0].valid_to == t(10)


def test_consecutive_deletes_and_a_delete_first_start_no_version() -> None:
    log = [
        Change(5, "d", 1, None),
        Change(5, "c", 2, t(1)),
        Change(5, "d", 3, None),
        Change(5, "d", 4, None),
    ]
    assert versions(log, CrmClock(log)) == [Version(5, 2, t(1), t(1), ())]


def test_bad_changes_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown operation"):
        CrmClock([Change(1, "x", 1, t(0))])
    with pytest.raises(ValueError, match="without modified_ts"):
        CrmClock([Change(1, "u", 1, None)])
    log = [Change(1, "c", 1, t(0)), Change(1, "u", 1, t(1))]
    with pytest.raises(ValueError, match="two changes at lsn 1"):
        versions(log, CrmClock([]))


def test_version_at_picks_the_valid_version_latest_start_then_highest_lsn() -> None:
    vs = [
        Version(1, 1, t(0), t(10), ("a",)),
        Version(1, 2, t(10), None, ("b",)),
        Version(1, 3, t(10), t(10), ("empty",)),
    ]
    assert version_at(vs, t(0)).values == ("a",)
    assert version_at(vs, t(9.999999)).values == ("a",)
    assert version_at(vs, t(10)).values == ("b",)  # an empty version is never valid
    assert version_at(vs, t(-1)) is None
    overlapping = [Version(1, 5, t(0), None, ("x",)), Version(1, 4, t(0), None, ("y",))]
    assert version_at(overlapping, t(1)).values == ("x",)


def test_snapshot_row_comes_first_even_with_a_higher_lsn() -> None:
    # a transaction spanning the slot's consistent point: captured as a change with an lsn below
    # the snapshot's, yet it happened after the snapshot (docs/raw-layer.md)
    log = [Change(1, "r", 500, t(10), ("snap",)), Change(1, "u", 480, t(20), ("after",))]
    assert versions(log, CrmClock(log)) == [
        Version(1, 500, t(10), t(20), ("snap",)),
        Version(1, 480, t(20), None, ("after",)),
    ]
