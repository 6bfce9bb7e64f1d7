{#- docs/business-rules.md, section 3 (twin: macros_py/usage.py): the body of cdr_usage_15min,
    cdr_usage_30min and cdr_usage_1h. One row per (window_start, msisdn, category, usage_type).

    Incremental: the windows that hold a raw row loaded after the watermark (minus the lookback)
    are recomputed whole from the raw rows, so late rows land in their (old) window and the result
    equals a full refresh; the model's delete+insert replaces those windows. -#}
{% macro cdr_usage(width) -%}
with

{% if is_incremental() %}
new_windows as (
    select distinct {{ time_bucket('event_ts', width) }} as window_start
    from {{ ref('int_cdr__events') }}
    where loaded_at > {{ loaded_after() }}
),

bounds as (
    select
        min(window_start) as lo,
        max(window_start) + {{ bucket_interval(width) }} as hi
    from new_windows
),
{% endif %}

events as (
    select
        {{ time_bucket('e.event_ts', width) }} as window_start,
        e.msisdn,
        e.category,
        e.usage_type,
        e.up_bytes,
        e.down_bytes,
        e.seconds,
        e.loaded_at
    from {{ ref('int_cdr__events') }} as e
    {% if is_incremental() %}
        where
            e.event_ts >= (select bounds.lo from bounds)
            and e.event_ts < (select bounds.hi from bounds)
            and {{ time_bucket('e.event_ts', width) }} in (
                select new_windows.window_start from new_windows
            )
    {% endif %}
),

sums as (
    select
        window_start,
        msisdn,
        category,
        usage_type,
        count(*)::bigint as events,
        sum(up_bytes)::bigint as up_bytes,
        sum(down_bytes)::bigint as down_bytes,
        sum(seconds)::bigint as seconds,
        max(loaded_at) as max_loaded_at
    from events
    group by window_start, msisdn, category, usage_type
)

select
    window_start,
    msisdn,
    category,
    usage_type,
    events,
    up_bytes,
    down_bytes,
    (up_bytes + down_bytes)::bigint as total_bytes,
    seconds,
    ({{ cost_zar('category', 'up_bytes + down_bytes', 'seconds') }})::numeric(38, 10) as cost_zar,
    max_loaded_at
from sums
{%- endmacro %}
