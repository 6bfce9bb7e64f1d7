-- Tower sessions per hour of their start, msisdn and tower, from int_cdr__tower_runs.
-- See the docs blocks `tower_sessions_rules` and `tower_sessions_incremental`.
with

{% if is_incremental() %}
    -- per msisdn, every hour from that of its earliest run (re)computed since the last build on;
    -- shorter runs give rows with 0 sessions, which replace_tail uses as the start of the tail
    -- and does not keep
    {{ recomputed_run_tails('hour') }},
{% else %}
    runs as (
        select *
        from {{ ref('int_cdr__tower_runs') }}
        where interactions >= {{ var('session_min_interactions') }}
    ),
{% endif %}

hourly as (
    select
        msisdn,
        tower_id,
        date_trunc('hour', run_start) as hour_start,
        count(*) filter (
            where interactions >= {{ var('session_min_interactions') }}
        )::bigint as sessions,
        coalesce(sum(interactions) filter (
            where interactions >= {{ var('session_min_interactions') }}
        ), 0)::bigint as interactions,
        max(computed_at) as computed_at
    from runs
    group by date_trunc('hour', run_start), msisdn, tower_id
)

select * from hourly
