"""A decoder for Postgres's built-in `pgoutput` logical replication protocol (version 1).

Pure functions over bytes, no I/O. Covers the messages a publication with
`publish = 'insert, update, delete'` produces: Begin, Commit, Origin, Relation, Type, Insert,
Update, Delete (and Truncate and logical Message, decoded but not needed by the CRM reader).
Column values arrive in Postgres's text output format; `None` is SQL NULL and `UNCHANGED` marks
an unchanged TOASTed value that the message does not carry.

Reference: https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

PG_EPOCH_MS: Final = 946_684_800_000
"""Postgres counts time in microseconds from 2000-01-01 00:00 UTC: that epoch in Unix ms."""


class Unchanged:
    """An unchanged TOASTed column value ('u'): the message does not carry it."""

    _instance: Unchanged | None = None

    def __new__(cls) -> Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged()

Value = str | None | Unchanged


class DecodeError(ValueError):
    """The bytes are not a pgoutput message this decoder understands."""


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    relation_id: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.namespace}.{self.name}"

    @property
    def key_columns(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.is_key)


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    """LSN of the transaction's commit record."""
    commit_ts_us: int
    """Commit time, microseconds since 2000-01-01 UTC."""
    xid: int

    @property
    def commit_ts_ms(self) -> int:
        """Commit time in Unix epoch milliseconds (what Debezium calls `source.ts_ms`)."""
        return pg_us_to_unix_ms(self.commit_ts_us)


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    """End of the commit record: the position a consumer confirms after the transaction."""
    commit_ts_us: int


@dataclass(frozen=True, slots=True)
class Origin:
    lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Type:
    type_oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    relation_id: int
    new: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Update:
    relation_id: int
    old: tuple[Value, ...] | None
    """The old key ('K', only when the key changed) or old row ('O', REPLICA IDENTITY FULL)."""
    old_kind: str | None
    new: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Delete:
    relation_id: int
    old: tuple[Value, ...]
    """Key columns only ('K', non-key columns None) unless REPLICA IDENTITY FULL ('O')."""
    old_kind: str


@dataclass(frozen=True, slots=True)
class Truncate:
    options: int
    relation_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Message = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | LogicalMessage
)


def pg_us_to_unix_ms(us: int) -> int:
    """Postgres microseconds since 2000-01-01 to Unix epoch milliseconds (floor)."""
    return us // 1000 + PG_EPOCH_MS


def lsn_to_int(lsn: str) -> int:
    """`'16/B374D848'` to 0x16B374D848."""
    hi, _, lo = lsn.partition("/")
    if not lo:
        raise ValueError(f"not an LSN: {lsn!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


def int_to_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def _unpack(self, fmt: struct.Struct) -> int:
        try:
            (value,) = fmt.unpack_from(self.buf, self.pos)
        except struct.error as exc:
            raise DecodeError(f"message truncated at byte {self.pos}") from exc
        self.pos += fmt.size
        return value

    def int8(self) -> int:
        return self._unpack(_I8)

    def int16(self) -> int:
        return self._unpack(_I16)

    def int32(self) -> int:
        return self._unpack(_I32)

    def uint32(self) -> int:
        return self._unpack(_U32)

    def int64(self) -> int:
        return self._unpack(_I64)

    def uint64(self) -> int:
        return self._unpack(_U64)

    def byte(self) -> str:
        if self.pos >= len(self.buf):
            raise DecodeError(f"message truncated at byte {self.pos}")
        b = self.buf[self.pos]
        self.pos += 1
        return chr(b)

    def string(self) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise DecodeError(f"unterminated string at byte {self.pos}")
        s = self.buf[self.pos : end].decode()
        self.pos = end + 1
        return s

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise DecodeError(f"message truncated at byte {self.pos}")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def tuple_data(self) -> tuple[Value, ...]:
        n = self.int16()
        values: list[Value] = []
        for _ in range(n):
            kind = self.byte()
            if kind == "n":
                values.append(None)
            elif kind == "u":
                values.append(UNCHANGED)
            elif kind == "t":
                values.append(self.raw(self.int32()).decode())
            elif kind == "b":
                raise DecodeError("binary column values are not supported (use proto_version 1)")
            else:
                raise DecodeError(f"unknown tuple column kind {kind!r}")
        return tuple(values)


_I8 = struct.Struct("!b")
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I64 = struct.Struct("!q")
_U64 = struct.Struct("!Q")


def decode(data: bytes) -> Message:
    """Decode one pgoutput message (one row of `pg_logical_slot_*_binary_changes`)."""
    if not data:
        raise DecodeError("empty message")
    r = _Reader(bytes(data))
    tag = r.byte()
    msg: Message
    if tag == "B":
        msg = Begin(final_lsn=r.uint64(), commit_ts_us=r.int64(), xid=r.uint32())
    elif tag == "C":
        msg = Commit(
            flags=r.int8(), commit_lsn=r.uint64(), end_lsn=r.uint64(), commit_ts_us=r.int64()
        )
    elif tag == "O":
        msg = Origin(lsn=r.uint64(), name=r.string())
    elif tag == "R":
        rel_id, ns, name = r.uint32(), r.string(), r.string()
        identity = r.byte()
        cols = []
        for _ in range(r.int16()):
            flags = r.int8()
            cols.append(Column(r.string(), r.uint32(), r.int32(), bool(flags & 1)))
        msg = Relation(rel_id, ns or "pg_catalog", name, identity, tuple(cols))
    elif tag == "Y":
        msg = Type(type_oid=r.uint32(), namespace=r.string(), name=r.string())
    elif tag == "I":
        rel_id = r.uint32()
        if r.byte() != "N":
            raise DecodeError("insert without a new tuple")
        msg = Insert(rel_id, r.tuple_data())
    elif tag == "U":
        rel_id = r.uint32()
        kind = r.byte()
        old, old_kind = None, None
        if kind in ("K", "O"):
            old, old_kind = r.tuple_data(), kind
            kind = r.byte()
        if kind != "N":
            raise DecodeError(f"update without a new tuple (got {kind!r})")
        msg = Update(rel_id, old, old_kind, r.tuple_data())
    elif tag == "D":
        rel_id = r.uint32()
        kind = r.byte()
        if kind not in ("K", "O"):
            raise DecodeError(f"delete without an old key or row (got {kind!r})")
        msg = Delete(rel_id, r.tuple_data(), kind)
    elif tag == "T":
        n, options = r.int32(), r.int8()
        msg = Truncate(options, tuple(r.uint32() for _ in range(n)))
    elif tag == "M":
        transactional = bool(r.int8() & 1)
        lsn, prefix = r.uint64(), r.string()
        msg = LogicalMessage(transactional, lsn, prefix, r.raw(r.int32()))
    else:
        raise DecodeError(f"unknown pgoutput message type {tag!r}")
    if r.pos != len(r.buf):
        raise DecodeError(f"{len(r.buf) - r.pos} trailing bytes after a {tag!r} message")
    return msg
