{{
    config(
        materialized='incremental',
        incremental_strategy='replace_tail',
        unique_key=['msisdn', 'run_start', 'first_category', 'first_source_file', 'first_line_no'],
        tail_partition='msisdn',
        tail_key=['run_start', 'first_category', 'first_source_file', 'first_line_no'],
        indexes=[
            {
                'columns': ['msisdn', 'run_start', 'first_category', 'first_source_file', 'first_line_no'],
                'unique': true,
            },
            {'columns': ['computed_at']},
            {'columns': ['max_loaded_at']},
        ],
    )
}}
-- Every run of every msisdn (sessions are the runs of 3 or more), the state the incremental
-- session marts build on. See the docs block `tower_sessions_incremental`.
{% if is_incremental() %}
    with

    new_interactions as (
        select
            msisdn,
            event_ts,
            category,
            source_file,
            line_no
        from {{ ref('int_cdr__interactions') }}
        where loaded_at > {{ loaded_after() }}
    ),

    -- per msisdn, its first new interaction in the session order
    first_new as (
        select distinct on (msisdn)
            msisdn,
            event_ts,
            category,
            source_file,
            line_no
        from new_interactions
        order by msisdn, {{ interaction_order() }}
    ),

    -- per msisdn, the stored run that starts last before it: everything before that run's start
    -- stays as it is; the tail from there on is recomputed (null: the msisdn's whole history)
    tails as (
        select
            first_new.msisdn,
            kept.run_start,
            kept.first_category,
            kept.first_source_file,
            kept.first_line_no
        from first_new
        left join lateral (
            select
                runs.run_start,
                runs.first_category,
                runs.first_source_file,
                runs.first_line_no
            from {{ this }} as runs
            where
                runs.msisdn = first_new.msisdn
                and runs.run_start <= first_new.event_ts
                and {{ run_key('runs') }} < {{ interaction_key('first_new') }}  -- noqa: RF03
            order by {{ run_order('runs', 'desc') }}  -- noqa: RF03
            limit 1
        ) as kept on true
    ),

    -- lateral: one index range per msisdn on (msisdn, event_ts), whatever the history's size
    interactions as (
        select copied.*
        from tails
        cross join lateral (
            select *
            from {{ ref('int_cdr__interactions') }} as i
            where
                i.msisdn = tails.msisdn  -- noqa: RF03
                and (
                    tails.run_start is null
                    or (
                        tails.run_start <= i.event_ts
                        and {{ run_key('tails') }} <= {{ interaction_key('i') }}  -- noqa: RF02
                    )
                )
        ) as copied
    ),
{% else %}
    with

    interactions as (
        select * from {{ ref('int_cdr__interactions') }}
    ),
{% endif %}

runs as (
    {{ tower_runs('interactions') }}
)

select
    msisdn,
    tower_id,
    run_start,
    first_category,
    first_source_file,
    first_line_no,
    run_end,
    interactions,
    max_loaded_at,
    now() as computed_at
from runs
