{#- docs/business-rules.md, section 0: every derived decimal is rounded once to 10 places, half
    away from zero; a division goes through div10 so that Postgres computes the quotient to at
    least 40 decimals before that single rounding (equal to rounding the exact quotient). -#}
{% macro div10(num, den) -%}
    round(round(({{ num }})::numeric, 40) / ({{ den }}), 10)
{%- endmacro %}

{% macro round10(x) -%}
    round(({{ x }})::numeric, 10)
{%- endmacro %}
