-- Tower sessions: runs of 3 or more consecutive interactions of an msisdn on one tower, from
-- int_cdr__tower_runs. See the docs blocks `tower_sessions_rules` and `tower_sessions_incremental`.
with

{% if is_incremental() %}
    -- per msisdn, the tail from its earliest run (re)computed since the last build on,
    -- shorter runs included (replace_tail keeps only the sessions)
    {{ recomputed_run_tails() }}
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
