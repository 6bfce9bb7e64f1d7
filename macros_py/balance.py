"""CRM running balance per account and hour (crm_balance_hourly).

An event belongs to the account holding its msisdn (phone_number) at the event time; with several
holders, to the version with the latest valid_from, ties to the smallest account_id. Per account
and hour: cost_zar = call tariff(seconds) + data tariff(bytes); cost_wak at the hour's rate (as-of
lookup in fx_rates_hourly); balance_wak = running sum of cost_wak (nulls add nothing).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from macros_py.buckets import floor_hour
from macros_py.currency import RateHour, RateLookup, zar_to_wak
from macros_py.numeric import EXACT
from macros_py.records import DataRecord, Record, VoiceRecord
from macros_py.tariffs import call_cost_zar, data_cost_zar


@dataclass(frozen=True, slots=True)
class AccountVersion:
    """One version of an account's phone number, valid on [valid_from, valid_to)."""

    account_id: int
    phone_number: str | None
    valid_from: datetime
    valid_to: datetime | None = None

    def holds(self, msisdn: str, ts: datetime) -> bool:
        return (
            self.phone_number == msisdn
            and self.valid_from <= ts
            and (self.valid_to is None or ts < self.valid_to)
        )


class AccountIndex:
    """Which account pays for an msisdn's event at a given time."""

    def __init__(self, versions: Iterable[AccountVersion]) -> None:
        self._by_phone: dict[str, list[AccountVersion]] = {}
        for v in versions:
            if v.valid_to is not None and v.valid_to < v.valid_from:
                raise ValueError(f"version ends before it starts: {v}")
            if v.phone_number is not None:
                self._by_phone.setdefault(v.phone_number, []).append(v)

    def account_at(self, msisdn: str, ts: datetime) -> int | None:
        best: AccountVersion | None = None
        for v in self._by_phone.get(msisdn, ()):
            if v.holds(msisdn, ts) and (
                best is None
                or v.valid_from > best.valid_from
                or (v.valid_from == best.valid_from and v.account_id < best.account_id)
            ):
                best = v
        return best.account_id if best is not None else None


@dataclass(frozen=True, slots=True)
class DeviceVersion:
    """One version of a device, valid on [valid_from, valid_to)."""

    device_id: int
    account_id: int | None
    valid_from: datetime
    valid_to: datetime | None = None


class DeviceIndex:
    """The device shown for an account at an instant: of the device versions valid then that point
    at the account, the one with the latest valid_from, ties to the highest device_id."""

    def __init__(self, versions: Iterable[DeviceVersion]) -> None:
        self._by_account: dict[int, list[DeviceVersion]] = {}
        for v in versions:
            if v.account_id is not None:
                self._by_account.setdefault(v.account_id, []).append(v)

    def devices_at(self, account_id: int, ts: datetime) -> list[DeviceVersion]:
        """Valid devices of the account at `ts`, the shown one first."""
        valid = [
            v
            for v in self._by_account.get(account_id, ())
            if v.valid_from <= ts and (v.valid_to is None or ts < v.valid_to)
        ]
        return sorted(valid, key=lambda v: (v.valid_from, v.device_id), reverse=True)

    def device_at(self, account_id: int, ts: datetime) -> DeviceVersion | None:
        valid = self.devices_at(account_id, ts)
        return valid[0] if valid else None


@dataclass(frozen=True, slots=True)
class HourUsage:
    account_id: int
    hour_start: datetime
    call_seconds: int
    data_bytes: int
    last_event_ts: datetime | None = None  # "as of that hour": user and device info at this instant


def hourly_usage(records: Iterable[Record], accounts: AccountIndex) -> list[HourUsage]:
    """Attributed usage per (account_id, hour of the event), sorted; unmatched events dropped."""
    acc: dict[tuple[int, datetime], list] = {}
    for r in records:
        account_id = accounts.account_at(r.msisdn, r.event_ts)
        if account_id is None:
            continue
        a = acc.setdefault((account_id, floor_hour(r.event_ts)), [0, 0, r.event_ts])
        if isinstance(r, VoiceRecord):
            a[0] += r.call_duration_sec
        elif isinstance(r, DataRecord):
            a[1] += r.total_bytes
        else:
            raise TypeError(f"expected a DataRecord or VoiceRecord, got {type(r).__name__}")
        a[2] = max(a[2], r.event_ts)
    return [HourUsage(k[0], k[1], s, b, last) for k, (s, b, last) in sorted(acc.items())]


def hour_cost_zar(call_seconds: int, data_bytes: int) -> Decimal:
    """Each tariff on the hour's sum, then added (exact: both have at most 10 decimals)."""
    return EXACT.add(call_cost_zar(call_seconds), data_cost_zar(data_bytes))


@dataclass(frozen=True, slots=True)
class BalanceRow:
    account_id: int
    hour_start: datetime
    call_seconds: int
    data_bytes: int
    cost_zar: Decimal
    cost_wak: Decimal | None
    balance_wak: Decimal | None


def add_balance(balance: Decimal | None, cost_wak: Decimal | None) -> Decimal | None:
    """One step of the running total; a null cost adds nothing (like SQL sum)."""
    if cost_wak is None:
        return balance
    return cost_wak if balance is None else EXACT.add(balance, cost_wak)


def balance_rows(
    usage: Iterable[HourUsage],
    rates: Sequence[RateHour] | RateLookup,
    carried: Mapping[int, Decimal | None] | None = None,
) -> list[BalanceRow]:
    """Rows sorted by (account_id, hour_start); `carried` holds each account's stored balance."""
    lookup = rates if isinstance(rates, RateLookup) else RateLookup(rates)
    balances: dict[int, Decimal | None] = dict(carried or {})
    rows: list[BalanceRow] = []
    seen: set[tuple[int, datetime]] = set()
    for u in sorted(usage, key=lambda u: (u.account_id, u.hour_start)):
        if (u.account_id, u.hour_start) in seen:
            raise ValueError(f"two usage rows for account {u.account_id} at {u.hour_start}")
        seen.add((u.account_id, u.hour_start))
        cost_zar = hour_cost_zar(u.call_seconds, u.data_bytes)
        rate = lookup.as_of(u.hour_start)
        cost_wak = zar_to_wak(cost_zar, rate.zar_per_wak) if rate is not None else None
        balance = add_balance(balances.get(u.account_id), cost_wak)
        balances[u.account_id] = balance
        rows.append(
            BalanceRow(
                u.account_id,
                u.hour_start,
                u.call_seconds,
                u.data_bytes,
                cost_zar,
                cost_wak,
                balance,
            )
        )
    return rows
