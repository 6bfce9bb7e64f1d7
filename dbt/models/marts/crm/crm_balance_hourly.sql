{#
    One row per account and hour with attributed usage (docs/business-rules.md, section 7; twin
    macros_py/balance.py): the hour's call seconds and data bytes, cost in ZAR and in WAK at the
    hour's rate (as-of lookup in fx_rates_hourly), the running balance in WAK, and the user,
    address and device info valid at the account's last attributed event of the hour. Column
    types: the contract in _crm__models.yml.

    Incremental (strategy replace_from, macros/incremental.sql): the run finds the earliest
    instant whose result can differ from what is stored (the rebuild cutoff), floors it to the
    hour, deletes every stored row from that hour on and inserts all accounts' rows from there,
    each account's balance carried over from its last stored row before the cutoff. A marker row
    (account_id null, hour_start = the cutoff) makes the delete happen even when no row is left
    to insert (a re-attribution can empty an hour). The cutoff is the earliest of:
    - the event time of CDR rows loaded since the watermark `cdr_loaded_through`;
    - the CRM time from which changes landed since `crm_landed_through` (minus var crm_lookback)
      alter the versions (macros/crm/crm_history.sql, crm_changed_from);
    - the first hour of fx_rates_hourly rows landed since `rates_landed_through`;
    the CDR and rates watermarks minus var landing_lookback, the one fx_rates_hourly itself uses.

    Import CTEs read more than once are `not materialized`, so that Postgres plans through them
    to the indexes of the tables behind.
#}

-- depends_on: {{ ref('int_crm__delete_times') }}, {{ ref('int_crm__changes') }}

with

events as not materialized (
    select * from {{ ref('int_cdr__events') }}
),

holders as (
    select * from {{ ref('int_crm__phone_holders') }}
),

rates as not materialized (
    select * from {{ ref('fx_rates_hourly') }}
),

account_versions as (
    select * from {{ ref('crm_accounts_history') }}
),

address_versions as (
    select * from {{ ref('crm_addresses_history') }}
),

device_versions as (
    select * from {{ ref('crm_devices_history') }}
),

{% if is_incremental() %}
    new_cdr as (
        select
            min(events.event_ts) as changed_from,
            max(events.loaded_at) as loaded_through
        from events
        where events.loaded_at > {{ loaded_after('cdr_loaded_through') }}
    ),

    new_crm as (
        {{ crm_changed_from(loaded_after('crm_landed_through', lookback='crm_lookback')) }}
    ),

    new_rates as (
        select min(rates.hour_start) as changed_from
        from rates
        where rates.last_landed_at > {{ loaded_after('rates_landed_through') }}
    ),

    -- the watermarks: the stored ones moved on by the rows new to this run (cheap: a max over
    -- whole tables cannot use their indexes through the staging views)
    marks as (
        select
            greatest(
                (select max(built.cdr_loaded_through) from {{ this }} as built),
                (select new_cdr.loaded_through from new_cdr)
            ) as cdr_loaded_through,
            greatest(
                (select max(built.crm_landed_through) from {{ this }} as built),
                (select new_crm.landed_through from new_crm)
            ) as crm_landed_through,
            (select max(rates.last_landed_at) from rates) as rates_landed_through
    ),

    cutoff as (
        select
            {{ time_bucket(
                'least(new_cdr.changed_from, new_crm.changed_from, new_rates.changed_from)', 'h1'
            ) }} as rebuild_from
        from new_cdr
        cross join new_crm
        cross join new_rates
    ),
{% else %}
    data_records as (
        select * from {{ ref('stg_cdr__data_records') }}
    ),

    voice_records as (
        select * from {{ ref('stg_cdr__voice_records') }}
    ),

    {% for entity in ['accounts', 'addresses', 'devices'] %}
        {{ entity }}_changes as (
            select * from {{ ref('stg_crm__' ~ entity ~ '_changes') }}
        ),
    {% endfor %}

    marks as (
        select
            greatest(
                (select max(data_records.loaded_at) from data_records),
                (select max(voice_records.loaded_at) from voice_records)
            ) as cdr_loaded_through,
            greatest(
                (select max(accounts_changes.landed_at) from accounts_changes),
                (select max(addresses_changes.landed_at) from addresses_changes),
                (select max(devices_changes.landed_at) from devices_changes)
            ) as crm_landed_through,
            (select max(rates.last_landed_at) from rates) as rates_landed_through
    ),
{% endif %}

attributed as (
    select
        holders.account_id,
        events.event_ts,
        events.seconds,
        events.up_bytes + events.down_bytes as bytes,
        {{ time_bucket('events.event_ts', 'h1') }} as hour_start
    from events
    inner join holders
        on
            events.msisdn = holders.msisdn
            and events.event_ts >= holders.held_from
            and (holders.held_to is null or events.event_ts < holders.held_to)
    {% if is_incremental() %}
        where events.event_ts >= (select cutoff.rebuild_from from cutoff)
    {% endif %}
),

hourly_usage as (
    select
        account_id,
        hour_start,
        sum(seconds)::bigint as call_seconds,
        sum(bytes)::bigint as data_bytes,
        max(event_ts) as last_event_ts
    from attributed
    group by account_id, hour_start
),

hour_rates as (
    select
        hours.hour_start,
        rate.zar_per_wak
    from (select distinct hourly_usage.hour_start from hourly_usage) as hours
    {{ left_join_as_of(
        'rates', 'rate', 'hours.hour_start', ['versions.zar_per_wak'], valid_from='hour_start'
    ) }}
),

costed as (
    select
        hourly_usage.*,
        hour_rates.zar_per_wak,
        (
            {{ call_cost_zar('hourly_usage.call_seconds') }}
            + {{ data_cost_zar('hourly_usage.data_bytes') }}
        ) as cost_zar
    from hourly_usage
    inner join hour_rates on hourly_usage.hour_start = hour_rates.hour_start
),

converted as (
    select
        costed.*,
        {{ div10('costed.cost_zar', 'costed.zar_per_wak') }} as cost_wak
    from costed
),

{% if is_incremental() %}
    carried as (
        select
            billed.account_id,
            last_row.balance_wak
        from (select distinct hourly_usage.account_id from hourly_usage) as billed
        inner join lateral (
            select built.balance_wak
            from {{ this }} as built
            where
                built.account_id = billed.account_id
                and built.hour_start < (select cutoff.rebuild_from from cutoff)
            order by built.hour_start desc
            limit 1
        ) as last_row on true
    ),
{% endif %}

balanced as (
    select
        converted.*,
        sum(converted.cost_wak) over (
            partition by converted.account_id
            order by converted.hour_start
            rows between unbounded preceding and current row
        ) as running_wak,
        {% if is_incremental() %}carried.balance_wak{% else %}null::numeric{% endif %}
            as carried_wak
    from converted
    {% if is_incremental() %}
        left join carried on converted.account_id = carried.account_id
    {% endif %}
),

{%- set valid_at_last_event = {
    'at': 'balanced.last_event_ts',
    'match': 'versions.account_id = balanced.account_id',
    'valid_to': 'valid_to',
} %}

described as (
    select
        balanced.account_id,
        balanced.hour_start,
        account_info.owner_name,
        account_info.email,
        account_info.phone_number,
        address_info.street_address,
        address_info.city,
        address_info.state,
        address_info.postal_code,
        address_info.country,
        device_info.device_id,
        device_info.device_name,
        device_info.device_type,
        device_info.device_os,
        coalesce(device_info.device_count, 0)::bigint as device_count,
        balanced.call_seconds,
        balanced.data_bytes,
        balanced.cost_zar::numeric(38, 10) as cost_zar,
        balanced.zar_per_wak::numeric(38, 10) as zar_per_wak,
        balanced.cost_wak::numeric(38, 10) as cost_wak,
        (case
            when balanced.carried_wak is null then balanced.running_wak
            when balanced.running_wak is null then balanced.carried_wak
            else balanced.carried_wak + balanced.running_wak
        end)::numeric(38, 10) as balance_wak,
        balanced.last_event_ts,
        marks.cdr_loaded_through,
        marks.crm_landed_through,
        marks.rates_landed_through
    from balanced
    cross join marks
    {{ left_join_as_of(
        'account_versions', 'account_info',
        columns=['versions.owner_name', 'versions.email', 'versions.phone_number'],
        tie_break='version_lsn', **valid_at_last_event
    ) }}
    {{ left_join_as_of(
        'address_versions', 'address_info',
        columns=[
            'versions.street_address', 'versions.city', 'versions.state',
            'versions.postal_code', 'versions.country',
        ],
        tie_break='version_lsn', **valid_at_last_event
    ) }}
    {{ left_join_as_of(
        'device_versions', 'device_info',
        columns=[
            'versions.device_id', 'versions.device_name', 'versions.device_type',
            'versions.device_os', 'count(*) over () as device_count',
        ],
        tie_break='device_id', **valid_at_last_event
    ) }}
),

final as (
    select * from described
    {% if is_incremental() %}
        union all
        -- the marker row: carries the cutoff to the replace_from strategy, never inserted; its
        -- nulls come from an empty row of `described`, of its column types
        {#- described's columns (a unit test's `model` is the test, not this model) #}
        {%- set columns = [
            'account_id', 'hour_start', 'owner_name', 'email', 'phone_number', 'street_address',
            'city', 'state', 'postal_code', 'country', 'device_id', 'device_name', 'device_type',
            'device_os', 'device_count', 'call_seconds', 'data_bytes', 'cost_zar', 'zar_per_wak',
            'cost_wak', 'balance_wak', 'last_event_ts', 'cdr_loaded_through',
            'crm_landed_through', 'rates_landed_through',
        ] %}
        select
            {%- for column in columns %}
                {% if column == 'hour_start' -%}
                    cutoff.rebuild_from as hour_start
                {%- else -%}
                    no_row.{{ column }}
                {%- endif %}{% if not loop.last %},{% endif %}
            {%- endfor %}
        from cutoff
        left join described as no_row on false
        where cutoff.rebuild_from is not null
    {% endif %}
)

-- computed_at: when this build wrote the row (the rows a build changed, for its data tests)
select
    final.*,
    now() as computed_at
from final
