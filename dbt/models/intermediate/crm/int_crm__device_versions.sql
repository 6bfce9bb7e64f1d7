-- The versions of crm_system.devices rebuilt from its change log, incrementally
-- (docs/business-rules.md, section 8; macros/crm/crm_history.sql).
{{ crm_history('devices', 'device_id', ['account_id', 'device_name', 'device_type', 'device_os']) }}
