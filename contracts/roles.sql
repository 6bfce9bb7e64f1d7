-- The job roles (cluster-wide): one login per job, each with only the rights that job needs.
-- Applied as the superuser by the local stack (ops/stack/pg_roles.py) and by the compose init
-- (docker/postgres/00-wtc-databases.sh), on any database, before the grants of
-- wtc_prod_grants.sql and wtc_analytics_grants.sql. Idempotent.
--
-- Passwords never appear here: the caller sets `wtc.password_<job>` in its session
-- (set_config) from the environment (`WTC_PG_<JOB>_PASSWORD`); a role gets the password given,
-- and a role that has none and is given none is an error naming the setting.
--
-- | role          | job                                   | attributes            |
-- | wtc_loader    | CDR loader, tick sink                 | login                 |
-- | wtc_cdc       | the embedded CRM change capture       | login, replication    |
-- | wtc_dbt       | dbt                                   | login, pg_read_all_stats |
-- | wtc_analyst   | people, BI                            | login                 |
-- | wtc_debezium  | Debezium's CRM source (Kafka Connect) | login, replication    |
-- | wtc_sink      | the JDBC sinks (Kafka Connect)        | login                 |
-- | wtc_exporter  | Prometheus' postgres exporter         | login, pg_monitor     |
-- | wtc_probe     | the SFTP drop probe (monitoring)      | login                 |
do $roles$
declare
    job record;
    secret text;
begin
    for job in
        select *
        from (values
            ('loader', false),
            ('cdc', true),
            ('dbt', false),
            ('analyst', false),
            ('debezium', true),
            ('sink', false),
            ('exporter', false),
            ('probe', false)
        ) as jobs (name, replication)
    loop
        if not exists (select from pg_roles where rolname = 'wtc_' || job.name) then
            execute format('create role %I', 'wtc_' || job.name);
        end if;
        execute format(
            'alter role %I with login nosuperuser nocreatedb nocreaterole nobypassrls %s',
            'wtc_' || job.name,
            case when job.replication then 'replication' else 'noreplication' end
        );
        secret := current_setting('wtc.password_' || job.name, true);
        if coalesce(secret, '') <> '' then
            execute format('alter role %I password %L', 'wtc_' || job.name, secret);
        elsif (select rolpassword is null from pg_authid where rolname = 'wtc_' || job.name) then
            raise exception 'role wtc_% has no password: set wtc.password_% (WTC_PG_%_PASSWORD)',
                job.name, job.name, upper(job.name);
        end if;
    end loop;
end
$roles$;

-- dbt's incremental models take their landing horizon from the oldest open transaction
-- (dbt/macros/landing_marks.sql): it must see the other roles' sessions, not their data.
grant pg_read_all_stats to wtc_dbt;
-- the exporter reads the server's statistics and settings, never a table's rows
grant pg_monitor to wtc_exporter;
