"""The one rounding rule: derived values are rounded once to 10 decimals, half away from zero.

SQL twin (docs/business-rules.md, section 0): `round(x, 10)` and the `div10` macro
`round(round((num)::numeric, 40) / (den), 10)`.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Context, Decimal, Inexact, InvalidOperation, Rounded

SCALE = 10
QUANTUM = Decimal(1).scaleb(-SCALE)  # Decimal('1E-10')
_TEN_POW_SCALE = 10**SCALE

# Wide enough for every exact sum/product in these rules; traps make an inexact result an error.
EXACT = Context(prec=200, rounding=ROUND_HALF_UP, traps=[InvalidOperation, Inexact, Rounded])
_ROUNDING = Context(prec=200, rounding=ROUND_HALF_UP, traps=[InvalidOperation])

Number = int | Decimal


def round10(value: Number) -> Decimal:
    """Round to 10 decimal places, half away from zero (Postgres `round(numeric, 10)`)."""
    return Decimal(value).quantize(QUANTUM, context=_ROUNDING)


def _ratio(value: Number) -> tuple[int, int]:
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise TypeError(f"expected int or Decimal, got {type(value).__name__} {value!r}")
    if isinstance(value, Decimal) and not value.is_finite():
        raise ValueError(f"not a finite number: {value!r}")
    return value.as_integer_ratio()


def div10(num: Number, den: Number) -> Decimal:
    """The exact quotient num / den rounded once to 10 decimals, half away from zero."""
    a, b = _ratio(num)
    c, d = _ratio(den)
    if c == 0:
        raise ZeroDivisionError(f"div10({num!r}, {den!r})")
    top = a * d * _TEN_POW_SCALE
    bottom = b * c
    negative = (top < 0) != (bottom < 0)
    q, r = divmod(abs(top), abs(bottom))
    if 2 * r >= abs(bottom):
        q += 1
    return Decimal(-q if negative else q).scaleb(-SCALE, context=_ROUNDING)
