-- Usage per 1h window, msisdn, category and usage type: see the docs block `cdr_usage`.
{{ cdr_usage('1h') }}
