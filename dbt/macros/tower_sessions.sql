{#- docs/business-rules.md, section 4 (twin: macros_py/sessions.py). -#}

{#- The total order of an msisdn's interactions: event time, then category ('call' before
    'data'), source file and line, text compared in byte order. -#}
{% macro interaction_order(alias=none, direction='') -%}
    {%- set p = alias ~ '.' if alias else '' -%}
    {{ p }}event_ts {{ direction }}, {{ p }}category collate "C" {{ direction }},
    {{ p }}source_file collate "C" {{ direction }}, {{ p }}line_no {{ direction }}
{%- endmacro %}

{#- The same order key as a row value, for comparisons such as (key) < (other key). -#}
{% macro interaction_key(alias=none) -%}
    {%- set p = alias ~ '.' if alias else '' -%}
    ({{ p }}event_ts, {{ p }}category collate "C", {{ p }}source_file collate "C", {{ p }}line_no)
{%- endmacro %}

{#- The order key of a run's first interaction (columns run_start, first_category,
    first_source_file, first_line_no of int_cdr__tower_runs) as a row value, and as an order. -#}
{% macro run_key(alias) -%}
    ({{ alias }}.run_start, {{ alias }}.first_category collate "C",
    {{ alias }}.first_source_file collate "C", {{ alias }}.first_line_no)
{%- endmacro %}

{% macro run_order(alias, direction='') -%}
    {{ alias }}.run_start {{ direction }}, {{ alias }}.first_category collate "C" {{ direction }},
    {{ alias }}.first_source_file collate "C" {{ direction }}, {{ alias }}.first_line_no {{ direction }}
{%- endmacro %}

{#- The runs (maximal sequences of consecutive interactions of an msisdn on one tower) of the
    interactions in relation or CTE `interactions`, which must hold, per msisdn, every
    interaction from a run start on (gaps and islands). One row per run: its tower, first
    interaction (`run_start` and the rest of its order key), `run_end` (latest event end: a call
    ends at start + duration), number of interactions and the latest raw `loaded_at`. -#}
{% macro tower_runs(interactions) -%}
    select
        msisdn,
        tower_id,
        min(event_ts) as run_start,
        (array_agg(category order by rn))[1] as first_category,
        (array_agg(source_file order by rn))[1] as first_source_file,
        (array_agg(line_no order by rn))[1] as first_line_no,
        max(event_end) as run_end,
        count(*)::bigint as interactions,
        max(loaded_at) as max_loaded_at
    from (
        select
            *,
            row_number() over (
                partition by msisdn order by {{ interaction_order() }}
            ) as rn,
            row_number() over (
                partition by msisdn order by {{ interaction_order() }}
            ) - row_number() over (
                partition by msisdn, tower_id order by {{ interaction_order() }}
            ) as island
        from {{ interactions }}
    ) as numbered
    group by msisdn, tower_id, island
{%- endmacro %}

{#- The batch of an incremental session mart (tower_sessions, tower_sessions_hourly): per msisdn,
    every run of int_cdr__tower_runs from the start of its earliest run (re)computed since the
    mart was last built (the mart's greatest `computed_at`) on, shorter runs included, as the
    CTEs `changed` (msisdn, tail_from) and `runs`. `tail_unit` ('hour') truncates tail_from for
    a mart keyed on that unit. The replace_tail strategy then replaces each msisdn's tail. -#}
{% macro recomputed_run_tails(tail_unit=none) -%}
    changed as (
        select
            msisdn,
            {% if tail_unit -%}
                date_trunc('{{ tail_unit }}', min(run_start)) as tail_from
            {%- else -%}
                min(run_start) as tail_from
            {%- endif %}
        from {{ ref('int_cdr__tower_runs') }}
        where
            computed_at > (
                select coalesce(max(built.computed_at), '-infinity') as watermark
                from {{ this }} as built
            )
        group by msisdn
    ),

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
{%- endmacro %}
