-- The versions of crm_system.accounts rebuilt from its change log, incrementally
-- (docs/business-rules.md, section 8; macros/crm/crm_history.sql).
{{ crm_history('accounts', 'account_id', ['owner_name', 'email', 'phone_number']) }}
