{{ crm_history(
    'addresses', 'account_id',
    ['street_address', 'city', 'state', 'postal_code', 'country'],
) }}
