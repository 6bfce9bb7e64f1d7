{#- An as-of join: `left join lateral` the row of `relation` valid at the instant `at` (an SQL
    expression over the outer query), as `alias`. Of the rows (alias `versions`) that pass
    `match` (an SQL predicate over `versions` and the outer query) with `valid_from <= at` and,
    when `valid_to` is given, `at < valid_to` (null: still valid), the one with the latest
    `valid_from`, ties to the greatest `tie_break`; nulls when there is none. `columns` are the
    SQL expressions it selects (over `versions`, each with its alias). An index on the match
    columns and `valid_from` of `relation` makes it one index probe per outer row. -#}
{% macro left_join_as_of(
    relation, alias, at, columns,
    match='true', valid_from='valid_from', valid_to=none, tie_break=none
) -%}
    left join lateral (
        select
            {%- for column in columns %}
            {{ column }}{% if not loop.last %},{% endif %}
            {%- endfor %}
        from {{ relation }} as versions
        where
            {{ match }}
            and versions.{{ valid_from }} <= {{ at }}
            {%- if valid_to %}
            and (versions.{{ valid_to }} is null or {{ at }} < versions.{{ valid_to }})
            {%- endif %}
        order by versions.{{ valid_from }} desc
            {%- if tie_break %}, versions.{{ tie_break }} desc{% endif %}
        limit 1
    ) as {{ alias }} on true
{%- endmacro %}
