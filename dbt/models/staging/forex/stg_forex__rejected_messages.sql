with

source as (
    select * from {{ source('forex', 'rejected_messages') }}
),

renamed as (
    select
        id as rejected_message_id,
        source as landed_by,
        message_key,
        payload,
        reason,
        rejected_at
    from source
)

select * from renamed
