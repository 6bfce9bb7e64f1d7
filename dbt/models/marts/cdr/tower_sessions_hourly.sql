-- Tower sessions per hour of their start, msisdn and tower, from int_cdr__tower_runs.
-- See the docs blocks `tower_sessions_rules` and `tower_sessions_incremental`.
with

{% if is_incremental() %}
    -- per msisdn, the hour of the earliest run (re)computed since this mart was last built:
    -- every hour from there on is replaced
    changed as (
        select
            msisdn,
            date_trunc('hour', min(run_start)) as tail_from
        from {{ ref('int_cdr__tower_runs') }}
        where
            computed_at > (
                select coalesce(max(hourly.computed_at), '-infinity') as watermark
                from {{ this }} as hourly
            )
        group by msisdn
    ),

    -- the whole tail, shorter runs included (they give rows with 0 sessions, which the
    -- replace_tail strategy uses as the start of the tail and does not keep)
    runs as (
        select runs.*
        from changed
        cross join lateral (
            select *
            from {{ ref('int_cdr__tower_runs') }} as r
            where
                r.msisdn = changed.msisdn  -- noqa: RF03
                and changed.tail_from <= r.run_start
        ) as runs
    ),
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
