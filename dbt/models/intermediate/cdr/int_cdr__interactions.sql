{{
    config(
        materialized='incremental',
        incremental_strategy='append',
        unique_key=['category', 'source_file', 'line_no'],
        indexes=[
            {'columns': ['category', 'source_file', 'line_no'], 'unique': true},
            {'columns': ['msisdn', 'event_ts']},
            {'columns': ['loaded_at']},
        ],
    )
}}
-- The interactions of the tower-session rules, copied into a table indexed by msisdn and time
-- (the raw tables are indexed by time only), so that an incremental run can read one msisdn's
-- recent interactions without scanning history. Append-only: rows loaded after the watermark
-- minus the lookback that are not here yet.
with

events as (
    select
        msisdn,
        tower_id,
        event_ts,
        category,
        source_file,
        line_no,
        event_end,
        loaded_at
    from {{ ref('int_cdr__events') }}
    {% if is_incremental() %}
        where loaded_at > {{ loaded_after('loaded_at') }}
    {% endif %}
)

select events.*
from events
{% if is_incremental() %}
    where not exists (
        select 1
        from {{ this }} as copied
        where
            copied.category = events.category
            and copied.source_file = events.source_file
            and copied.line_no = events.line_no
    )
{% endif %}
