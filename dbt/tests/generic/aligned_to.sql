{#- Every value of the timestamp column is the start of a window of `width` (macros/time_buckets.sql):
    returns the values that are not. -#}
{% test aligned_to(model, column_name, width) %}

select {{ column_name }}
from {{ model }}
where {{ column_name }} <> {{ time_bucket(column_name, width) }}

{% endtest %}
