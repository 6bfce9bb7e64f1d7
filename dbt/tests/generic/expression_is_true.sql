{#- A SQL predicate holds on every row: returns the rows where it does not. -#}
{% test expression_is_true(model, expression) %}

select *
from {{ model }}
where not ({{ expression }})

{% endtest %}
