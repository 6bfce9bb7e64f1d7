{#
    Hourly exchange rates (docs/business-rules.md, section 6): per hour the average mid price of
    each pair and zar_per_wak = mrvzar_mid x wakmrv_mid, on a contiguous hour grid; an hour
    without ticks of a pair carries that pair's last mid forward and is flagged.

    Incremental: the first hour touched by ticks landed since the model's watermark
    (`loaded_after`, which keeps the landing lookback) and every later hour are rebuilt,
    carrying the mids of the stored hour before it; delete+insert on hour_start replaces them.
#}

with

-- not materialized: read twice, planned through to the indexes of the table behind
ticks as not materialized (
    select * from {{ ref('stg_forex__ticks') }}
),

{% if is_incremental() %}
    changed as (
        select min({{ time_bucket('ticks.tick_ts', 'h1') }}) as changed_from
        from ticks
        where ticks.landed_at > {{ loaded_after('last_landed_at') }}
    ),

    carried as (
        select
            built.hour_start,
            built.mrvzar_mid,
            built.wakmrv_mid
        from {{ this }} as built
        where built.hour_start < (select changed.changed_from from changed)
        order by built.hour_start desc
        limit 1
    ),
{% endif %}

hourly as (
    select
        {{ time_bucket('ticks.tick_ts', 'h1') }} as hour_start,
        ticks.pair_name,
        {{ div10('sum(ticks.bid_price + ticks.ask_price)', '2 * count(*)') }} as mid,
        count(*) as ticks,
        max(ticks.landed_at) as last_landed_at
    from ticks
    {% if is_incremental() %}
        where ticks.tick_ts >= coalesce(
            (select carried.hour_start from carried) + interval '1 hour',
            '-infinity'::timestamp
        )
        and (select changed.changed_from from changed) is not null
    {% endif %}
    group by {{ time_bucket('ticks.tick_ts', 'h1') }}, ticks.pair_name
),

pairs as (
    select
        hour_start,
        max(mid) filter (where pair_name = 'MRVZAR') as mrvzar_mid,
        max(mid) filter (where pair_name = 'WAKMRV') as wakmrv_mid,
        coalesce(sum(ticks) filter (where pair_name = 'MRVZAR'), 0) as mrvzar_ticks,
        coalesce(sum(ticks) filter (where pair_name = 'WAKMRV'), 0) as wakmrv_ticks,
        max(last_landed_at) as last_landed_at
    from hourly
    group by hour_start
),

grid as (
    select generate_series(
        {% if is_incremental() %}
            coalesce(
                (select carried.hour_start from carried) + interval '1 hour',
                (select min(pairs.hour_start) as first_hour from pairs)
            ),
        {% else %}
            (select min(pairs.hour_start) as first_hour from pairs),
        {% endif %}
        (select max(pairs.hour_start) as last_hour from pairs),
        interval '1 hour'
    ) as hour_start
),

filled as (
    select
        grid.hour_start,
        pairs.mrvzar_mid,
        pairs.wakmrv_mid,
        pairs.last_landed_at,
        coalesce(pairs.mrvzar_ticks, 0) as mrvzar_ticks,
        coalesce(pairs.wakmrv_ticks, 0) as wakmrv_ticks,
        -- islands: each known mid starts a group that the following unknown hours join
        count(pairs.mrvzar_mid) over (order by grid.hour_start) as mrvzar_group,
        count(pairs.wakmrv_mid) over (order by grid.hour_start) as wakmrv_group
    from grid
    left join pairs on grid.hour_start = pairs.hour_start
),

carried_forward as (
    select
        filled.hour_start,
        filled.mrvzar_ticks,
        filled.wakmrv_ticks,
        coalesce(
            first_value(filled.mrvzar_mid) over (
                partition by filled.mrvzar_group order by filled.hour_start
            ),
            {% if is_incremental() %}(select carried.mrvzar_mid from carried){% else %}null{% endif %}
        ) as mrvzar_mid,
        coalesce(
            first_value(filled.wakmrv_mid) over (
                partition by filled.wakmrv_group order by filled.hour_start
            ),
            {% if is_incremental() %}(select carried.wakmrv_mid from carried){% else %}null{% endif %}
        ) as wakmrv_mid,
        -- the last landing that touched the hour; hours carried forward keep the latest before
        coalesce(
            filled.last_landed_at, max(filled.last_landed_at) over (order by filled.hour_start)
        ) as last_landed_at
    from filled
),

typed as (
    select
        hour_start::timestamp as hour_start,
        mrvzar_mid::numeric(38, 10) as mrvzar_mid,
        wakmrv_mid::numeric(38, 10) as wakmrv_mid,
        mrvzar_ticks::bigint as mrvzar_ticks,
        wakmrv_ticks::bigint as wakmrv_ticks,
        last_landed_at::timestamptz as last_landed_at,
        round(mrvzar_mid * wakmrv_mid, 10)::numeric(38, 10) as zar_per_wak,
        (mrvzar_ticks = 0 or wakmrv_ticks = 0) as is_carried_forward
    from carried_forward
    where mrvzar_mid is not null and wakmrv_mid is not null
)

select * from typed
