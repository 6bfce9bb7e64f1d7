-- Tower sessions: runs of 3 or more consecutive interactions of an msisdn on one tower, from
-- int_cdr__tower_runs. See the docs blocks `tower_sessions_rules` and `tower_sessions_incremental`.
with

{% if is_incremental() %}
    -- per msisdn, the earliest run (re)computed since this mart was last built: every session
    -- from that run's start on is replaced
    changed as (
        select
            msisdn,
            min(run_start) as tail_from
        from {{ ref('int_cdr__tower_runs') }}
        where
            computed_at > (
                select coalesce(max(sessions.computed_at), '-infinity') as watermark
                from {{ this }} as sessions
            )
        group by msisdn
    ),

    -- the whole tail, shorter runs included: the replace_tail strategy deletes from each msisdn's
    -- earliest row in this batch on and keeps only the runs that are sessions
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
    )
{% else %}
    runs as (
        select *
        from {{ ref('int_cdr__tower_runs') }}
        where interactions >= {{ var('session_min_interactions') }}
    )
{% endif %}

select
    msisdn,
    tower_id,
    run_start as session_start,
    run_end as session_end,
    interactions,
    computed_at
from runs
