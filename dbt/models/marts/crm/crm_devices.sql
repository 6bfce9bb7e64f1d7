-- The current state of crm_system.devices: the open version of every key that exists.
select
    device_id,
    account_id,
    device_name,
    device_type,
    device_os,
    valid_from as modified_ts,
    version_lsn
from {{ ref('crm_devices_history') }}
where is_current
