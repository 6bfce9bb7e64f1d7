-- The versions of crm_system.addresses (built incrementally in int_crm__address_versions).
with

versions as (
    select * from {{ ref('int_crm__address_versions') }}
)

select
    account_id,
    street_address,
    city,
    state,
    postal_code,
    country,
    version_lsn,
    valid_from,
    valid_to,
    is_current,
    max_landed_at
from versions
