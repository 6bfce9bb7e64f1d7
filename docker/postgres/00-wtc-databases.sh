#!/usr/bin/env bash
# First-start bootstrap of the scale-out Postgres (run once by the postgres image's entrypoint
# from /docker-entrypoint-initdb.d): create the two databases and apply the same SQL the
# embedded stack applies (contracts/, mounted read-only at /docker-entrypoint-initdb.d/sql; the
# entrypoint ignores that sub-directory itself, this script applies each file to its database).
set -euo pipefail

psql_as_admin() {
    psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" "$@"
}

for database in wtc_prod wtc_analytics; do
    if [[ -z "$(psql_as_admin --dbname postgres -tAc \
        "select 1 from pg_database where datname = '${database}'")" ]]; then
        psql_as_admin --dbname postgres -c "create database ${database}"
    fi
done

psql_as_admin --dbname wtc_prod -f /docker-entrypoint-initdb.d/sql/wtc_prod.sql
psql_as_admin --dbname wtc_analytics -f /docker-entrypoint-initdb.d/sql/wtc_analytics.sql
