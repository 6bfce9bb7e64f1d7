-- The current state of crm_system.accounts: the open version of every key that exists.
select
    account_id,
    owner_name,
    email,
    phone_number,
    valid_from as modified_ts,
    version_lsn
from {{ ref('crm_accounts_history') }}
where is_current
