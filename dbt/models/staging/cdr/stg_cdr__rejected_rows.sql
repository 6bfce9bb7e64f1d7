with

source as (
    select * from {{ source('cdr', 'rejected_rows') }}
),

renamed as (
    select
        source_file,
        line_no,
        raw_line,
        reason,
        rejected_at
    from source
)

select * from renamed
