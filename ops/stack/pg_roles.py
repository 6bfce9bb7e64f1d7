"""The local Postgres's roles: one per job, each with only the rights that job needs.

The roles and their rights are written once, as SQL in `contracts/` (`roles.sql`,
`wtc_prod_grants.sql`, `wtc_analytics_grants.sql`), and applied by this module for the local
stack and by the compose init (`docker/postgres/00-wtc-databases.sh`) alike; the tables there
say which role may do what.

The superuser (`WTC_PG_USER`) stays the stack's own: it bootstraps the databases and applies the
contract. Passwords come from `WTC_PG_<ROLE>_PASSWORD` and reach the SQL as the session setting
`wtc.password_<role>`; the defaults are the local stack's only. Granting is idempotent:
`bootstrap` runs it every start.
"""

from __future__ import annotations

import re

from psycopg import Connection, sql

from common.settings import CONTRACTS_DIR
from ingestion.crm_cdc import PUBLISHED_OPERATIONS

ROLES_SQL = CONTRACTS_DIR / "roles.sql"
PROD_GRANTS_SQL = CONTRACTS_DIR / "wtc_prod_grants.sql"
ANALYTICS_GRANTS_SQL = CONTRACTS_DIR / "wtc_analytics_grants.sql"


def _roles(text: str) -> tuple[str, ...]:
    """The jobs of `roles.sql`'s `values` list, in its order."""
    block = re.search(r"from \(values(.*?)\) as jobs", text, re.S)
    if not block:
        raise ValueError(f"no `(values ...) as jobs` list in {ROLES_SQL}")
    return tuple(re.findall(r"\('([a-z_]+)', (?:true|false)\)", block.group(1)))


ROLES = _roles(ROLES_SQL.read_text())
"""The jobs that have a role (`wtc_<job>`): loader, cdc, dbt, analyst, debezium, sink,
exporter, probe."""


def role_name(role: str) -> str:
    return f"wtc_{role}"


def ensure_roles(conn: Connection, passwords: dict[str, str]) -> None:
    """Create or update the login roles (cluster-wide) with their passwords (stored as SCRAM)."""
    for role in ROLES:
        conn.execute("select set_config(%s, %s, false)", [f"wtc.password_{role}", passwords[role]])
    try:
        conn.execute(ROLES_SQL.read_text())
    finally:
        for role in ROLES:
            conn.execute("select set_config(%s, '', false)", [f"wtc.password_{role}"])


def grant_analytics(conn: Connection) -> None:
    """The rights in the warehouse database `conn` is on (after its contract is applied)."""
    conn.execute(ANALYTICS_GRANTS_SQL.read_text())


def grant_prod(conn: Connection, publication: str, tables: list[str]) -> None:
    """The rights in `wtc_prod`, Debezium's publication, and the embedded change capture's
    publication `publication` (named by the reader's settings). A publication of tables needs
    their owner, and the change capture owns nothing in the source."""
    conn.execute(PROD_GRANTS_SQL.read_text())
    if not conn.execute(
        "select 1 from pg_publication where pubname = %s", [publication]
    ).fetchone():
        conn.execute(
            sql.SQL("create publication {} for table {} with (publish = {})").format(
                sql.Identifier(publication),
                sql.SQL(", ").join(sql.Identifier("crm_system", t) for t in tables),
                sql.Literal(PUBLISHED_OPERATIONS),
            )
        )
    else:  # made before TRUNCATE was published: the change capture must see it (and stop)
        conn.execute(
            sql.SQL("alter publication {} set (publish = {})").format(
                sql.Identifier(publication), sql.Literal(PUBLISHED_OPERATIONS)
            )
        )
