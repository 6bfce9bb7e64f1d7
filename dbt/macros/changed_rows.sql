{#- Data tests that read what the build changed (docs/business-rules.md, "Incremental runs").

    A model whose config has `meta: {changed_rows_column: <column>}` (a landing-time column that
    every row carries as the greatest landing time of the raw rows behind it, indexed) records,
    before each build reads anything, the landing time after which its raw rows count as new
    (`loaded_after`, macros/incremental.sql; -infinity on a first build or a full refresh). A row
    whose content this build could change holds a raw row landed after it, so its column is
    greater; a row at or before it was rebuilt from the same raw rows as before, equal to what an
    earlier build wrote and tested.

    In `dbt build`, the row-by-row data tests of such a model (not_null, accepted_values, relationships, in_range, aligned_to,
    not_before, expression_is_true: each failing row fails
    on its own, whatever the other rows hold) read only the rows after that time, when the model
    was built in the same invocation. Tests across rows (uniqueness, reconciling with the raw
    totals) read the whole model, as does `dbt test`, and `dbt build --vars
    '{test_all_rows: true}'`. A no-op build then tests nothing of the model, and an hour's build
    the hour: the model's index on the column finds the rows. -#}

{#- part of the pre-hook (landing_horizon_measure): the time after which raw rows are new for
    this build, into a transaction-local setting stored by the post-hook -#}
{% macro changed_rows_measure() -%}
    {%- set column = model.config.get('meta', {}).get('changed_rows_column') -%}
    {%- if column -%}
        select set_config('wtc.changed_after', (
            {%- if is_incremental() %} {{ loaded_after(column) }}
            {%- else %} '-infinity'::timestamptz
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
    {%- if not execute or flags.WHICH != 'build' or var('test_all_rows', false) -%}
        {%- do return('') -%}
    {%- endif -%}
    {%- set row_tests = [
        'not_null', 'accepted_values', 'relationships', 'in_range', 'aligned_to', 'not_before',
        'expression_is_true',
    ] -%}
    {%- set test = model.get('test_metadata') or {} -%}
    {%- set tested = graph.nodes.get(model.get('attached_node') or '') -%}
    {%- if test.get('name') not in row_tests or not tested -%}
        {%- do return('') -%}
    {%- endif -%}
    {%- set column = tested.config.get('meta', {}).get('changed_rows_column') -%}
    {%- if not column -%}
        {%- do return('') -%}
    {%- endif -%}
    {%- set found = run_query(
        "select changed_after::text from " ~ target.schema ~ ".dbt_landing_horizons"
        ~ " where model = '" ~ tested.schema ~ "." ~ tested.alias ~ "'"
        ~ " and invocation_id = '" ~ invocation_id ~ "' and changed_after > '-infinity'"
    ) -%}
    {%- if found.rows | length == 0 -%}
        {%- do return('') -%}
    {%- endif -%}
    {%- do return(column ~ " > '" ~ found.rows[0][0] ~ "'::timestamptz") -%}
{%- endmacro %}
