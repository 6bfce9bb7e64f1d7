"""HTTP basic authentication for the usage API: PBKDF2-SHA256 password hashes from configuration.

A hash is `pbkdf2_sha256$<iterations>$<salt base64>$<digest base64>`; make one with
`python -m api.auth hash` (asks for the password). Users come from `API_USERS`
(`user:hash,user:hash`). Checks are constant time (`hmac.compare_digest`), and an unknown user
is checked against a dummy hash so that the answer takes as long as for a known one.

PBKDF2 is deliberately slow (about 30 ms here), too slow to run on every request, so a
successful check is remembered for a short while (`cache_seconds`) as a keyed SHA-256 of the
password (`_verified`, one entry per user, held in memory only): a repeated correct password
costs one HMAC, a wrong one always pays the full PBKDF2. `FailureLimiter` counts failed logins
per client so that a client that keeps failing is turned away before any PBKDF2 is spent.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import os
import sys
import time
from collections import deque

ALGORITHM = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 100_000


class ConfigError(ValueError):
    """API_USERS is malformed."""


def hash_password(
    password: str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> str:
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return "$".join(
        (
            ALGORITHM,
            str(iterations),
            base64.b64encode(salt).decode(),
            base64.b64encode(digest).decode(),
        )
    )


def _parse_hash(encoded: str) -> tuple[int, bytes, bytes]:
    try:
        algorithm, iterations, salt, digest = encoded.split("$")
        if algorithm != ALGORITHM:
            raise ValueError(f"unsupported algorithm {algorithm!r}")
        return (
            int(iterations),
            base64.b64decode(salt, validate=True),
            base64.b64decode(digest, validate=True),
        )
    except ValueError as exc:
        raise ConfigError(f"bad password hash: {exc}") from None


def verify_password(password: str, encoded: str) -> bool:
    iterations, salt, digest = _parse_hash(encoded)
    candidate = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return hmac.compare_digest(candidate, digest)


def parse_users(spec: str) -> dict[str, str]:
    """{user: hash} from `user:hash,user:hash` (a hash contains no comma or colon)."""
    users: dict[str, str] = {}
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry:
            continue
        user, sep, encoded = entry.partition(":")
        if not sep or not user:
            raise ConfigError(f"API_USERS entry {entry[:20]!r}... is not user:hash")
        _parse_hash(encoded)
        users[user] = encoded
    if not users:
        raise ConfigError("API_USERS defines no user")
    return users


class Authenticator:
    """Checks basic-auth credentials against the configured users."""

    def __init__(self, users: dict[str, str], cache_seconds: float = 300.0) -> None:
        self._users = users
        self._cache_seconds = cache_seconds
        self._dummy = hash_password(
            "not a password", iterations=_parse_hash(next(iter(users.values())))[0]
        )
        self._key = os.urandom(32)
        self._verified: dict[str, tuple[bytes, float]] = {}

    def _tag(self, user: str, password: str) -> bytes:
        return hmac.new(self._key, f"{user}\x00{password}".encode(), hashlib.sha256).digest()

    def check_cached(self, user: str, password: str) -> bool | None:
        """True if these credentials were verified before; None if a full check is needed."""
        known = self._verified.get(user)
        if known is None:
            return None
        tag, until = known
        if time.monotonic() >= until:
            self._verified.pop(user, None)
            return None
        return True if hmac.compare_digest(tag, self._tag(user, password)) else None

    def check(self, user: str, password: str) -> bool:
        """The full check (PBKDF2): slow on purpose; remembers success."""
        if self.check_cached(user, password):
            return True
        encoded = self._users.get(user)
        if encoded is None:
            verify_password(password, self._dummy)
            return False
        if verify_password(password, encoded):
            until = time.monotonic() + self._cache_seconds
            self._verified[user] = (self._tag(user, password), until)
            return True
        return False


class FailureLimiter:
    """Failed logins per client in a sliding window: a client with `limit` failures in the last
    `window` seconds is refused until its oldest failure leaves the window. At most
    `max_clients` are tracked (the quietest are forgotten first), so a flood from many addresses
    cannot grow memory without bound."""

    def __init__(self, limit: int, window: float = 60.0, max_clients: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, client: str, now: float | None = None) -> int:
        """Whole seconds until `client` may try again; 0 when it may try now."""
        failures = self._failures.get(client)
        if failures is None or self.limit <= 0:
            return 0
        now = time.monotonic() if now is None else now
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return 0
        if len(failures) < self.limit:
            return 0
        return max(1, int(failures[0] + self.window - now + 0.999))

    def failed(self, client: str, now: float | None = None) -> None:
        """Count one failed login of `client`."""
        if self.limit <= 0:
            return
        now = time.monotonic() if now is None else now
        failures = self._failures.get(client)
        if failures is None:
            if len(self._failures) >= self.max_clients:
                self._forget(now)
            failures = self._failures[client] = deque(maxlen=self.limit)
        failures.append(now)

    def _forget(self, now: float) -> None:
        """Drop clients with no failure in the window; if none, the one idle longest."""
        stale = [c for c, f in self._failures.items() if not f or f[-1] <= now - self.window]
        for client in stale:
            del self._failures[client]
        if not stale:
            oldest = min(self._failures, key=lambda c: self._failures[c][-1])
            del self._failures[oldest]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m api.auth", description="Make a password hash for API_USERS."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hash", help="print user:hash for a password read from the terminal")
    h.add_argument("user")
    h.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    args = parser.parse_args(argv)
    password = (
        getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    )
    if not password:
        parser.error("empty password")
    print(f"{args.user}:{hash_password(password, args.iterations)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
