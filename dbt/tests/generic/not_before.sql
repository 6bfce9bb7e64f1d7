{#- Row-wise order of two columns: `column_name` is never earlier/smaller than `other`. Returns
    the rows where it is. -#}
{% test not_before(model, column_name, other) %}

select
    {{ column_name }},
    {{ other }}
from {{ model }}
where {{ column_name }} < {{ other }}

{% endtest %}
