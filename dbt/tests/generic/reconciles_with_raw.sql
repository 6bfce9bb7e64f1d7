{#- A usage mart's totals equal the raw records' (docs/business-rules.md, section 2): events,
    bytes and seconds per category exactly; the data cost exactly (the data tariff is exact per
    byte), the call cost within half a unit of the 10th decimal per row (each row is rounded
    once). Returns the categories that do not reconcile.

    In a `dbt build` after an earlier build (macros/changed_rows.sql), only the windows the build
    recomputed: those of the raw rows landed after the mart's mark (the windows the model itself
    recomputes, macros/cdr_usage.sql), on both sides, read through the raw tables' landing-time
    and event-time indexes. Every other window was reconciled by the build that wrote it.
    `width`: the mart's window width. -#}
{% test reconciles_with_raw(model, width) %}

{%- set mark = changed_rows_mark() %}

with

{% if mark %}
windows as (
    select distinct {{ time_bucket('events.event_ts', width) }} as window_start
    from {{ ref('int_cdr__events') }} as events
    where events.loaded_at > '{{ mark[1] }}'::timestamptz
),

{% endif %}
mart as (
    select
        category,
        sum(events) as events,
        sum(up_bytes) as up_bytes,
        sum(down_bytes) as down_bytes,
        sum(seconds) as seconds,
        sum(cost_zar) as cost_zar,
        count(*) as n_rows
    from {{ model }}
    {%- if mark %}
        where window_start in (select windows.window_start from windows)
    {%- endif %}
    group by category
),

raw as (
    select
        category,
        count(*) as events,
        sum(up_bytes) as up_bytes,
        sum(down_bytes) as down_bytes,
        sum(seconds) as seconds,
        {{ cost_zar('category', 'sum(up_bytes + down_bytes)', 'sum(seconds)') }} as cost_zar
    from {{ ref('int_cdr__events') }}
    {%- if mark %}
        where
            event_ts >= (select min(windows.window_start) from windows)
            and event_ts < (select max(windows.window_start) from windows) + {{ bucket_interval(width) }}
            and {{ time_bucket('event_ts', width) }} in (select windows.window_start from windows)
    {%- endif %}
    group by category
)

select
    coalesce(mart.category, raw.category) as category,
    mart.events as mart_events,
    raw.events as raw_events,
    mart.cost_zar as mart_cost_zar,
    raw.cost_zar as raw_cost_zar
from mart
full outer join raw on mart.category = raw.category
where
    mart.events is distinct from raw.events
    or mart.up_bytes is distinct from raw.up_bytes
    or mart.down_bytes is distinct from raw.down_bytes
    or mart.seconds is distinct from raw.seconds
    or (mart.category = 'data' and mart.cost_zar <> raw.cost_zar)
    or abs(mart.cost_zar - raw.cost_zar) > mart.n_rows * 0.00000000005

{% endtest %}
