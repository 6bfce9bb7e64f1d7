"""The rule for poison, said once: bad data is recorded and skipped, outages are retried.

Every long-running process (CDR loader, tick sink, CDC reader, HVS consumer) sorts a failure
into one of two kinds (docs/failure-handling.md):

- **Bad data** (`BadInput`): a message, row, file or Redis entry that cannot be processed. It is
  recorded with its bytes (or a pointer to them), its position and the reason, counted in a
  metric, and skipped; processing goes on with the next one.
- **Infrastructure**: Postgres, Redis, the stream or SFTP unreachable. The step is retried with
  backoff (`common.service.backoff`), never skipped.

Decoders are pure (bytes in, a value or `BadInput` out, no I/O), so `decode` may treat *any*
exception a decoder raises as bad data: a decoder bug met by odd input must not stop a process
either. Limits that protect the decoder itself (size, JSON nesting) are checked before parsing
(`check_json_shape`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

REASON_MAX = 500
"""Characters of a reason kept: a reason quotes input, and input may be large."""


class BadInput(ValueError):
    """Input that cannot be processed: bad data, never an outage. The text is the reason."""


def reason_of(exc: BaseException) -> str:
    """The recorded reason of a decoding failure, bounded in length."""
    text = str(exc) if isinstance(exc, BadInput) else f"undecodable: {type(exc).__name__}: {exc}"
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 3] + "..."


def decode(fn: Callable[..., T], *args: Any) -> T | BadInput:
    """`fn(*args)` (a pure decoder), or the `BadInput` that says why the input is bad (the
    arguments given here spare a hot loop a closure per input).

    Any `Exception` of a pure decoder is bad data (RecursionError, OverflowError, a decoder bug
    met by odd input): it becomes a `BadInput` with the exception's type in the reason. Nothing
    of the input's making escapes to stop the process.
    """
    try:
        return fn(*args)
    except BadInput as exc:
        return exc
    except Exception as exc:  # the rule above: a pure decoder's failure is data
        return BadInput(reason_of(exc))


@dataclass(frozen=True, slots=True)
class Poison:
    """One piece of bad data: where it came from, where in it, why, and its bytes."""

    source: str  # a topic, a file name, a Redis key, a table
    position: str  # a stream position, a line number, a field
    reason: str
    raw: bytes | None = None


def skip(
    log: logging.Logger,
    poison: Poison,
    record: Callable[[Poison], object] | None = None,
    count: Callable[[], object] | None = None,
) -> None:
    """Record (`record`), count (`count`) and log one piece of bad data; the caller goes on.

    `record` writes to the process's quarantine (a table, a dead-letter list or stream); an
    outage while recording is infrastructure and propagates (the caller retries).
    """
    if record is not None:
        record(poison)
    if count is not None:
        count()
    log.warning(
        "bad input recorded and skipped",
        extra={"source": poison.source, "position": poison.position, "reason": poison.reason},
    )


def check_json_shape(value: bytes, max_bytes: int, max_depth: int) -> None:
    """Raise `BadInput` when `value` is larger than `max_bytes` or nests arrays and objects
    deeper than `max_depth`, checked on the bytes before any parser sees them (a parser may
    recurse once per level). Brackets inside strings do not count."""
    if len(value) > max_bytes:
        raise BadInput(f"too large: {len(value)} bytes > {max_bytes}")
    if value.count(b"[") + value.count(b"{") <= max_depth:
        return  # cannot nest deeper than it has brackets
    depth = 0
    in_string = escaped = False
    for byte in value:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > max_depth:
                raise BadInput(f"nested deeper than {max_depth} levels")
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
