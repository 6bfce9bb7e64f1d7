-- The current state of crm_system.addresses: the open version of every key that exists.
select
    account_id,
    street_address,
    city,
    state,
    postal_code,
    country,
    valid_from as modified_ts,
    version_lsn
from {{ ref('crm_addresses_history') }}
where is_current
