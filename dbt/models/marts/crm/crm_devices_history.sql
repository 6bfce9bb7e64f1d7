-- The versions of crm_system.devices (built incrementally in int_crm__device_versions).
with

versions as (
    select * from {{ ref('int_crm__device_versions') }}
)

select
    device_id,
    account_id,
    device_name,
    device_type,
    device_os,
    version_lsn,
    valid_from,
    valid_to,
    is_current,
    max_landed_at
from versions
