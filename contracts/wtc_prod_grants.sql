-- The job roles' rights in the CRM source (roles.sql makes the roles). Applied as the superuser
-- after wtc_prod.sql, by the local stack and by the compose init; idempotent.
--
-- | role         | may                                                                 |
-- | wtc_cdc      | connect; read crm_system (the embedded reader; its publication is    |
-- |              | made by the local stack, which names it from the reader's settings)  |
-- | wtc_debezium | connect; read crm_system; stream the publication below               |
-- Nobody else comes in.

do $database$
begin
    execute format('revoke all on database %I from public', current_database());
    execute format(
        'grant connect on database %I to wtc_cdc, wtc_debezium', current_database()
    );
end
$database$;

revoke create on schema public from public;
revoke all on schema crm_system from public;
grant usage on schema crm_system to wtc_cdc, wtc_debezium;
grant select on all tables in schema crm_system to wtc_cdc, wtc_debezium;

-- Debezium's publication (connect/connectors/crm-source.json: publication.name, with
-- publication.autocreate.mode disabled): a publication of tables needs their owner, and
-- Debezium's role owns nothing, so it is made here. Postgres' default publish (every
-- operation), as Debezium would make it.
do $publication$
begin
    if not exists (select from pg_publication where pubname = 'wtc_crm_debezium') then
        create publication wtc_crm_debezium
        for table crm_system.accounts, crm_system.addresses, crm_system.devices;
    end if;
end
$publication$;
