{#- Schema names exactly as configured, without the target-schema prefix dbt adds by default:
    models without `+schema` land in the target schema (`prepared_layers`), the others in the
    schema they name (`staging`, `intermediate`). -#}
{% macro generate_schema_name(custom_schema_name, node) -%}
    {%- if custom_schema_name is none -%}
        {{ target.schema }}
    {%- else -%}
        {{ custom_schema_name | trim }}
    {%- endif -%}
{%- endmacro %}
