{#
    One forex OHLC model (width m1, m30 or h1) with EMA 8/21 and ATR 8/21 on the open
    (docs/business-rules.md, section 5), from the bid price of the landed ticks.

    Incremental: the ticks landed since the model's watermark (`loaded_after`, which keeps the
    landing lookback) mark, per pair, the first bar they touch. That bar and every later bar of the
    pair are rebuilt from the ticks, the recursion carried from the stored bar just before; while
    that bar's seeds are incomplete (bar_no < 22: EMA 21 seeds at bar 21, ATR 21 at bar 22) the
    pair is rebuilt from its first bar. The `replace_tail` strategy swaps in the rebuilt tail of
    each pair, so the result equals a full refresh.
#}
{% macro forex_ohlc(width) %}
{%- set indicators = target.schema ~ '.' -%}
with

-- not materialized: read twice, planned through to the indexes of the table behind
source_ticks as not materialized (
    select * from {{ ref('stg_forex__ticks') }}
),

{% if is_incremental() %}
changed as (
    select
        pair_name,
        min({{ time_bucket('tick_ts', width) }}) as changed_from
    from source_ticks
    where landed_at > {{ loaded_after('last_landed_at') }}
    group by pair_name
),

bar_before as (
    select distinct on (built.pair_name)
        built.pair_name,
        built.bar_no,
        built.open,
        built.ema_8,
        built.ema_21,
        built.atr_8,
        built.atr_21
    from {{ this }} as built
    inner join changed
        on
            built.pair_name = changed.pair_name
            and built.bar_start < changed.changed_from
    order by built.pair_name asc, built.bar_start desc
),

rebuild as (
    -- the stored bar before the change carries the recursion once its seeds are complete
    select
        changed.pair_name,
        case
            when seed.complete then changed.changed_from else '-infinity'::timestamp
        end as rebuild_from,
        case when seed.complete then bar_before.bar_no end as carried_bars,
        case when seed.complete then bar_before.open end as carried_open,
        case when seed.complete then bar_before.ema_8 end as carried_ema_8,
        case when seed.complete then bar_before.ema_21 end as carried_ema_21,
        case when seed.complete then bar_before.atr_8 end as carried_atr_8,
        case when seed.complete then bar_before.atr_21 end as carried_atr_21
    from changed
    left join bar_before on changed.pair_name = bar_before.pair_name
    cross join lateral (
        select coalesce(bar_before.bar_no >= 22, false) as complete
    ) as seed
),
{% endif %}

ticks as (
    select
        ticks.pair_name,
        ticks.tick_ts,
        ticks.bid_price,
        ticks.landed_at,
        {{ time_bucket('ticks.tick_ts', width) }} as bar_start
    from source_ticks as ticks
    {% if is_incremental() %}
        inner join rebuild
            on
                ticks.pair_name = rebuild.pair_name
                and ticks.tick_ts >= rebuild.rebuild_from
    {% endif %}
),

bars as (
    select
        pair_name,
        bar_start,
        (array_agg(bid_price order by tick_ts asc))[1] as open,
        max(bid_price) as high,
        min(bid_price) as low,
        (array_agg(bid_price order by tick_ts desc))[1] as close,
        count(*) as tick_count,
        max(landed_at) as last_landed_at
    from ticks
    group by pair_name, bar_start
),

carried as (
    select
        bars.*,
        {% if is_incremental() %}
            rebuild.carried_bars,
            rebuild.carried_open,
            rebuild.carried_ema_8,
            rebuild.carried_ema_21,
            rebuild.carried_atr_8,
            rebuild.carried_atr_21
        {% else %}
            null::bigint as carried_bars,
            null::numeric as carried_open,
            null::numeric as carried_ema_8,
            null::numeric as carried_ema_21,
            null::numeric as carried_atr_8,
            null::numeric as carried_atr_21
        {% endif %}
    from bars
    {% if is_incremental() %}
        inner join rebuild on bars.pair_name = rebuild.pair_name
    {% endif %}
),

indicators as (
    select
        pair_name,
        bar_start,
        open,
        high,
        low,
        close,
        tick_count,
        last_landed_at,
        coalesce(carried_bars, 0) + row_number() over series as bar_no,
        {{ indicators }}wtc_ema(open, 8, carried_bars, carried_ema_8) over series as ema_8,
        {{ indicators }}wtc_ema(open, 21, carried_bars, carried_ema_21) over series as ema_21,
        {{ indicators }}wtc_atr(
            high, low, open, 8, carried_bars - 1, carried_atr_8, carried_open
        ) over series as atr_8,
        {{ indicators }}wtc_atr(
            high, low, open, 21, carried_bars - 1, carried_atr_21, carried_open
        ) over series as atr_21
    from carried
    window series as (
        partition by pair_name
        order by bar_start
        rows between unbounded preceding and current row
    )
)

select
    pair_name::text as pair_name,
    bar_start::timestamp as bar_start,
    open::numeric as open,
    high::numeric as high,
    low::numeric as low,
    close::numeric as close,
    tick_count::bigint as tick_count,
    bar_no::bigint as bar_no,
    ema_8::numeric(38, 10) as ema_8,
    ema_21::numeric(38, 10) as ema_21,
    atr_8::numeric(38, 10) as atr_8,
    atr_21::numeric(38, 10) as atr_21,
    last_landed_at::timestamptz as last_landed_at
from indicators
{% endmacro %}
