{{ crm_history('accounts', 'account_id', ['owner_name', 'email', 'phone_number']) }}
