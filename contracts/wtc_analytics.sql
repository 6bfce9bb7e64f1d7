-- wtc_analytics: the raw-layer contract (docs/raw-layer.md) and the marts' schema.
-- Both landing paths (the embedded Python loaders and Kafka Connect) write exactly these tables.
-- Idempotent: safe to apply on every start.
create schema if not exists cdr_data;
create schema if not exists crm_data;
create schema if not exists forex_data;
create schema if not exists prepared_layers;

-- CDR ------------------------------------------------------------------------------------------
create table if not exists cdr_data.files (
    file_name text primary key,
    kind text not null check (kind in ('data', 'voice')),
    size_bytes bigint not null,
    sha256 text not null,
    rows_landed integer not null,
    rows_rejected integer not null,
    first_event_at timestamp,
    last_event_at timestamp,
    loaded_at timestamptz not null default now(),
    -- when the CDR loader published the file's rows to the stream (null: not yet; the loader
    -- lands the CDR files on both paths, see docs/raw-layer.md)
    published_at timestamptz
);

create table if not exists cdr_data.data_records (
    source_file text not null,
    line_no integer not null,
    msisdn text not null,
    tower_id integer not null,
    up_bytes bigint not null,
    down_bytes bigint not null,
    data_type text not null,
    ip_address text,
    website_url text,
    event_datetime timestamp not null,
    loaded_at timestamptz not null default now(),
    primary key (source_file, line_no)
);
-- The value rules of ingestion/cdr_format.py as constraints (a test in tests/test_cdr_loader.py
-- checks that they reject exactly what the rules reject): COPY checks every row as it lands, and
-- a file with a row that breaks one is landed again by the line path, which files the row with
-- its reason. Added here rather than in `create table` so that a database bootstrapped before
-- them gets them too.
do $$
begin
    if not exists (
        select from pg_constraint where conname = 'data_records_value_rules'
    ) then
        alter table cdr_data.data_records add constraint data_records_value_rules check (
            length(msisdn) = 13 and msisdn !~ '[^0-9]'
            and tower_id between 1 and 2000
            and up_bytes between 100000 and 1000000
            and down_bytes between 100000 and 1000000
            and data_type in ('video', 'audio', 'image', 'text', 'application')
            and event_datetime >= '2000-01-01' and event_datetime < '2100-01-01'
        );
    end if;
end $$;
-- Time indexes are BRIN: files land in name order and each covers a short window (the rows
-- inside a file are not in time order), so block ranges narrow a time or loaded_at filter as
-- well as a b-tree does for the dbt
-- incremental runs, at a fraction of the cost per landed row (bench.cdr_loader). The b-trees of
-- earlier bootstraps are dropped.
drop index if exists cdr_data.data_records_event_datetime_idx;
drop index if exists cdr_data.data_records_loaded_at_idx;
create index if not exists data_records_event_datetime_brin
    on cdr_data.data_records using brin (event_datetime);
create index if not exists data_records_loaded_at_brin
    on cdr_data.data_records using brin (loaded_at);

create table if not exists cdr_data.voice_records (
    source_file text not null,
    line_no integer not null,
    msisdn text not null,
    tower_id integer not null,
    call_type text not null,
    dest_nr text not null,
    call_duration_sec integer not null,
    start_time timestamp not null,
    loaded_at timestamptz not null default now(),
    primary key (source_file, line_no)
);
do $$
begin
    if not exists (
        select from pg_constraint where conname = 'voice_records_value_rules'
    ) then
        alter table cdr_data.voice_records add constraint voice_records_value_rules check (
            length(msisdn) = 13 and msisdn !~ '[^0-9]'
            and tower_id between 1 and 2000
            and call_type in ('voice', 'video')
            and length(dest_nr) = 13 and dest_nr !~ '[^0-9]'
            and call_duration_sec between 1 and 1800
            and start_time >= '2000-01-01' and start_time < '2100-01-01'
        );
    end if;
end $$;
drop index if exists cdr_data.voice_records_start_time_idx;
drop index if exists cdr_data.voice_records_loaded_at_idx;
create index if not exists voice_records_start_time_brin
    on cdr_data.voice_records using brin (start_time);
create index if not exists voice_records_loaded_at_brin
    on cdr_data.voice_records using brin (loaded_at);

-- One row per rejected line; a file rejected as a whole has line_no 0.
create table if not exists cdr_data.rejected_rows (
    source_file text not null,
    line_no integer not null,
    raw_line text not null,
    reason text not null,
    rejected_at timestamptz not null default now(),
    primary key (source_file, line_no)
);

-- The loader's ledger of files not landed (docs/failure-handling.md): entries of the drop
-- folder it does not take, with the reason (dot files, symlinks, directories), and new versions
-- of landed files, quarantined whole: the landed version stays, so raw and HVS agree.
create table if not exists cdr_data.skipped_files (
    file_name text primary key,
    reason text not null,
    recorded_at timestamptz not null default now()
);
create table if not exists cdr_data.file_conflicts (
    file_name text not null,
    sha256 text not null,
    size_bytes bigint not null,
    reason text not null,
    recorded_at timestamptz not null default now(),
    primary key (file_name, sha256)
);

-- Forex ----------------------------------------------------------------------------------------
create table if not exists forex_data.ticks (
    pair_name text not null,
    tick_ts timestamp not null,
    bid_price numeric not null,
    ask_price numeric not null,
    spread numeric not null,
    source text not null,
    landed_at timestamptz not null default now(),
    primary key (pair_name, tick_ts)
);
create index if not exists ticks_tick_ts_idx on forex_data.ticks (tick_ts);
-- The incremental forex marts read the ticks landed after their high-water mark
-- (dbt/macros/landing_marks.sql): without an index on landed_at every run of each of the four
-- scans the whole table. BRIN, as for the CDR loaded_at: the tick sink appends in landing order.
create index if not exists ticks_landed_at_brin on forex_data.ticks using brin (landed_at);

create table if not exists forex_data.rejected_messages (
    id bigserial primary key,
    source text not null,
    message_key text,
    payload text,
    reason text not null,
    rejected_at timestamptz not null default now()
);
-- the tick sink looks up whether a redelivered message was already rejected
create index if not exists rejected_messages_source_idx on forex_data.rejected_messages (source);

-- CRM change log (Debezium ExtractNewRecordState with add.fields=op,lsn,source.ts_ms) ---------
create table if not exists crm_data.accounts_changes (
    account_id integer not null,
    owner_name varchar(100),
    email varchar(100),
    phone_number varchar(100),
    modified_ts timestamp,
    __op char(1) not null check (__op in ('r', 'c', 'u', 'd')),
    __lsn bigint not null,
    __source_ts_ms bigint not null,
    landed_at timestamptz not null default now(),
    primary key (__lsn, account_id)
);

create table if not exists crm_data.addresses_changes (
    account_id integer not null,
    street_address varchar(100),
    city varchar(100),
    state varchar(100),
    postal_code varchar(100),
    country varchar(100),
    modified_ts timestamp,
    __op char(1) not null check (__op in ('r', 'c', 'u', 'd')),
    __lsn bigint not null,
    __source_ts_ms bigint not null,
    landed_at timestamptz not null default now(),
    primary key (__lsn, account_id)
);

create table if not exists crm_data.devices_changes (
    device_id integer not null,
    account_id integer,
    device_name varchar(100),
    device_type varchar(100),
    device_os varchar(100),
    modified_ts timestamp,
    __op char(1) not null check (__op in ('r', 'c', 'u', 'd')),
    __lsn bigint not null,
    __source_ts_ms bigint not null,
    landed_at timestamptz not null default now(),
    primary key (__lsn, device_id)
);
create index if not exists accounts_changes_landed_at_idx on crm_data.accounts_changes (landed_at);
create index if not exists addresses_changes_landed_at_idx
    on crm_data.addresses_changes (landed_at);
create index if not exists devices_changes_landed_at_idx on crm_data.devices_changes (landed_at);
