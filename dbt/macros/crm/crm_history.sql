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

    points as (
        select
            null::text as entity,
            null::integer as entity_key,
            changes.change_lsn,
            max(changes.modified_ts) as point_ts,
            null::timestamptz as landed_at,
            1 as is_point
        from (select * from {{ ref('int_crm__changes') }}) as changes
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
        from (select * from {{ ref('int_crm__changes') }}) as changes
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


{#- The `landed_at` after which CRM changes count as new for the model being built: its
    watermark (the greatest `column` it holds) minus var('crm_lookback'). -#}
{% macro crm_landed_after(column) -%}
    (
        select coalesce(max({{ column }}), '-infinity'::timestamptz)
            - interval '{{ var("crm_lookback") }}'
        from {{ this }}
    )
{%- endmacro %}


{#- The body of crm_<entity>_history: one row per version of a key, valid on
    [valid_from, valid_to). `entity` is accounts, addresses or devices; `key` the key column;
    `columns` the other columns of the row.

    Incremental (delete+insert on the key): every version of the keys with a change landed since
    the watermark (minus the lookback) is rebuilt from the key's whole log, and so are the keys
    of deletes logged after the earliest new non-delete change of any table (a late change can
    move the CRM clock, so the time, of such a delete). -#}
{% macro crm_history(entity, key, columns) -%}
-- depends_on: {{ ref('int_crm__changes') }}
with

{% if is_incremental() %}
new_changes as (
    select
        changes.entity,
        changes.entity_key,
        changes.change_op,
        changes.change_lsn
    from (select * from {{ ref('int_crm__changes') }}) as changes
    where changes.landed_at > {{ crm_landed_after('max_landed_at') }}
),

affected as (
    select new_changes.entity_key
    from new_changes
    where new_changes.entity = '{{ entity }}'
    union
    select deletes.entity_key
    from (select * from {{ ref('int_crm__changes') }}) as deletes
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
    from (select * from {{ ref('stg_crm__' ~ entity ~ '_changes') }}) as log
    left join (select * from {{ ref('int_crm__delete_times') }}) as deletes
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


{#- Custom incremental strategy `replace_from`: delete every target row whose
    config('replace_from_column') is at or after the smallest value of that column in the batch,
    then insert the batch rows that pass config('replace_keep') (a SQL predicate, default true).
    A batch can carry a marker row (kept out by `replace_keep`) so that the delete happens even
    when nothing is to be inserted; an empty batch changes nothing. -#}
{% macro get_incremental_replace_from_sql(arg_dict) %}
    {%- set target = arg_dict['target_relation'] -%}
    {%- set source = arg_dict['temp_relation'] -%}
    {%- set column = config.get('replace_from_column') -%}
    {%- set keep = config.get('replace_keep', 'true') -%}
    {%- if not column -%}
        {{ exceptions.raise_compiler_error("replace_from needs the config replace_from_column") }}
    {%- endif -%}
    {%- set dest_cols_csv = get_quoted_csv(arg_dict['dest_columns'] | map(attribute='name')) -%}

    delete from {{ target }}
    where {{ column }} >= (select min({{ column }}) from {{ source }});

    insert into {{ target }} ({{ dest_cols_csv }})
    select {{ dest_cols_csv }}
    from {{ source }}
    where {{ keep }}
{% endmacro %}
