with

source as (
    select * from {{ source('forex', 'ticks') }}
),

renamed as (
    select
        pair_name,
        tick_ts,
        bid_price,
        ask_price,
        spread,
        source as landed_by,
        landed_at
    from source
)

select * from renamed
