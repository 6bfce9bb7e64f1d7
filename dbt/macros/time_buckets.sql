{#- docs/business-rules.md, section 1 (twin: macros_py/buckets.py). Windows are half-open
    [start, start + width), aligned to midnight UTC; timestamps are naive UTC. -#}
{% macro bucket_interval(width) -%}
    {%- set intervals = {
        '1min': '1 minute', 'm1': '1 minute',
        '15min': '15 minutes',
        '30min': '30 minutes', 'm30': '30 minutes',
        '1h': '1 hour', 'h1': '1 hour',
        '1d': '1 day',
    } -%}
    {%- if width not in intervals -%}
        {{ exceptions.raise_compiler_error("unknown bucket width " ~ width ~ "; known: " ~ (intervals.keys() | list | sort | join(', '))) }}
    {%- endif -%}
    interval '{{ intervals[width] }}'
{%- endmacro %}

{#- The start of the window of `width` that contains the timestamp expression `ts`. -#}
{% macro time_bucket(ts, width) -%}
    {%- if width in ('1min', 'm1') -%}
        date_trunc('minute', {{ ts }})
    {%- elif width in ('1h', 'h1') -%}
        date_trunc('hour', {{ ts }})
    {%- elif width == '1d' -%}
        date_trunc('day', {{ ts }})
    {%- else -%}
        date_bin({{ bucket_interval(width) }}, {{ ts }}, timestamp '2000-01-01')
    {%- endif -%}
{%- endmacro %}
