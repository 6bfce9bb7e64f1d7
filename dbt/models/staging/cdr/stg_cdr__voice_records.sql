with

source as (
    select * from {{ source('cdr', 'voice_records') }}
),

renamed as (
    select
        source_file,
        line_no,
        msisdn,
        tower_id,
        call_type,
        dest_nr,
        call_duration_sec::bigint as call_duration_sec,
        start_time as event_ts,
        loaded_at,
        start_time + call_duration_sec * interval '1 second' as event_end
    from source
)

select * from renamed
