"""Tariffs in ZAR: data 49 ZAR per GB billed per byte, calls 1 ZAR per minute billed per second.

Costs are computed on a sum of bytes or seconds (a window, an hour), never summed from
per-event costs. SQL twin: `div10(bytes * 49, var('gb_bytes'))` and `div10(seconds, 60)`.
"""

from __future__ import annotations

from decimal import Decimal

from macros_py.numeric import div10

# The size of a GB, the single setting (SI: 10^9 bytes). Keep equal to the dbt var `gb_bytes`.
GB_BYTES = 1_000_000_000
DATA_ZAR_PER_GB = 49
CALL_ZAR_PER_MINUTE = 1
SECONDS_PER_MINUTE = 60


def _count(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{what} must not be negative, got {value}")
    return value


def data_cost_zar(total_bytes: int, gb_bytes: int = GB_BYTES) -> Decimal:
    """Cost of `total_bytes` (up + down) of data: bytes * 49 / GB, 10 decimals."""
    return div10(_count(total_bytes, "total_bytes") * DATA_ZAR_PER_GB, gb_bytes)


def call_cost_zar(seconds: int) -> Decimal:
    """Cost of `seconds` of calls (voice and video): seconds * 1 / 60, 10 decimals."""
    return div10(_count(seconds, "seconds") * CALL_ZAR_PER_MINUTE, SECONDS_PER_MINUTE)


def cost_zar(category: str, total_bytes: int, seconds: int) -> Decimal:
    """Cost of a usage row: the data tariff for category 'data', the call tariff for 'call'."""
    if category == "data":
        return data_cost_zar(total_bytes)
    if category == "call":
        return call_cost_zar(seconds)
    raise ValueError(f"unknown category {category!r}; expected 'data' or 'call'")
