{#- docs/business-rules.md, section 2 (twin: macros_py/tariffs.py). Costs are computed on a sum of
    bytes or seconds, never summed from per-event costs. -#}

{#- Data: 49 ZAR per GB billed per byte on up + down; a GB is var('gb_bytes') bytes (SI, 10^9). -#}
{% macro data_cost_zar(total_bytes) -%}
    {{ div10('(' ~ total_bytes ~ ') * 49', var('gb_bytes')) }}
{%- endmacro %}

{#- Calls (voice and video): 1 ZAR per minute billed per second. -#}
{% macro call_cost_zar(seconds) -%}
    {{ div10(seconds, 60) }}
{%- endmacro %}

{#- The cost of a usage row: the data tariff for category 'data', the call tariff for 'call'. -#}
{% macro cost_zar(category, total_bytes, seconds) -%}
    case {{ category }}
        when 'data' then {{ data_cost_zar(total_bytes) }}
        when 'call' then {{ call_cost_zar(seconds) }}
    end
{%- endmacro %}
