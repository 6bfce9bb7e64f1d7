{{ crm_history('devices', 'device_id', ['account_id', 'device_name', 'device_type', 'device_os']) }}
