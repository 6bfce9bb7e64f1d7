-- Data and voice records as one event stream (docs/business-rules.md, sections 3 and 4):
-- data records are category 'data' with their bytes, calls are category 'call' with their
-- seconds; a data event ends when it starts, a call at start + duration.
with

data_events as (
    select
        'data'::text as category,
        data_type as usage_type,
        msisdn,
        tower_id,
        event_ts,
        event_ts as event_end,
        up_bytes,
        down_bytes,
        0::bigint as seconds,
        source_file,
        line_no,
        loaded_at
    from {{ ref('stg_cdr__data_records') }}
),

call_events as (
    select
        'call'::text as category,
        call_type as usage_type,
        msisdn,
        tower_id,
        event_ts,
        event_end,
        0::bigint as up_bytes,
        0::bigint as down_bytes,
        call_duration_sec as seconds,
        source_file,
        line_no,
        loaded_at
    from {{ ref('stg_cdr__voice_records') }}
),

unioned as (
    select * from data_events
    union all
    select * from call_events
)

select * from unioned
