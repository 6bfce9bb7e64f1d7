{#- Helpers of the incremental marts (see models/marts/cdr/_cdr__docs.md, "incremental"). -#}

{#- The landing time after which raw rows count as new for the model being built: its high-water
    mark least(L, H - 1 microsecond) (macros/landing_marks.sql), where L is the greatest `column`
    of `relation` (by default the model itself: the latest landing it has processed) and H the
    model's landing horizon. A target without a stored horizon (built before horizons were kept)
    falls back to L minus the var named `lookback` (`landing_lookback` or `crm_lookback`), the
    wall-clock window of old. An empty target gives -infinity (everything is new). -#}
{% macro loaded_after(column='max_loaded_at', relation=none, lookback='landing_lookback') -%}
    (
        select least(
            coalesce(max({{ column }}), '-infinity'::timestamptz),
            coalesce(
                {{ landing_horizon() }} - interval '1 microsecond',
                max({{ column }}) - interval '{{ var(lookback) }}',
                '-infinity'::timestamptz
            )
        )
        from {{ relation if relation is not none else this }}
    )
{%- endmacro %}


{#- Custom incremental strategy `replace_tail`: per partition (config `tail_partition`, e.g.
    msisdn), delete every target row whose key (config `tail_key`, a list of columns compared in
    that order, text in byte order) is at or after the smallest key of that partition in the
    batch, then insert the batch rows that pass config `tail_keep` (a SQL predicate, default
    true). The batch must therefore hold, for every partition it touches, the complete new tail
    from its first key on: the models that use it say how they guarantee that. -#}
{% macro get_incremental_replace_tail_sql(arg_dict) %}
    {%- set target = arg_dict['target_relation'] -%}
    {%- set source = arg_dict['temp_relation'] -%}
    {%- set partition = config.get('tail_partition') -%}
    {%- set key = config.get('tail_key') -%}
    {%- set keep = config.get('tail_keep', 'true') -%}
    {%- if not partition or not key -%}
        {{ exceptions.raise_compiler_error("replace_tail needs the configs tail_partition and tail_key") }}
    {%- endif -%}
    {%- if key is string -%}{%- set key = [key] -%}{%- endif -%}
    {%- set text_columns = [] -%}
    {%- for column in adapter.get_columns_in_relation(target) -%}
        {%- if column.is_string() -%}{%- do text_columns.append(column.name) -%}{%- endif -%}
    {%- endfor -%}
    {%- set ns = namespace(target_key=[], batch_key=[], order_key=[]) -%}
    {%- for column in key -%}
        {%- set collate = ' collate "C"' if column in text_columns else '' -%}
        {%- do ns.target_key.append('t.' ~ column ~ collate) -%}
        {%- do ns.batch_key.append('b.' ~ column ~ collate) -%}
        {%- do ns.order_key.append(column ~ collate) -%}
    {%- endfor -%}
    {%- set dest_cols_csv = get_quoted_csv(arg_dict['dest_columns'] | map(attribute='name')) -%}

    delete from {{ target }} as t
    using (
        select distinct on ({{ partition }}) {{ partition }}, {{ key | join(', ') }}
        from {{ source }}
        order by {{ partition }}, {{ ns.order_key | join(', ') }}
    ) as b
    where t.{{ partition }} = b.{{ partition }}
        and t.{{ key[0] }} >= b.{{ key[0] }}
        and ({{ ns.target_key | join(', ') }}) >= ({{ ns.batch_key | join(', ') }});

    insert into {{ target }} ({{ dest_cols_csv }})
    select {{ dest_cols_csv }}
    from {{ source }}
    where {{ keep }}
{% endmacro %}


{#- Custom incremental strategy `replace_from`: delete every target row whose
    config('replace_from_column') is at or after the smallest value of that column in the batch,
    then insert the batch rows that pass config('replace_keep') (a SQL predicate, default true).
    A batch can carry a marker row (kept out by `replace_keep`) so that the delete happens even
    when nothing is to be inserted; an empty batch changes nothing. -#}
{% macro get_incremental_replace_from_sql(arg_dict) %}
    {%- set target = arg_dict['target_relation'] -%}
    {%- set source = arg_dict['temp_relation'] -%}
    {%- set column = config.get('replace_from_column') -%}
    {%- set keep = config.get('replace_keep', 'true') -%}
    {%- if not column -%}
        {{ exceptions.raise_compiler_error("replace_from needs the config replace_from_column") }}
    {%- endif -%}
    {%- set dest_cols_csv = get_quoted_csv(arg_dict['dest_columns'] | map(attribute='name')) -%}

    delete from {{ target }}
    where {{ column }} >= (select min({{ column }}) from {{ source }});

    insert into {{ target }} ({{ dest_cols_csv }})
    select {{ dest_cols_csv }}
    from {{ source }}
    where {{ keep }}
{% endmacro %}
