-- The job roles' rights in the warehouse (roles.sql makes the roles). Applied as the superuser
-- after wtc_analytics.sql, by the local stack and by the compose init; idempotent. Written for
-- the current database, so a second warehouse database (the tests' sink databases) gets the
-- same rights.
--
-- | role         | may                                                                 |
-- | wtc_loader   | read and write cdr_data and forex_data; temporary tables             |
-- | wtc_cdc      | read and write crm_data (its change log); its replication origin     |
-- | wtc_sink     | read, insert and update crm_data (the JDBC sinks' upserts)           |
-- | wtc_dbt      | read every raw schema; own staging, intermediate, prepared_layers    |
-- | wtc_analyst  | read prepared_layers                                                 |
-- | wtc_exporter | connect (its statistics come from pg_monitor); no schema, no table   |
-- | wtc_probe    | read cdr_data.files                                                  |
-- Nobody else: public loses every right on the database, its public schema and the raw schemas.

do $database$
begin
    execute format('revoke all on database %I from public', current_database());
    execute format(
        'grant connect, temporary on database %I to wtc_loader, wtc_cdc, wtc_dbt, wtc_analyst',
        current_database()
    );
    execute format(
        'grant connect on database %I to wtc_sink, wtc_exporter, wtc_probe', current_database()
    );
end
$database$;

revoke create on schema public from public;

-- dbt's schemas: owned by its role, with what it built before the roles existed
create schema if not exists staging authorization wtc_dbt;
create schema if not exists intermediate authorization wtc_dbt;
create schema if not exists prepared_layers authorization wtc_dbt;
alter schema staging owner to wtc_dbt;
alter schema intermediate owner to wtc_dbt;
alter schema prepared_layers owner to wtc_dbt;

do $owned$
declare
    rel record;
begin
    for rel in
        select n.nspname, c.relname, c.relkind
        from pg_class as c
        inner join pg_namespace as n on c.relnamespace = n.oid
        where
            n.nspname in ('staging', 'intermediate', 'prepared_layers')
            and c.relkind in ('r', 'p', 'v', 'm')
            and c.relowner <> 'wtc_dbt'::regrole
    loop
        execute format(
            'alter %s %I.%I owner to wtc_dbt',
            case rel.relkind when 'v' then 'view' when 'm' then 'materialized view' else 'table' end,
            rel.nspname,
            rel.relname
        );
    end loop;
end
$owned$;

-- the raw schemas: nobody but their writers and dbt
revoke all on schema cdr_data, forex_data, crm_data from public;
grant usage on schema cdr_data, forex_data, crm_data to wtc_dbt;
grant select on all tables in schema cdr_data, forex_data, crm_data to wtc_dbt;
alter default privileges in schema cdr_data, forex_data, crm_data
grant select on tables to wtc_dbt;

-- the loader and the tick sink: cdr_data and forex_data
grant usage on schema cdr_data, forex_data to wtc_loader;
grant select, insert, update, delete on all tables in schema cdr_data, forex_data to wtc_loader;
grant usage, select on all sequences in schema cdr_data, forex_data to wtc_loader;
alter default privileges in schema cdr_data, forex_data
grant select, insert, update, delete on tables to wtc_loader;
alter default privileges in schema cdr_data, forex_data
grant usage, select on sequences to wtc_loader;

-- the embedded change capture: its change log and its replication origin
grant usage on schema crm_data to wtc_cdc;
grant select, insert, update, delete on all tables in schema crm_data to wtc_cdc;
grant usage, select on all sequences in schema crm_data to wtc_cdc;
alter default privileges in schema crm_data
grant select, insert, update, delete on tables to wtc_cdc;
alter default privileges in schema crm_data grant usage, select on sequences to wtc_cdc;
grant execute on function
pg_replication_origin_create(text),
pg_replication_origin_drop(text),
pg_replication_origin_oid(text),
pg_replication_origin_session_setup(text),
pg_replication_origin_session_reset(),
pg_replication_origin_xact_setup(pg_lsn, timestamp with time zone),
pg_replication_origin_advance(text, pg_lsn),
pg_replication_origin_progress(text, boolean)
to wtc_cdc;

-- the JDBC sinks: upserts into the change log (no delete: delete.enabled is false)
grant usage on schema crm_data to wtc_sink;
grant select, insert, update on all tables in schema crm_data to wtc_sink;
alter default privileges in schema crm_data grant select, insert, update on tables to wtc_sink;

-- the drop probe: which files the loader landed, and when
grant usage on schema cdr_data to wtc_probe;
grant select on cdr_data.files to wtc_probe;

-- the analyst: the marts dbt builds
grant usage on schema prepared_layers to wtc_analyst;
grant select on all tables in schema prepared_layers to wtc_analyst;
alter default privileges for role wtc_dbt in schema prepared_layers
grant select on tables to wtc_analyst;
