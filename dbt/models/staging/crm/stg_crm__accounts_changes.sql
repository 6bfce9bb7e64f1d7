with

source as (
    select * from {{ source('crm', 'accounts_changes') }}
),

renamed as (
    select
        account_id,
        owner_name,
        email,
        phone_number,
        modified_ts,
        __op as change_op,
        __lsn as change_lsn,
        __source_ts_ms as source_ts_ms,
        landed_at,
        to_timestamp(__source_ts_ms / 1000.0) at time zone 'UTC' as source_committed_at
    from source
)

select * from renamed
