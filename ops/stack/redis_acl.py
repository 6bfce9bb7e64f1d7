"""The local Redis's users: one per process, each allowed only the keys and commands its job needs.

The users and their rules are written once, in `contracts/redis_users.acl`, which the compose
Redis reads too (`docker/redis/users-acl.sh`). The `default` user is off, so a client that does
not log in gets NOAUTH. The ACL file holds SHA-256 hashes of the passwords, never the passwords
(they come from `WTC_REDIS_*_PASSWORD`).

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


def acl_file(passwords: dict[str, str | None]) -> str:
    """The ACL file for `passwords` ({user: password}); `default` is off, and so is a user
    whose password is missing or empty (nobody can log in as it)."""
    lines = ["user default off resetkeys resetchannels -@all"]
    for role in ROLES:
        secret = passwords.get(role)
        login = f"on #{hashlib.sha256(secret.encode()).hexdigest()}" if secret else "off"
        lines.append(f"user {role} {login} resetchannels {RULES[role]}")
    return "\n".join(lines) + "\n"
