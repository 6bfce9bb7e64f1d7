with

source as (
    select * from {{ source('cdr', 'files') }}
),

renamed as (
    select
        file_name,
        kind,
        size_bytes,
        sha256,
        rows_landed,
        rows_rejected,
        first_event_at,
        last_event_at,
        loaded_at
    from source
)

select * from renamed
