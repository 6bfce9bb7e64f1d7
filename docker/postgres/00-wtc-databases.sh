#!/usr/bin/env bash
# First-start bootstrap of the scale-out Postgres (run once by the postgres image's entrypoint
# from /docker-entrypoint-initdb.d): create the two databases, apply the same SQL the embedded
# stack applies (contracts/, mounted read-only at /docker-entrypoint-initdb.d/sql; the
# entrypoint ignores that sub-directory itself, this script applies each file to its database),
# and make the job roles with their grants (contracts/roles.sql, *_grants.sql: the same
# definitions ops/stack/pg_roles.py applies to the local stack).
#
# Each role's password comes from WTC_PG_<ROLE>_PASSWORD and reaches the SQL as the session
# setting wtc.password_<role> (read by psql's \getenv, never on a command line nor printed).
# With WTC_ENV=production a development default password is refused, naming the variable.
set -euo pipefail

SQL=/docker-entrypoint-initdb.d/sql

psql_as_admin() {
    psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "$POSTGRES_USER" "$@"
}

refuse_dev_secret() {  # variable value
    if [[ "${WTC_ENV:-development}" == production ]] \
        && [[ -z "$2" || "$2" == dev-* || "$2" == postgres || "$2" == password ]]; then
        echo "WTC_ENV=production and $1 is unset or a development default: set it" >&2
        exit 1
    fi
}

refuse_dev_secret POSTGRES_PASSWORD "${POSTGRES_PASSWORD:-}"

for database in wtc_prod wtc_analytics; do
    if [[ -z "$(psql_as_admin --dbname postgres -tAc \
        "select 1 from pg_database where datname = '${database}'")" ]]; then
        psql_as_admin --dbname postgres -c "create database ${database}"
    fi
done

psql_as_admin --dbname wtc_prod -f "$SQL/wtc_prod.sql"
psql_as_admin --dbname wtc_analytics -f "$SQL/wtc_analytics.sql"

# The roles of contracts/roles.sql, each with the password of its variable.
roles=$(sed -n "s/^ *('\([a-z_]*\)', \(true\|false\)),\{0,1\}$/\1/p" "$SQL/roles.sql")
[[ -n "$roles" ]] || { echo "no roles found in $SQL/roles.sql" >&2; exit 1; }
{
    echo '\o /dev/null'
    for role in $roles; do
        variable="WTC_PG_${role^^}_PASSWORD"
        if [[ -z "${!variable:-}" ]]; then
            echo "$variable is not set: the role wtc_$role needs a password" >&2
            exit 1
        fi
        refuse_dev_secret "$variable" "${!variable}"
        echo "\\getenv secret $variable"
        echo "select set_config('wtc.password_$role', :'secret', false);"
    done
    echo '\unset secret'
    echo '\o'
    echo "\\i $SQL/roles.sql"
} | psql_as_admin --dbname postgres

psql_as_admin --dbname wtc_prod -f "$SQL/wtc_prod_grants.sql"
psql_as_admin --dbname wtc_analytics -f "$SQL/wtc_analytics_grants.sql"
