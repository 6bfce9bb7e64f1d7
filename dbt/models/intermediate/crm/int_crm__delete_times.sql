-- The time of every delete in the CRM change log: the CRM clock just before it
-- (docs/business-rules.md, section 8; macros/crm/crm_history.sql, crm_delete_times).
{{ crm_delete_times() }}
