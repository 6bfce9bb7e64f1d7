-- The versions of crm_system.addresses rebuilt from its change log, incrementally
-- (docs/business-rules.md, section 8; macros/crm/crm_history.sql).
{{ crm_history(
    'addresses', 'account_id',
    ['street_address', 'city', 'state', 'postal_code', 'country'],
) }}
