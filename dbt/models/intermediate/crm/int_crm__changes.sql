-- The CRM change log of the three tables as one stream of (entity, key, change): the input of
-- the CRM clock (a delete's time, docs/business-rules.md, section 8) and of the rebuild cutoffs.
with

accounts as (
    select
        'accounts'::text as entity,
        account_id as entity_key,
        change_op,
        change_lsn,
        modified_ts,
        landed_at
    from {{ ref('stg_crm__accounts_changes') }}
),

addresses as (
    select
        'addresses'::text as entity,
        account_id as entity_key,
        change_op,
        change_lsn,
        modified_ts,
        landed_at
    from {{ ref('stg_crm__addresses_changes') }}
),

devices as (
    select
        'devices'::text as entity,
        device_id as entity_key,
        change_op,
        change_lsn,
        modified_ts,
        landed_at
    from {{ ref('stg_crm__devices_changes') }}
),

unioned as (
    select * from accounts
    union all
    select * from addresses
    union all
    select * from devices
)

select * from unioned
