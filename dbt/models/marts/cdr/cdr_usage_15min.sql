-- Usage per 15min window, msisdn, category and usage type: see the docs block `cdr_usage`.
{{ cdr_usage('15min') }}
