{#- docs/business-rules.md, section 8 (twin: macros_py/crm_history.py): CRM versions rebuilt from
    the change log. -#}

{#- A key's changes in log order: its snapshot row first, then by lsn (docs/raw-layer.md). -#}
{% macro crm_log_order(alias=none) -%}
    {%- set p = alias ~ '.' if alias else '' -%}
    {{ p }}change_op <> 'r', {{ p }}change_lsn
{%- endmacro %}


{#- The time of every delete in the CRM change log (a SELECT of entity, entity_key, change_lsn,
    landed_at, delete_ts): the CRM clock just before it, the greatest modified_ts of the
    non-delete changes (any of the three tables) at the greatest lsn below the delete's; null
    before the first one.
    Set-based: the clock points (per lsn, the greatest modified_ts) and the deletes in one lsn
    order (a delete before a point at the same lsn: only lower lsns count), each delete taking
    the last point before it. `only_landed_by` (optional SQL expression) restricts the clock to
    the changes landed at or before it (the clock as an earlier run saw it, at the latest). -#}
{% macro crm_delete_times(only_landed_by=none) -%}
    {%- set landed = (' and changes.landed_at <= ' ~ only_landed_by) if only_landed_by else '' -%}
    with

    crm_changes as not materialized (
        select * from {{ ref('int_crm__changes') }}
    ),

    points as (
        select
            null::text as entity,
            null::integer as entity_key,
            changes.change_lsn,
            max(changes.modified_ts) as point_ts,
            null::timestamptz as landed_at,
            1 as is_point
        from crm_changes as changes
        where changes.change_op <> 'd'{{ landed }}
        group by changes.change_lsn
    ),

    deletes as (
        select
            changes.entity,
            changes.entity_key,
            changes.change_lsn,
            null::timestamp as point_ts,
            changes.landed_at,
            0 as is_point
        from crm_changes as changes
        where changes.change_op = 'd'
    ),

    ordered as (
        select
            *,
            sum(is_point) over (
                order by change_lsn, is_point rows between unbounded preceding and current row
            ) as clock_group
        from (select * from points union all select * from deletes) as log
    ),

    clocked as (
        select
            entity,
            entity_key,
            change_lsn,
            landed_at,
            is_point,
            max(point_ts) over (partition by clock_group) as delete_ts
        from ordered
    )

    select
        entity,
        entity_key,
        change_lsn,
        landed_at,
        delete_ts
    from clocked
    where is_point = 0
{%- endmacro %}


{#- The earliest CRM time from which the versions of the three CRM tables can differ once the
    changes landed after `landed_after` (an SQL expression) are in the log: the CRM part of a
    rebuild cutoff (used by crm_balance_hourly). A SELECT of one row: `changed_from` (null: no
    change landed since) and `landed_through`, the latest `landed_at` of those changes.
    The earliest of: each new change's time and the time of the next change of its key in log
    order (a change can land between two old ones); and for every delete landed before the new
    changes but logged after the earliest of them, the CRM clock at it as the log stood without
    them (a late change can move the time of an older delete; the version it ends changes only
    from the earlier of its old and new time on, and its old clock is at least that one).
    Twin of the rule: docs/business-rules.md, section 8 ("Where crm_balance_hourly restarts"). -#}
{% macro crm_changed_from(landed_after) -%}
    with

    crm_changes as not materialized (
        select * from {{ ref('int_crm__changes') }}
    ),

    delete_times as (
        select * from {{ ref('int_crm__delete_times') }}
    ),

    new_changes as (
        select
            changes.entity,
            changes.entity_key,
            changes.change_op,
            changes.change_lsn,
            changes.landed_at
        from crm_changes as changes
        where changes.landed_at > {{ landed_after }}
    ),

    -- the logs of the keys with a new change, each change at its time (a delete at its clock)
    key_logs as (
        select
            changes.entity,
            changes.entity_key,
            changes.change_op,
            changes.change_lsn,
            coalesce(deletes.delete_ts, changes.modified_ts) as change_ts
        from crm_changes as changes
        left join delete_times as deletes
            on
                changes.entity = deletes.entity
                and changes.entity_key = deletes.entity_key
                and changes.change_lsn = deletes.change_lsn
        where (changes.entity, changes.entity_key) in (
            select
                new_changes.entity,
                new_changes.entity_key
            from new_changes
        )
    ),

    key_times as (
        select
            entity,
            entity_key,
            change_lsn,
            change_ts,
            lead(change_ts) over (
                partition by entity, entity_key order by {{ crm_log_order() }}
            ) as next_change_ts
        from key_logs
    ),

    -- deletes landed before the new changes but logged after the earliest of them (their clock
    -- may have moved; normally there are none)
    old_deletes_moved as (
        select
            changes.entity,
            changes.entity_key,
            changes.change_lsn
        from crm_changes as changes
        where
            changes.change_op = 'd'
            and changes.landed_at <= {{ landed_after }}
            and changes.change_lsn > (
                select min(new_changes.change_lsn) from new_changes
                where new_changes.change_op <> 'd'
            )
    ),

    -- the time of every delete by the clock of the changes landed before the new ones
    old_delete_times as (
        {{ crm_delete_times(landed_after) }}
    ),

    changed_at as (
        select least(times.change_ts, times.next_change_ts) as changed_at
        from key_times as times
        inner join new_changes
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
    )

    select
        (select min(changed_at.changed_at) from changed_at) as changed_from,
        (select max(new_changes.landed_at) from new_changes) as landed_through
{%- endmacro %}


{#- The body of the CRM version models (int_crm__<entity>_versions): one row per version of a
    key, valid on [valid_from, valid_to). `entity` is accounts, addresses or devices; `key` the
    key column; `columns` the other columns of the row.

    Incremental (delete+insert on the key): every version of the keys with a change landed since
    the watermark `max_landed_at` (minus var crm_lookback) is rebuilt from the key's whole log,
    and so are the keys of deletes logged after the earliest new non-delete change of any table
    (a late change can move the CRM clock, so the time, of such a delete). -#}
{% macro crm_history(entity, key, columns) -%}
-- depends_on: {{ ref('int_crm__changes') }}
with

entity_log as (
    select * from {{ ref('stg_crm__' ~ entity ~ '_changes') }}
),

delete_times as (
    select * from {{ ref('int_crm__delete_times') }}
),

{% if is_incremental() %}
crm_changes as not materialized (
    select * from {{ ref('int_crm__changes') }}
),

new_changes as (
    select
        changes.entity,
        changes.entity_key,
        changes.change_op,
        changes.change_lsn
    from crm_changes as changes
    where
        changes.landed_at
        > {{ loaded_after('max_landed_at', lookback='crm_lookback') }}
),

affected as (
    select new_changes.entity_key
    from new_changes
    where new_changes.entity = '{{ entity }}'
    union
    select deletes.entity_key
    from crm_changes as deletes
    where
        deletes.entity = '{{ entity }}'
        and deletes.change_op = 'd'
        and deletes.change_lsn > (
            select min(new_changes.change_lsn) from new_changes
            where new_changes.change_op <> 'd'
        )
),
{% endif %}

changes as (
    select
        log.{{ key }},
        {%- for column in columns %}
        log.{{ column }},
        {%- endfor %}
        log.change_op,
        log.change_lsn,
        log.modified_ts,
        log.landed_at,
        coalesce(deletes.delete_ts, log.modified_ts) as change_ts
    from entity_log as log
    left join delete_times as deletes
        on
            deletes.entity = '{{ entity }}'
            and log.{{ key }} = deletes.entity_key
            and log.change_lsn = deletes.change_lsn
    {% if is_incremental() %}
        where log.{{ key }} in (select affected.entity_key from affected)
    {% endif %}
),

sequenced as (
    select
        changes.*,
        lead(changes.change_op) over by_key as next_op,
        lead(changes.change_ts) over by_key as next_ts,
        max(changes.landed_at) over (partition by changes.{{ key }}) as max_landed_at
    from changes
    window by_key as (partition by changes.{{ key }} order by {{ crm_log_order('changes') }})
),

versions as (
    select
        {{ key }}::integer as {{ key }},
        {%- for column in columns %}
        {{ column }},
        {%- endfor %}
        change_lsn::bigint as version_lsn,
        modified_ts::timestamp as valid_from,
        -- a delete without a clock (nothing logged before it) closes the version at its start
        (case when next_op is not null then greatest(next_ts, modified_ts) end)::timestamp
            as valid_to,
        (next_op is null) as is_current,
        max_landed_at::timestamptz as max_landed_at
    from sequenced
    where change_op <> 'd'
)

select * from versions
{%- endmacro %}
