"""CRM source stand-in: transactions against `wtc_prod.crm_system` (accounts, addresses, devices).

As in the starter, an upsert transaction commits three separate `INSERT ... ON CONFLICT DO UPDATE`
statements (account, address, device) with ids random in 10000..99999, so repeats become updates;
`modified_ts` comes from a simulated clock starting 2024-01-01 00:00 that advances about 1 s per
statement, and a device update keeps its old `account_id`. Phone numbers come from the same
subscriber pool as the CDR msisdns. Delete transactions (on by default in `realistic`) remove an
account with its address and devices, or a device alone.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ingestion.generators.common import STARTER_START, Pace, Pacer, Profile, subscriber_pool

log = logging.getLogger(__name__)

STATES = ("EC", "FS", "GP", "KZN", "LP", "MP", "NC", "NW", "WC")
DEVICE_TYPES = ("Mobile", "Tablet", "Laptop", "Desktop")
DEVICE_OS = ("iOS", "Android", "Windows", "macOS", "Linux")
COUNTRY = "ZAR"
MIN_ID, MAX_ID = 10_000, 99_999

CITIES = {
    "EC": ("Gqeberha", "East London", "Mthatha", "Makhanda"),
    "FS": ("Bloemfontein", "Welkom", "Bethlehem", "Kroonstad"),
    "GP": ("Johannesburg", "Pretoria", "Soweto", "Benoni", "Midrand"),
    "KZN": ("Durban", "Pietermaritzburg", "Richards Bay", "Newcastle"),
    "LP": ("Polokwane", "Tzaneen", "Thohoyandou", "Mokopane"),
    "MP": ("Mbombela", "Emalahleni", "Secunda", "Middelburg"),
    "NC": ("Kimberley", "Upington", "Springbok", "Kuruman"),
    "NW": ("Mahikeng", "Rustenburg", "Potchefstroom", "Klerksdorp"),
    "WC": ("Cape Town", "Stellenbosch", "George", "Paarl", "Worcester"),
}
FIRST_NAMES = (
    "Thabo", "Lerato", "Sipho", "Naledi", "Johan", "Anele", "Zanele", "Pieter", "Ayesha",
    "Kagiso", "Lindiwe", "Michael", "Nomvula", "Tshepo", "Sarah", "Bongani", "Precious", "David",
    "Fatima", "Mandla", "Annelie", "Themba", "Palesa", "Ruan", "Busisiwe", "Kevin", "Mpho",
)  # fmt: skip
LAST_NAMES = (
    "Nkosi", "Dlamini", "Botha", "Naidoo", "Mokoena", "van der Merwe", "Khumalo", "Pillay",
    "Mahlangu", "Smith", "Ndlovu", "Pretorius", "Sithole", "Jacobs", "Mthembu", "Zulu",
    "Molefe", "Adams", "Venter", "Maseko", "Govender", "Coetzee", "Mabaso", "Williams",
)  # fmt: skip
EMAIL_DOMAINS = ("example.com", "mail.example.org", "example.net", "wtc.example")
STREETS = ("Main", "Church", "Long", "Voortrekker", "Nelson Mandela", "Market", "Station", "Oak")
STREET_KINDS = ("Street", "Road", "Avenue", "Drive", "Lane")
DEVICE_NAMES = {
    "Mobile": ("iPhone 14", "iPhone 15", "Galaxy S23", "Galaxy A54", "Pixel 8", "Redmi Note 12"),
    "Tablet": ("iPad Air", "iPad mini", "Galaxy Tab S9", "Lenovo Tab P11"),
    "Laptop": ("MacBook Air", "ThinkPad X1", "Dell XPS 13", "HP EliteBook"),
    "Desktop": ("iMac", "OptiPlex 7010", "HP ProDesk", "Custom Tower"),
}

UPSERT_ACCOUNT = (
    "insert into crm_system.accounts"
    " (account_id, owner_name, email, phone_number, modified_ts) values (%s, %s, %s, %s, %s)"
    " on conflict (account_id) do update set owner_name = excluded.owner_name,"
    " email = excluded.email, phone_number = excluded.phone_number,"
    " modified_ts = excluded.modified_ts"
)
UPSERT_ADDRESS = (
    "insert into crm_system.addresses"
    " (account_id, street_address, city, state, postal_code, country, modified_ts)"
    " values (%s, %s, %s, %s, %s, %s, %s)"
    " on conflict (account_id) do update set street_address = excluded.street_address,"
    " city = excluded.city, state = excluded.state, postal_code = excluded.postal_code,"
    " country = excluded.country, modified_ts = excluded.modified_ts"
)
# A device update keeps its old account_id (as the starter's CRM does).
UPSERT_DEVICE = (
    "insert into crm_system.devices"
    " (device_id, account_id, device_name, device_type, device_os, modified_ts)"
    " values (%s, %s, %s, %s, %s, %s)"
    " on conflict (device_id) do update set device_name = excluded.device_name,"
    " device_type = excluded.device_type, device_os = excluded.device_os,"
    " modified_ts = excluded.modified_ts"
)
DELETE_ACCOUNT = "delete from crm_system.accounts where account_id = %s"
DELETE_ADDRESS = "delete from crm_system.addresses where account_id = %s"
DELETE_ACCOUNT_DEVICES = "delete from crm_system.devices where account_id = %s"
DELETE_DEVICE = "delete from crm_system.devices where device_id = %s"


@dataclass(frozen=True)
class CrmConfig:
    """Knobs of the CRM generator; the defaults are the starter's run (50 000 transactions).

    `delete_rate` is the share of transactions that delete (default 0 for `starter`, 0.05 for
    `realistic`); `device_delete_share` is the share of those that delete a device alone.
    """

    profile: Profile = Profile.STARTER
    seed: int = 0
    subscribers: int = 50_000
    transactions: int = 50_000
    start: datetime = STARTER_START
    min_step_seconds: float = 1.0
    max_step_seconds: float = 1.3
    delete_rate: float | None = None
    device_delete_share: float = 0.5
    pace: Pace = Pace.FAST
    speed: float = 1.0
    batch_transactions: int = 200

    def __post_init__(self) -> None:
        object.__setattr__(self, "profile", Profile(self.profile))
        object.__setattr__(self, "pace", Pace(self.pace))
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        if self.transactions < 0 or self.batch_transactions < 1:
            raise ValueError("transactions must be >= 0 and batch_transactions >= 1")
        if not 0 < self.min_step_seconds <= self.max_step_seconds:
            raise ValueError("need 0 < min_step_seconds <= max_step_seconds")
        for name in ("delete_rate", "device_delete_share"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within 0..1")

    @property
    def effective_delete_rate(self) -> float:
        if self.delete_rate is not None:
            return self.delete_rate
        return 0.05 if self.profile is Profile.REALISTIC else 0.0


@dataclass(frozen=True)
class CrmTransaction:
    """One CRM transaction: its kind and its statements `(sql, params)`, committed together."""

    kind: str  # "upsert", "delete_account" or "delete_device"
    statements: tuple[tuple[str, tuple[Any, ...]], ...]
    first_ts: datetime


@dataclass
class CrmStats:
    transactions: int = 0
    upserts: int = 0
    account_deletes: int = 0
    device_deletes: int = 0
    last_ts: datetime | None = None
    kinds: dict[str, int] = field(default_factory=dict)


class _IdBag:
    """A set of ids with O(1) add, remove and seeded random choice (deterministic order)."""

    def __init__(self) -> None:
        self._items: list[int] = []
        self._pos: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: int) -> bool:
        return item in self._pos

    def add(self, item: int) -> None:
        if item not in self._pos:
            self._pos[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: int) -> None:
        pos = self._pos.pop(item, None)
        if pos is None:
            return
        last = self._items.pop()
        if pos < len(self._items):
            self._items[pos] = last
            self._pos[last] = pos

    def choice(self, rng: random.Random) -> int:
        return self._items[rng.randrange(len(self._items))]


def crm_transactions(config: CrmConfig) -> Iterator[CrmTransaction]:
    """The transactions in order, without touching a database (pure and deterministic).

    Assumes the tables start empty for its bookkeeping of which ids exist (deletes pick ids this
    run created; a device update keeps the account_id of the row this run wrote first).
    """
    rng = random.Random(f"crm-{config.seed}-{config.profile}")
    pool = subscriber_pool(config.seed, config.subscribers)
    accounts = _IdBag()
    devices: dict[int, int] = {}  # device_id -> account_id (the one kept on updates)
    device_bag = _IdBag()
    devices_of: dict[int, set[int]] = {}
    clock = config.start
    delete_rate = config.effective_delete_rate

    def tick() -> datetime:
        nonlocal clock
        ts = clock
        step = rng.uniform(config.min_step_seconds, config.max_step_seconds)
        clock = clock + timedelta(microseconds=round(step * 1_000_000))
        return ts

    for _ in range(config.transactions):
        if delete_rate and len(accounts) and rng.random() < delete_rate:
            if len(device_bag) and rng.random() < config.device_delete_share:
                device_id = device_bag.choice(rng)
                first = tick()
                owner = devices.pop(device_id)
                device_bag.discard(device_id)
                devices_of.get(owner, set()).discard(device_id)
                yield CrmTransaction("delete_device", ((DELETE_DEVICE, (device_id,)),), first)
            else:
                account_id = accounts.choice(rng)
                first = tick()
                tick()
                tick()
                accounts.discard(account_id)
                for device_id in devices_of.pop(account_id, set()):
                    devices.pop(device_id, None)
                    device_bag.discard(device_id)
                yield CrmTransaction(
                    "delete_account",
                    (
                        (DELETE_ACCOUNT, (account_id,)),
                        (DELETE_ADDRESS, (account_id,)),
                        (DELETE_ACCOUNT_DEVICES, (account_id,)),
                    ),
                    first,
                )
            continue

        account_id = rng.randint(MIN_ID, MAX_ID)
        device_id = rng.randint(MIN_ID, MAX_ID)
        first_name, last_name = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        owner_name = f"{first_name} {last_name}"
        email = (
            f"{first_name.lower()}.{last_name.lower().replace(' ', '')}{rng.randint(1, 999)}"
            f"@{rng.choice(EMAIL_DOMAINS)}"
        )
        phone = pool[rng.randrange(len(pool))]
        state = rng.choice(STATES)
        street = f"{rng.randint(1, 999)} {rng.choice(STREETS)} {rng.choice(STREET_KINDS)}"
        city = rng.choice(CITIES[state])
        postal_code = f"{rng.randint(1, 9999):04d}"
        device_type = rng.choice(DEVICE_TYPES)
        device_name = rng.choice(DEVICE_NAMES[device_type])
        device_os = rng.choice(DEVICE_OS)
        ts_account, ts_address, ts_device = tick(), tick(), tick()

        accounts.add(account_id)
        if device_id not in devices:
            devices[device_id] = account_id
            device_bag.add(device_id)
            devices_of.setdefault(account_id, set()).add(device_id)
        yield CrmTransaction(
            "upsert",
            (
                (UPSERT_ACCOUNT, (account_id, owner_name, email, phone, ts_account)),
                (
                    UPSERT_ADDRESS,
                    (account_id, street, city, state, postal_code, COUNTRY, ts_address),
                ),
                (
                    UPSERT_DEVICE,
                    (device_id, account_id, device_name, device_type, device_os, ts_device),
                ),
            ),
            ts_account,
        )


def run_crm(
    config: CrmConfig,
    dsn: str,
    progress: Callable[[int], None] | None = None,
) -> CrmStats:
    """Apply the transactions to `wtc_prod` at `dsn`, one database transaction each.

    Round trips are batched with psycopg's pipeline mode (`batch_transactions` per sync); every CRM
    transaction is still its own `begin ... commit`, so a CDC reader sees distinct commits.
    `progress(n)` is called with the number of transactions applied since the last call.
    """
    import psycopg

    stats = CrmStats()
    pacer = Pacer(config.pace, config.start, config.speed)
    realtime = config.pace is Pace.REALTIME
    pending = 0
    with psycopg.connect(dsn, autocommit=True) as conn, conn.pipeline() as pipeline:
        cur = conn.cursor()
        for tx in crm_transactions(config):
            if realtime:
                pacer.wait_until(tx.first_ts)
            cur.execute("begin")
            for sql, params in tx.statements:
                cur.execute(sql, params)
            cur.execute("commit")
            pending += 1
            stats.transactions += 1
            stats.kinds[tx.kind] = stats.kinds.get(tx.kind, 0) + 1
            stats.last_ts = tx.first_ts
            if realtime or pending >= config.batch_transactions:
                pipeline.sync()
                if progress:
                    progress(pending)
                pending = 0
        pipeline.sync()
        if progress and pending:
            progress(pending)
    stats.upserts = stats.kinds.get("upsert", 0)
    stats.account_deletes = stats.kinds.get("delete_account", 0)
    stats.device_deletes = stats.kinds.get("delete_device", 0)
    log.info(
        "crm transactions applied",
        extra={"transactions": stats.transactions, "kinds": stats.kinds},
    )
    return stats
