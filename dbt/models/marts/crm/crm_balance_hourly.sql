{#
    One row per account and hour with attributed usage (docs/business-rules.md, section 7; twin
    macros_py/balance.py): the hour's call seconds and data bytes, cost in ZAR and in WAK at the
    hour's rate (as-of lookup in fx_rates_hourly), the running balance in WAK, and the user,
    address and device info valid at the account's last attributed event of the hour.

    Incremental (strategy replace_from, macros/crm/crm_history.sql): the run finds the earliest
    instant whose result can differ from what is stored (rebuild cutoff, below), floors it to the
    hour, deletes every stored row from that hour on and inserts all accounts' rows from there,
    each account's balance carried over from its last stored row before the cutoff. A marker row
    (account_id null, hour_start = the cutoff) makes the delete happen even when no row is left
    to insert (a re-attribution can empty an hour). The cutoff is the earliest of:
    - the event time of CDR rows loaded since the watermark `cdr_loaded_through` (minus var
      cdr_lookback);
    - for CRM changes landed since `crm_landed_through` (minus var crm_lookback): each change's
      time, and the time of the next change of its key in log order; and for every delete landed
      before them but logged after the earliest of them, the CRM clock at it without them (a late
      change can move the time of an older delete; the version it ends changes only from the
      earlier of its old and new time on, and its old clock is at least that one);
    - the first hour of fx_rates_hourly rows landed since `rates_landed_through` (minus
      var cdr_lookback, the lookback fx_rates_hourly itself uses).
#}

{%- set column_types = {
    'account_id': 'integer', 'hour_start': 'timestamp',
    'owner_name': 'text', 'email': 'text', 'phone_number': 'text',
    'street_address': 'text', 'city': 'text', 'state': 'text', 'postal_code': 'text',
    'country': 'text',
    'device_id': 'integer', 'device_name': 'text', 'device_type': 'text', 'device_os': 'text',
    'device_count': 'bigint',
    'call_seconds': 'bigint', 'data_bytes': 'bigint',
    'cost_zar': 'numeric(38, 10)', 'zar_per_wak': 'numeric(38, 10)',
    'cost_wak': 'numeric(38, 10)', 'balance_wak': 'numeric(38, 10)',
    'last_event_ts': 'timestamp',
    'cdr_loaded_through': 'timestamptz', 'crm_landed_through': 'timestamptz',
    'rates_landed_through': 'timestamptz',
} -%}
{%- set columns = column_types.keys() | list -%}

-- depends_on: {{ ref('int_crm__delete_times') }}, {{ ref('int_crm__changes') }}

with

{% if is_incremental() %}
    new_crm_changes as (
        select
            changes.entity,
            changes.entity_key,
            changes.change_op,
            changes.change_lsn,
            changes.landed_at
        from (select * from {{ ref('int_crm__changes') }}) as changes
        where changes.landed_at > {{ crm_landed_after('crm_landed_through') }}
    ),

    new_cdr as (
        select
            min(events.event_ts) as changed_at,
            max(events.loaded_at) as loaded_through
        from (select * from {{ ref('int_cdr__events') }}) as events
        where events.loaded_at > {{ loaded_after('cdr_loaded_through') }}
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
                (select max(new_crm_changes.landed_at) from new_crm_changes)
            ) as crm_landed_through,
            (
                select max(rates.last_landed_at)
                from (select * from {{ ref('fx_rates_hourly') }}) as rates
            ) as rates_landed_through
    ),

    -- the time of every delete by the clock of the changes landed before this run's new ones
    old_delete_times as (
        {{ crm_delete_times(crm_landed_after('crm_landed_through')) }}
    ),

    delete_times as (
        select * from {{ ref('int_crm__delete_times') }}
    ),

    crm_key_logs as (
        select
            changes.entity,
            changes.entity_key,
            changes.change_op,
            changes.change_lsn,
            coalesce(deletes.delete_ts, changes.modified_ts) as change_ts
        from (select * from {{ ref('int_crm__changes') }}) as changes
        left join delete_times as deletes
            on
                changes.entity = deletes.entity
                and changes.entity_key = deletes.entity_key
                and changes.change_lsn = deletes.change_lsn
        where (changes.entity, changes.entity_key) in (
            select
                new_crm_changes.entity,
                new_crm_changes.entity_key
            from new_crm_changes
        )
    ),

    crm_key_times as (
        select
            entity,
            entity_key,
            change_lsn,
            change_ts,
            lead(change_ts) over (
                partition by entity, entity_key order by {{ crm_log_order() }}
            ) as next_change_ts
        from crm_key_logs
    ),

    -- deletes landed before the new changes but logged after the earliest of them (their clock
    -- may have moved; normally there are none)
    old_deletes_moved as (
        select
            changes.entity,
            changes.entity_key,
            changes.change_lsn
        from (select * from {{ ref('int_crm__changes') }}) as changes
        where
            changes.change_op = 'd'
            and changes.landed_at <= {{ crm_landed_after('crm_landed_through') }}
            and changes.change_lsn > (
                select min(new_crm_changes.change_lsn) from new_crm_changes
                where new_crm_changes.change_op <> 'd'
            )
    ),

    crm_times as (
        select least(times.change_ts, times.next_change_ts) as changed_at
        from crm_key_times as times
        inner join new_crm_changes as new_changes
            on
                times.entity = new_changes.entity
                and times.entity_key = new_changes.entity_key
                and times.change_lsn = new_changes.change_lsn
        union all
        select old_deletes.delete_ts as changed_at
        from old_delete_times as old_deletes
        where
            -- a constant gate: the clock over the whole log is computed only when needed
            exists (select 1 from old_deletes_moved)
            and (old_deletes.entity, old_deletes.entity_key, old_deletes.change_lsn) in (
                select
                    old_deletes_moved.entity,
                    old_deletes_moved.entity_key,
                    old_deletes_moved.change_lsn
                from old_deletes_moved
            )
    ),

    cutoff as (
        select
            {{ time_bucket('least(cdr.changed_at, crm.changed_at, rates.changed_at)', 'h1') }}
                as rebuild_from
        from
            (select new_cdr.changed_at from new_cdr) as cdr,
            (select min(crm_times.changed_at) as changed_at from crm_times) as crm,
            (
                select min(rates.hour_start) as changed_at
                from (select * from {{ ref('fx_rates_hourly') }}) as rates
                where rates.last_landed_at > {{ loaded_after('rates_landed_through') }}
            ) as rates
    ),
{% else %}
marks as (
    select
        greatest(
            (
                select max(data.loaded_at)
                from (select * from {{ ref('stg_cdr__data_records') }}) as data
            ),
            (
                select max(voice.loaded_at)
                from (select * from {{ ref('stg_cdr__voice_records') }}) as voice
            )
        ) as cdr_loaded_through,
        greatest(
            {%- for entity in ['accounts', 'addresses', 'devices'] %}
            (
                select max(log.landed_at)
                from (select * from {{ ref('stg_crm__' ~ entity ~ '_changes') }}) as log
            ){% if not loop.last %},{% endif %}
            {%- endfor %}
        ) as crm_landed_through,
        (
            select max(rates.last_landed_at)
            from (select * from {{ ref('fx_rates_hourly') }}) as rates
        ) as rates_landed_through
),

{% endif %}

events as (
    select
        events.msisdn,
        events.event_ts,
        events.seconds,
        events.up_bytes + events.down_bytes as bytes
    from (select * from {{ ref('int_cdr__events') }}) as events
    {% if is_incremental() %}
        where events.event_ts >= (select cutoff.rebuild_from from cutoff)
    {% endif %}
),

holders as (
    select * from {{ ref('int_crm__phone_holders') }}
),

attributed as (
    select
        holders.account_id,
        events.event_ts,
        events.seconds,
        events.bytes,
        {{ time_bucket('events.event_ts', 'h1') }} as hour_start
    from events
    inner join holders
        on
            events.msisdn = holders.msisdn
            and events.event_ts >= holders.held_from
            and (holders.held_to is null or events.event_ts < holders.held_to)
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
    left join lateral (
        select rates.zar_per_wak
        from (select * from {{ ref('fx_rates_hourly') }}) as rates
        where rates.hour_start <= hours.hour_start
        order by rates.hour_start desc
        limit 1
    ) as rate on true
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
        balanced.call_seconds,
        balanced.data_bytes,
        balanced.cost_zar::numeric(38, 10) as cost_zar,
        balanced.zar_per_wak::numeric(38, 10) as zar_per_wak,
        balanced.cost_wak::numeric(38, 10) as cost_wak,
        balanced.last_event_ts,
        marks.cdr_loaded_through,
        marks.crm_landed_through,
        marks.rates_landed_through,
        coalesce(device_info.device_count, 0)::bigint as device_count,
        (case
            when balanced.carried_wak is null then balanced.running_wak
            when balanced.running_wak is null then balanced.carried_wak
            else balanced.carried_wak + balanced.running_wak
        end)::numeric(38, 10) as balance_wak
    from balanced
    cross join marks
    left join lateral (
        select
            versions.owner_name,
            versions.email,
            versions.phone_number
        from (select * from {{ ref('crm_accounts_history') }}) as versions
        where
            versions.account_id = balanced.account_id
            and versions.valid_from <= balanced.last_event_ts
            and (versions.valid_to is null or balanced.last_event_ts < versions.valid_to)
        order by versions.valid_from desc, versions.version_lsn desc
        limit 1
    ) as account_info on true
    left join lateral (
        select
            versions.street_address,
            versions.city,
            versions.state,
            versions.postal_code,
            versions.country
        from (select * from {{ ref('crm_addresses_history') }}) as versions
        where
            versions.account_id = balanced.account_id
            and versions.valid_from <= balanced.last_event_ts
            and (versions.valid_to is null or balanced.last_event_ts < versions.valid_to)
        order by versions.valid_from desc, versions.version_lsn desc
        limit 1
    ) as address_info on true
    left join lateral (
        select
            versions.device_id,
            versions.device_name,
            versions.device_type,
            versions.device_os,
            count(*) over () as device_count
        from (select * from {{ ref('crm_devices_history') }}) as versions
        where
            versions.account_id = balanced.account_id
            and versions.valid_from <= balanced.last_event_ts
            and (versions.valid_to is null or balanced.last_event_ts < versions.valid_to)
        order by versions.valid_from desc, versions.device_id desc
        limit 1
    ) as device_info on true
),

final as (
    select {{ columns | join(', ') }}
    from described
    {% if is_incremental() %}
        union all
        -- the marker row: carries the cutoff to the replace_from strategy, never inserted
        select
            {%- for column in columns %}
                {% if column == 'hour_start' %}cutoff.rebuild_from{% else %}null{% endif %}
                    as {{ column }}
                {%- if not loop.last %},{% endif %}
            {%- endfor %}
        from cutoff
        where cutoff.rebuild_from is not null
    {% endif %}
)

select
    {%- for column, column_type in column_types.items() %}
        {{ column }}::{{ column_type }} as {{ column }}{% if not loop.last %},{% endif %}
    {%- endfor %}
from final
