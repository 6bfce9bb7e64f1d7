-- The versions of crm_system.accounts (built incrementally in int_crm__account_versions).
with

versions as (
    select * from {{ ref('int_crm__account_versions') }}
)

select
    account_id,
    owner_name,
    email,
    phone_number,
    version_lsn,
    valid_from,
    valid_to,
    is_current,
    max_landed_at
from versions
