"""The local Redis's users: one per process, each allowed only the keys and commands its job needs.

The `default` user is off, so a client that does not log in gets NOAUTH. The ACL file holds
SHA-256 hashes of the passwords, never the passwords (they come from `WTC_REDIS_*_PASSWORD`).

| user | may |
| --- | --- |
| `admin` | everything (the stack's own bootstrap and the tests' fixtures) |
| `hvs` | read and write the HVS keys (`hvs:*`, RENAME a wrong-type key aside); consume streams |
| `api` | read the usage hashes (`hvs:u:*`) with HGETALL; nothing else |
| `cdr_loader` | append (XADD, trimmed by time: MINID) to the CDR streams |
| `tick_sink` | consume the tick stream (it writes its ticks to Postgres, not to Redis) |
| `sources` | append to the tick stream (the forex generator, dev tooling) |
| `exporter` | the server's figures for Prometheus (INFO, CONFIG GET, SLOWLOG, ...); no key |

Consuming a stream in a group (XREADGROUP, XACK, XAUTOCLAIM, XGROUP) changes the group's state,
so Redis counts it as a write of the stream key: a consumer's rights on a stream are limited by
command (a selector), not by key alone, so that it cannot XADD, XDEL or XTRIM the stream. EVAL
runs the one script that removes consumers that are gone (check and removal in one step,
`ingestion/stream/redis_streams.py`); inside a script every command is checked against the same
rights, so it adds none. A producer trims with XADD's MINID only, after reading the groups'
positions (XINFO GROUPS, XPENDING): no XTRIM, XDEL or XRANGE.
"""

from __future__ import annotations

import hashlib

from hvs.keys import PREFIX as HVS_PREFIX
from hvs.keys import usage_key
from ingestion.cdr_publish import CDR_DATA_TOPIC, CDR_VOICE_TOPIC
from ingestion.stream import stream_key

TICK_TOPIC = "tick-data"
CDR_STREAMS = (stream_key(CDR_DATA_TOPIC), stream_key(CDR_VOICE_TOPIC))
TICK_STREAM = stream_key(TICK_TOPIC)

ROLES = ("admin", "hvs", "api", "cdr_loader", "tick_sink", "sources", "exporter")

# AUTH, HELLO, PING, SELECT and the like, without CLIENT KILL and the other admin commands
_CONNECT = "-@all +@connection -@admin -@dangerous +select"
_CONSUME = "+xreadgroup +xack +xautoclaim +xclaim +xpending +xgroup|create +xgroup|delconsumer "
_CONSUME += "+xinfo|groups +xinfo|consumers +eval"
# XADD with MINID trims by time; the producer first reads how far every group has got
_PRODUCE = "+xadd +xinfo|groups +xpending"


def _keys(*patterns: str, mode: str = "") -> str:
    return " ".join(f"{mode}~{p}" for p in patterns)


def _consumer(*streams: str) -> str:
    """A selector: consume `streams` in a group, nothing more."""
    return f"({_keys(*streams)} {_CONSUME})"


RULES: dict[str, str] = {
    "admin": "~* &* +@all",
    "hvs": (
        f"{_keys(HVS_PREFIX + '*')} {_CONNECT} +@hash +@bitmap +@set +@list +setrange +expire "
        "+del +eval +evalsha +script|load +@transaction -@admin -@dangerous +scan +type "
        "+rename "
        f"{_consumer(*CDR_STREAMS, TICK_STREAM)}"
    ),
    "api": f"{_keys(usage_key('*', '*'), mode='%R')} {_CONNECT} +hgetall",
    "cdr_loader": f"{_keys(*CDR_STREAMS)} {_CONNECT} {_PRODUCE}",
    "tick_sink": f"{_CONNECT} {_consumer(TICK_STREAM)}",
    "sources": f"{_keys(TICK_STREAM)} {_CONNECT} {_PRODUCE}",
    # Prometheus' redis exporter: the server's figures, no key and no value
    "exporter": (
        f"{_CONNECT} +info +dbsize +config|get +slowlog|get +slowlog|len +latency|latest "
        "+client|list +memory|stats"
    ),
}


def acl_file(passwords: dict[str, str]) -> str:
    """The ACL file for `passwords` ({role: password}); `default` is off."""
    lines = ["user default off resetkeys resetchannels -@all"]
    for role in ROLES:
        digest = hashlib.sha256(passwords[role].encode()).hexdigest()
        lines.append(f"user {role} on #{digest} resetchannels {RULES[role]}")
    return "\n".join(lines) + "\n"
