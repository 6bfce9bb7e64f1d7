{#
    The indicator recursion of docs/business-rules.md, section 5, as Postgres aggregates:
    `wtc_ema(open, n, carried_bars, carried_ema)` and
    `wtc_atr(high, low, open, n, carried_trs, carried_atr, carried_open)`, used as running window
    aggregates (`rows between unbounded preceding and current row`) over one pair's bars. The
    carried arguments are the stored state of the bar before the rows being built (all null on a
    full build); a step reads them only on a partition's first row. Every division is div10.

    Created in the target schema by the on-run-start hook; the Python twin is
    macros_py/indicators.py, and tests/macros_py/test_sql_agreement.py holds the two equal.
#}
{% macro indicator_functions(schema) %}
-- EMA n on open. state: {bars so far, ema (null while seeding), sum of opens while seeding}
create or replace function {{ schema }}.wtc_ema_step(
    state numeric[], open numeric, n integer, carried_bars bigint, carried_ema numeric
) returns numeric[] language sql immutable as $$
    with s as (
        select coalesce(
            state,
            case
                when carried_bars is null then array[0, null, 0]::numeric[]
                else array[carried_bars, carried_ema, null]::numeric[]
            end
        ) as st
    )
    select case
        when st[1] + 1 < n then array[st[1] + 1, null, st[3] + open]
        when st[1] + 1 = n then array[st[1] + 1, round(round(st[3] + open, 40) / n, 10), null]
        else array[st[1] + 1, round(round(2 * open + (n - 1) * st[2], 40) / (n + 1), 10), null]
    end
    from s
$$;
create or replace function {{ schema }}.wtc_ema_final(state numeric[]) returns numeric
language sql immutable as $$ select state[2] $$;
create or replace aggregate {{ schema }}.wtc_ema(numeric, integer, bigint, numeric) (
    sfunc = {{ schema }}.wtc_ema_step, stype = numeric[], finalfunc = {{ schema }}.wtc_ema_final
);

-- ATR n based on open. state: {TRs so far, atr (null while seeding), sum of TRs while seeding,
-- previous open}
create or replace function {{ schema }}.wtc_atr_step(
    state numeric[], high numeric, low numeric, open numeric, n integer,
    carried_trs bigint, carried_atr numeric, carried_open numeric
) returns numeric[] language sql immutable as $$
    with s as (
        select coalesce(
            state,
            case
                when carried_trs is not null
                    then array[carried_trs, carried_atr, null, carried_open]::numeric[]
            end
        ) as st
    ),
    t as (select st, greatest(high, st[4]) - least(low, st[4]) as tr from s)
    select case
        when st is null then array[0, null, 0, open]::numeric[]
        when st[1] + 1 < n then array[st[1] + 1, null, st[3] + tr, open]
        when st[1] + 1 = n then array[st[1] + 1, round(round(st[3] + tr, 40) / n, 10), null, open]
        else array[st[1] + 1, round(round(st[2] * (n - 1) + tr, 40) / n, 10), null, open]
    end
    from t
$$;
create or replace function {{ schema }}.wtc_atr_final(state numeric[]) returns numeric
language sql immutable as $$ select state[2] $$;
create or replace aggregate {{ schema }}.wtc_atr(
    numeric, numeric, numeric, integer, bigint, numeric, numeric
) (sfunc = {{ schema }}.wtc_atr_step, stype = numeric[], finalfunc = {{ schema }}.wtc_atr_final);
{% endmacro %}

{% macro create_indicator_functions() %}
    {{ indicator_functions(target.schema) }}
{% endmacro %}
