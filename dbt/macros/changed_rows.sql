{#- Data tests that read what the build changed (docs/business-rules.md, "Incremental runs").

    A model whose config has `meta: {changed_rows_column: <column>}` (a landing-time column that
    every row carries as the greatest landing time of the raw rows behind it, indexed) records,
    before each build reads anything, the landing time after which its raw rows count as new
    (`loaded_after`, macros/incremental.sql; -infinity on a first build or a full refresh). A row
    whose content this build could change holds a raw row landed after it, so its column is
    greater; a row at or before it was rebuilt from the same raw rows as before, equal to what an
    earlier build wrote and tested. With `changed_rows_stamp: build` the column is the time the
    row was computed (now() of the build that wrote it, or of the build of the rows it comes
    from) and the mark is its greatest value before the build: a later build's rows are later.

    In `dbt build`, the row-by-row data tests of such a model (not_null, accepted_values, relationships, in_range, aligned_to,
    not_before, expression_is_true: each failing row fails
    on its own, whatever the other rows hold) read only the rows after that time, when the model
    was built in the same invocation; `reconciles_with_raw` reconciles the windows the build
    recomputed (it calls `changed_rows_mark`). Uniqueness tests read the whole model, as do
    `dbt test` and `dbt build --vars '{test_all_rows: true}'`. A no-op build then tests nothing of
    the model, and an hour's build the hour: the model's index on the column finds the rows. -#}

{#- part of the pre-hook (landing_horizon_measure): the time after which raw rows are new for
    this build, into a transaction-local setting stored by the post-hook -#}
{% macro changed_rows_measure() -%}
    {%- set meta = model.config.get('meta', {}) -%}
    {%- set column = meta.get('changed_rows_column') -%}
    {%- if column -%}
        select set_config('wtc.changed_after', (
            {%- if not is_incremental() %} '-infinity'::timestamptz
            {%- elif meta.get('changed_rows_stamp') == 'build' %}
                select coalesce(max({{ column }}), '-infinity'::timestamptz) from {{ this }}
            {%- else %} {{ loaded_after(column) }}
            {%- endif %})::text, true)
    {%- endif -%}
{%- endmacro %}


{#- dbt's hook for a data test's `where` config (the model a generic test reads): that filter,
    and the changed rows' one above -#}
{% macro get_where_subquery(relation) -%}
    {%- set predicates = [config.get('where', ''), changed_rows_predicate()] | select | list -%}
    {%- if predicates -%}
        {%- set filtered -%}
            (select * from {{ relation }} where ({{ predicates | join(') and (') }})) dbt_subquery
        {%- endset -%}
        {%- do return(filtered) -%}
    {%- endif -%}
    {%- do return(relation) -%}
{%- endmacro %}


{#- `<column> > '<time>'` for a row-by-row test of a model built in this `dbt build` with a
    changed-rows column; '' when the test reads the whole model -#}
{% macro changed_rows_predicate() -%}
    {%- set row_tests = [
        'not_null', 'accepted_values', 'relationships', 'in_range', 'aligned_to', 'not_before',
        'expression_is_true',
    ] -%}
    {%- set mark = changed_rows_mark() -%}
    {%- if not mark or (model.get('test_metadata') or {}).get('name') not in row_tests -%}
        {%- do return('') -%}
    {%- endif -%}
    {%- do return(mark[0] ~ " > '" ~ mark[1] ~ "'::timestamptz") -%}
{%- endmacro %}


{#- [changed-rows column, the time after which its rows changed] of the model the data test
    being compiled is attached to, when this `dbt build` built it after an earlier build (none
    otherwise: the test reads the whole model). A test's own SQL calls it too (reconciles_with_raw
    reconciles the windows the build changed). -#}
{% macro changed_rows_mark() -%}
    {%- if not execute or flags.WHICH != 'build' or var('test_all_rows', false) -%}
        {%- do return(none) -%}
    {%- endif -%}
    {%- set tested = graph.nodes.get(model.get('attached_node') or '') -%}
    {%- set column = tested.config.get('meta', {}).get('changed_rows_column') if tested -%}
    {%- if not column -%}
        {%- do return(none) -%}
    {%- endif -%}
    {%- set found = run_query(
        "select changed_after::text from " ~ target.schema ~ ".dbt_landing_horizons"
        ~ " where model = '" ~ tested.schema ~ "." ~ tested.alias ~ "'"
        ~ " and invocation_id = '" ~ invocation_id ~ "' and changed_after > '-infinity'"
    ) -%}
    {%- do return([column, found.rows[0][0]] if found.rows | length > 0 else none) -%}
{%- endmacro %}
