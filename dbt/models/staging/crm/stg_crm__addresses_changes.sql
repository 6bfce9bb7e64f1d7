with

source as (
    select * from {{ source('crm', 'addresses_changes') }}
),

renamed as (
    select
        account_id,
        street_address,
        city,
        state,
        postal_code,
        country,
        modified_ts,
        __op as change_op,
        __lsn as change_lsn,
        __source_ts_ms as source_ts_ms,
        landed_at,
        to_timestamp(__source_ts_ms / 1000.0) at time zone 'UTC' as source_committed_at
    from source
)

select * from renamed
