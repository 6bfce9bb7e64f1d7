"""The local Redis's users: one per process, each allowed only the keys and commands its job needs.

The users and their rules are written once, in `contracts/redis_users.acl`, which the compose
Redis reads too (`docker/redis/users-acl.sh`). Nobody can log in as the `default` user, so a
client that does not log in gets NOAUTH (`DEFAULT_USER` says why it is not simply `off`). The
ACL file holds SHA-256 hashes of the passwords, never the passwords (they come from
`WTC_REDIS_*_PASSWORD`).

| user | may |
| --- | --- |
| `admin` | everything (the stack's own bootstrap and the tests' fixtures) |
| `hvs` | read and write the HVS keys (`hvs:*`, RENAME a wrong-type key aside); consume streams |
| `api` | read the usage hashes (`hvs:u:*`) with HGETALL; nothing else |
| `cdr_loader` | append (XADD, trimmed by time: MINID) to the CDR streams |
| `tick_sink` | consume the tick stream (it writes its ticks to Postgres, not to Redis) |
| `sources` | append to the tick stream (the forex generator, dev tooling) |
| `exporter` | the server's figures for Prometheus (INFO, CONFIG GET, SLOWLOG, ...); no key |
"""

from __future__ import annotations

import hashlib

from common.settings import CONTRACTS_DIR

USERS_FILE = CONTRACTS_DIR / "redis_users.acl"


def read_rules(text: str) -> dict[str, str]:
    """{user: rules} of a users file: `user <name> <rules>` lines, comments and blanks dropped."""
    rules: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, name, *rest = [*line.split(maxsplit=2), ""]
        if word != "user" or not name or name == "default" or name in rules:
            raise ValueError(f"{USERS_FILE.name}:{number}: expected `user <name> <rules>` once")
        rules[name] = rest[0].strip()
    return rules


RULES: dict[str, str] = read_rules(USERS_FILE.read_text())
ROLES = tuple(RULES)


DEFAULT_USER = "user default on resetpass ~* &* +@all"
"""No password and no `nopass`: nobody can log in as `default`, and a client that has not logged
in gets NOAUTH. It is not `off`, and keeps every right, because Redis replays its append-only
file as `default` and re-checks that user's rights at each EXEC it replays (redis/redis#14541,
fixed upstream by #14545, after the Redis 7.0 the stack runs): with `default off`, every
transaction in the AOF, and so the effects of every script with more than one write (the HVS
apply script's), was dropped in silence at a restart."""


def acl_file(passwords: dict[str, str | None]) -> str:
    """The ACL file for `passwords` ({user: password}); nobody can log in as `default`
    (`DEFAULT_USER`), nor as a user whose password is missing or empty (it is off)."""
    lines = [DEFAULT_USER]
    for role in ROLES:
        secret = passwords.get(role)
        login = f"on #{hashlib.sha256(secret.encode()).hexdigest()}" if secret else "off"
        lines.append(f"user {role} {login} resetchannels {RULES[role]}")
    return "\n".join(lines) + "\n"
