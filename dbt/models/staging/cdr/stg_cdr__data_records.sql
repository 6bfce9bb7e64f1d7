with

source as (
    select * from {{ source('cdr', 'data_records') }}
),

renamed as (
    select
        source_file,
        line_no,
        msisdn,
        tower_id,
        up_bytes::bigint as up_bytes,
        down_bytes::bigint as down_bytes,
        data_type,
        ip_address,
        website_url,
        event_datetime as event_ts,
        loaded_at
    from source
)

select * from renamed
