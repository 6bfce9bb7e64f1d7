"""The local Postgres's roles: one per job, each with only the rights that job needs.

- `wtc_loader`, the CDR loader and the tick sink: read and write `cdr_data` and `forex_data`;
- `wtc_cdc`, the CRM change capture: replication, read `wtc_prod.crm_system`, write `crm_data`
  (its change log) and manage its replication origin;
- `wtc_dbt`: read every raw schema; owns `staging`, `intermediate` and `prepared_layers`; sees
  other sessions' start times (`pg_read_all_stats`) for its landing horizons;
- `wtc_analyst`, BI and people: read `prepared_layers`, nothing else.

The superuser (`WTC_PG_USER`) stays the stack's own: it bootstraps the databases and applies the
contract. Passwords come from `WTC_PG_<ROLE>_PASSWORD`; the defaults are the local stack's only.
Granting is idempotent: `bootstrap` runs it every start.
"""

from __future__ import annotations

from psycopg import Connection, sql

from ingestion.crm_cdc import PUBLISHED_OPERATIONS

ROLES = ("loader", "cdc", "dbt", "analyst")
RAW_SCHEMAS = ("cdr_data", "crm_data", "forex_data")
DBT_SCHEMAS = ("staging", "intermediate", "prepared_layers")
LOADER_SCHEMAS = ("cdr_data", "forex_data")
CDC_SCHEMAS = ("crm_data",)
ORIGIN_FUNCTIONS = (
    "pg_replication_origin_create(text)",
    "pg_replication_origin_drop(text)",
    "pg_replication_origin_oid(text)",
    "pg_replication_origin_session_setup(text)",
    "pg_replication_origin_session_reset()",
    "pg_replication_origin_xact_setup(pg_lsn, timestamp with time zone)",
    "pg_replication_origin_advance(text, pg_lsn)",
    "pg_replication_origin_progress(text, boolean)",
)


def role_name(role: str) -> str:
    return f"wtc_{role}"


def ensure_roles(conn: Connection, passwords: dict[str, str]) -> None:
    """Create or update the login roles (cluster-wide) with their passwords (stored as SCRAM)."""
    existing = {r[0] for r in conn.execute("select rolname from pg_roles")}
    for role in ROLES:
        name = sql.Identifier(role_name(role))
        verb = "alter" if role_name(role) in existing else "create"
        attributes = "login replication" if role == "cdc" else "login noreplication"
        conn.execute(
            sql.SQL(
                verb + " role {} with " + attributes + " nosuperuser nocreatedb nocreaterole "
                "password {}"
            ).format(name, sql.Literal(passwords[role]))
        )


def grant_analytics(conn: Connection, superuser: str) -> None:
    """The rights in `wtc_analytics` (run as the superuser, after the contract is applied)."""
    loader, cdc, dbt, analyst = (sql.Identifier(role_name(r)) for r in ROLES)
    owner = sql.Identifier(superuser)
    run = conn.execute
    run(sql.SQL("revoke all on database wtc_analytics from public"))
    run(
        sql.SQL("grant connect, temporary on database wtc_analytics to {}, {}, {}, {}").format(
            loader, cdc, dbt, analyst
        )
    )
    run(sql.SQL("revoke create on schema public from public"))
    # dbt's incremental models take their landing horizon from the oldest open transaction
    # (dbt/macros/landing_marks.sql): it must see the other roles' sessions, not their queries'
    # data (Postgres' read-only statistics role)
    run(sql.SQL("grant pg_read_all_stats to {}").format(dbt))
    for schema in DBT_SCHEMAS:
        run(
            sql.SQL("create schema if not exists {} authorization {}").format(
                sql.Identifier(schema), dbt
            )
        )
        run(sql.SQL("alter schema {} owner to {}").format(sql.Identifier(schema), dbt))
    # tables made before the roles existed (a state folder from an older checkout)
    for schema, name, kind in run(
        "select n.nspname, c.relname, c.relkind from pg_class as c "
        "join pg_namespace as n on n.oid = c.relnamespace "
        "where n.nspname = any(%s) and c.relkind in ('r', 'v', 'm', 'p') "
        "and c.relowner <> %s::regrole",
        [list(DBT_SCHEMAS), role_name("dbt")],
    ).fetchall():
        what = {"r": "table", "p": "table", "v": "view", "m": "materialized view"}[kind]
        run(
            sql.SQL(f"alter {what} {{}}.{{}} owner to {{}}").format(
                sql.Identifier(schema), sql.Identifier(name), dbt
            )
        )
    writers = {**dict.fromkeys(LOADER_SCHEMAS, loader), **dict.fromkeys(CDC_SCHEMAS, cdc)}
    for schema in RAW_SCHEMAS:
        ident = sql.Identifier(schema)
        writer = writers[schema]
        run(sql.SQL("revoke all on schema {} from public").format(ident))
        run(sql.SQL("grant usage on schema {} to {}, {}").format(ident, writer, dbt))
        run(
            sql.SQL("grant select, insert, update, delete on all tables in schema {} to {}").format(
                ident, writer
            )
        )
        run(
            sql.SQL("grant usage, select on all sequences in schema {} to {}").format(ident, writer)
        )
        run(sql.SQL("grant select on all tables in schema {} to {}").format(ident, dbt))
        run(
            sql.SQL(
                "alter default privileges for role {} in schema {} "
                "grant select, insert, update, delete on tables to {}"
            ).format(owner, ident, writer)
        )
        run(
            sql.SQL(
                "alter default privileges for role {} in schema {} "
                "grant usage, select on sequences to {}"
            ).format(owner, ident, writer)
        )
        run(
            sql.SQL(
                "alter default privileges for role {} in schema {} grant select on tables to {}"
            ).format(owner, ident, dbt)
        )
    prepared = sql.Identifier("prepared_layers")
    run(sql.SQL("grant usage on schema {} to {}").format(prepared, analyst))
    run(sql.SQL("grant select on all tables in schema {} to {}").format(prepared, analyst))
    run(
        sql.SQL(
            "alter default privileges for role {} in schema {} grant select on tables to {}"
        ).format(dbt, prepared, analyst)
    )
    for function in ORIGIN_FUNCTIONS:
        run(sql.SQL(f"grant execute on function {function} to {{}}").format(cdc))


def grant_prod(conn: Connection, publication: str, tables: list[str]) -> None:
    """The rights in `wtc_prod`: the change capture reads the CRM tables, nobody else comes in.
    Its publication is made here: a publication of tables needs their owner, and the change
    capture owns nothing in the source."""
    cdc = sql.Identifier(role_name("cdc"))
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
    conn.execute(sql.SQL("revoke all on database wtc_prod from public"))
    conn.execute(sql.SQL("grant connect on database wtc_prod to {}").format(cdc))
    conn.execute(sql.SQL("grant usage on schema crm_system to {}").format(cdc))
    conn.execute(sql.SQL("grant select on all tables in schema crm_system to {}").format(cdc))
