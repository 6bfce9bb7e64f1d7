"""The CDR file format and its row rules, written once: names, headers, columns, value checks.

Pure logic, no I/O. The loader turns the rules into SQL (`reason_whens`) so that rows are
checked set-based in Postgres; the raw tables hold the same rules as constraints
(`contracts/wtc_analytics.sql`); docs/raw-layer.md lists them for people.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from datetime import datetime

NAME_PATTERN = re.compile(r"cdr_(data|voice)_([0-9]{8})_([0-9]{6})\.csv")
"""A CDR file name: `cdr_data_YYYYmmdd_HHMMSS.csv` or `cdr_voice_YYYYmmdd_HHMMSS.csv`, matched
whole (`fullmatch`: `$` would let a name end in a newline) with ASCII digits only."""

MAX_ROW_BYTES = 8192
"""A CDR row longer than this is rejected (a starter row is about 150 bytes): far below the
1 MB a stream message may hold (Kafka's default)."""
MAX_FIELD_BYTES = 2048
"""A CDR field longer than this is rejected (the longest, website_url, is a URL)."""

MSISDN_DIGITS = 13
"""msisdn and dest_nr: 13 digits, kept as text (about 10 % start with a zero)."""

EVENT_TIME_RANGE = ("2000-01-01 00:00:00", "2100-01-01 00:00:00")
"""Event times outside this range are absurd (also catches `infinity` and `epoch`)."""

TIMESTAMP_PATTERN = r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(\.\d{1,6})?"
"""The written form of a source timestamp, CDR event times and forex ticks alike (the same regex
in Python and in Postgres; the tick sink checks its ticks with it too): `YYYY-mm-dd HH:MM:SS`
with an optional fraction of up to 6 digits (`T` also separates). Postgres' timestamp input alone
would take much more: `now`, `today`, a date without a time, `Jan 2 2024`, `01/02/2024` (read by
DateStyle) or `... 00:00:00+05` (the offset silently dropped)."""

_TIME_AT_LINE_END = re.compile(rb"," + TIMESTAMP_PATTERN.encode() + rb"\n")


@dataclass(frozen=True)
class Column:
    """One CSV column: its name, Postgres type and the check on the typed value.

    `check` is one of: None (any value, empty means NULL), ("digits", count),
    ("range", low, high), ("one_of", values), ("time_range", low, high).
    """

    name: str
    pg_type: str = "text"
    required: bool = True
    check: tuple | None = None


@dataclass(frozen=True)
class Kind:
    """A CDR file kind: its table, its columns in file order and its event time column."""

    name: str
    table: str
    columns: tuple[Column, ...]
    event_time: str
    header: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "header", ",".join(c.name for c in self.columns).encode())

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def rules_constraint(self) -> str:
        """The name of the raw table's constraint that holds the value rules."""
        return self.table.partition(".")[2] + "_value_rules"


DATA = Kind(
    name="data",
    table="cdr_data.data_records",
    columns=(
        Column("msisdn", check=("digits", MSISDN_DIGITS)),
        Column("tower_id", "integer", check=("range", 1, 2000)),
        Column("up_bytes", "bigint", check=("range", 100_000, 1_000_000)),
        Column("down_bytes", "bigint", check=("range", 100_000, 1_000_000)),
        Column("data_type", check=("one_of", ("video", "audio", "image", "text", "application"))),
        Column("ip_address", required=False),
        Column("website_url", required=False),
        Column("event_datetime", "timestamp", check=("time_range", *EVENT_TIME_RANGE)),
    ),
    event_time="event_datetime",
)

VOICE = Kind(
    name="voice",
    table="cdr_data.voice_records",
    columns=(
        Column("msisdn", check=("digits", MSISDN_DIGITS)),
        Column("tower_id", "integer", check=("range", 1, 2000)),
        Column("call_type", check=("one_of", ("voice", "video"))),
        Column("dest_nr", check=("digits", MSISDN_DIGITS)),
        Column("call_duration_sec", "integer", check=("range", 1, 1800)),
        Column("start_time", "timestamp", check=("time_range", *EVENT_TIME_RANGE)),
    ),
    event_time="start_time",
)

KINDS = {k.name: k for k in (DATA, VOICE)}
MAX_COLUMNS = max(len(k.columns) for k in KINDS.values())
# an import-time check of the constants above (see event_times_written)
assert all(k.columns[-1].name == k.event_time for k in KINDS.values())  # noqa: S101


def kind_of(file_name: str) -> Kind | None:
    """The kind of a CDR file from its name, or None when the name is not a CDR file name."""
    match = NAME_PATTERN.fullmatch(file_name)
    if match is None:
        return None
    try:
        datetime.strptime(match[2] + match[3], "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return KINDS[match[1]]


def split_lines(data: bytes) -> list[bytes]:
    """The lines of a complete file (it ends with a newline), each without its CR/LF ending."""
    newlines = data.count(b"\n")
    crlf = newlines > 0 and data.count(b"\r\n") == newlines  # every line ends CRLF: split on it
    lines = data.split(b"\r\n" if crlf else b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if crlf or b"\r" not in data:
        return lines
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def copy_ready(data: bytes, lines: list[bytes]) -> bool:
    """True when every line can go to `COPY (format csv)` as it is: no quote characters, and
    no line longer than `MAX_FIELD_BYTES` (so no field is either).

    Without quotes a CSV line is split at every comma, so a line is exactly one record and its
    line number is known; lines with quotes take the line path (Python's csv reader), and so do
    long lines, whose row and field sizes it checks.
    """
    return b'"' not in data and max(map(len, lines), default=0) <= MAX_FIELD_BYTES


def event_times_written(body: bytes, rows: int) -> bool:
    """True when each of the `rows` lines of a COPY body (LF-ended lines, see
    `cdr_landing.copy_body`) ends with an event time of `TIMESTAMP_PATTERN`: the event time is
    the last column of both kinds. One scan in C, instead of a check per line."""
    return len(_TIME_AT_LINE_END.findall(body)) == rows


def header_problem(kind: Kind, first_line: bytes) -> str | None:
    """Why the first line is not the header of `kind`, or None when it is."""
    line = first_line.removeprefix(b"\xef\xbb\xbf").rstrip(b"\r")
    if line == kind.header:
        return None
    for other in KINDS.values():
        if line == other.header:
            return f"not a CDR {kind.name} file: it has the {other.name} header"
    shown = line[:200].decode("utf-8", "backslashreplace")
    return f"not a CDR {kind.name} file: header {shown!r}, expected {kind.header.decode()!r}"


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class Rule:
    """A SQL condition over typed columns that rejects a row, and the reason it gives.

    `implied` rules are covered by a later rule; they only name the reason more precisely, so
    `invalid_sql` leaves them out.
    """

    condition: str
    reason: str
    implied: bool = False


def rules(kind: Kind) -> list[Rule]:
    """The row rules of `kind` over its typed columns, in order; the first that holds wins.

    Conditions read the columns by name, so they apply to the landed table and to the typed
    staging rows alike.
    """
    out: list[Rule] = []
    for col in kind.columns:
        name, check = col.name, col.check
        if check is None:
            continue
        if check[0] == "digits":
            out.append(
                Rule(
                    f"(length({name}) <> {check[1]} or {name} ~ '[^0-9]')",
                    f"'bad value: {name}=' || quote_literal({name})"
                    f" || ' ({check[1]} digits expected)'",
                )
            )
        elif check[0] == "range":
            low, high = check[1], check[2]
            out.append(Rule(f"{name} < 0", f"'negative value: {name}=' || {name}", implied=True))
            out.append(
                Rule(
                    f"{name} not between {low} and {high}",
                    f"'out of range: {name}=' || {name} || ' (expected {low}..{high})'",
                )
            )
        elif check[0] == "one_of":
            values = ", ".join(_quote(v) for v in check[1])
            out.append(
                Rule(
                    f"{name} not in ({values})",
                    f"'unknown type: {name}=' || quote_literal({name})"
                    f" || ' (expected one of {'|'.join(check[1])})'",
                )
            )
        elif check[0] == "time_range":
            low, high = _quote(check[1]) + "::timestamp", _quote(check[2]) + "::timestamp"
            out.append(
                Rule(
                    f"not ({name} >= {low} and {name} < {high})",
                    f"'out of range: {name}=' || {name}"
                    f" || ' (expected {check[1][:10]}..{check[2][:10]})'",
                )
            )
        else:  # pragma: no cover - a programming error in the tables above
            raise ValueError(f"unknown check {check!r}")
    return out


def reason_whens(kind: Kind) -> str:
    """The `when <condition> then <reason>` lines of the rules, for a SQL `case`."""
    return "\n".join(f"when {r.condition} then {r.reason}" for r in rules(kind))


def invalid_sql(kind: Kind) -> str:
    """A SQL boolean that is true for a typed row that breaks a rule (the same rules).

    The raw tables' value-rule constraints (`Kind.rules_constraint`) are its negation, written
    out in `contracts/wtc_analytics.sql`; a test in tests/test_cdr_loader.py checks that they agree.
    """
    return "(" + " or ".join(r.condition for r in rules(kind) if not r.implied) + ")"


def parse_line(raw: bytes) -> tuple[str, str | None, list[str]]:
    """`(text, problem, fields)` of one line without its ending; `problem` None when it parses.

    Fields are split as Python's csv module writes them (comma, minimal quoting), strictly: a
    quote in the wrong place, a stray CR or a line break inside quotes is a problem. A row over
    `MAX_ROW_BYTES` or a field over `MAX_FIELD_BYTES` is a problem; the text kept of such a row
    is its first `MAX_FIELD_BYTES` bytes.
    """
    if len(raw) > MAX_ROW_BYTES:
        kept = raw[:MAX_FIELD_BYTES].decode("utf-8", "backslashreplace").replace("\x00", "\\x00")
        return kept, f"row too long: {len(raw)} bytes > {MAX_ROW_BYTES}", []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")
        return text, "not valid UTF-8", []  # Postgres text holds no NUL: it is kept escaped
    if "\x00" in text:
        return text.replace("\x00", "\\x00"), "contains a NUL byte", []
    if text == "":
        return text, "empty line", []
    try:
        fields = next(csv.reader([text], strict=True))
    except csv.Error as exc:
        return text, f"bad CSV: {exc}", []
    for i, value in enumerate(fields, start=1):
        if len(value) > MAX_FIELD_BYTES and len(value.encode()) > MAX_FIELD_BYTES:
            size = len(value.encode())
            return text, f"field {i} too long: {size} bytes > {MAX_FIELD_BYTES}", []
    return text, None, fields
