{#- High-water marks of the incremental models on the raw landing times (`loaded_at` of the CDR
    loader, `landed_at` of the tick sink and the CRM change log; every one is the column default
    now(), the start of the landing transaction). See docs/business-rules.md, "Incremental runs".

    A model's mark has two parts:
    - L, the latest landing time it has processed: the greatest bookkeeping column of its target
      (e.g. max_loaded_at), read by `loaded_after`;
    - H, its landing horizon: measured by the pre-hook of its last successful build, before that
      build read anything, as the start of the oldest transaction then open in this database
      (the only ones that could still commit rows stamped earlier), never earlier than now()
      minus the longer of the vars landing_lookback and crm_lookback (the bound on how long a
      landing transaction stays open); stored by the post-hook in the same transaction as the
      model's rows, in the table `dbt_landing_horizons` of the target schema.
    Every row stamped before H was visible to that build, and every row stamped at or before L
    was visible to it or comes from a transaction that was open at H. So the rows still to read
    are those stamped after least(L, H - 1 microsecond): right after a bulk load (the load
    committed before the build began) that is after L, nothing; a late landing (its transaction
    was open during the build) is re-read from H on. -#}


{#- on-run-start: the table of the horizons (one row per model). -#}
{% macro create_landing_horizons() %}
    {#- a plain `create schema if not exists` needs the right to create in the database even when
        the schema is there, which dbt's own role (it owns its schemas) does not have -#}
    do $$
    begin
        if not exists (select from pg_namespace where nspname = '{{ target.schema }}') then
            execute 'create schema {{ target.schema }}';
        end if;
    end
    $$;
    create table if not exists {{ target.schema }}.dbt_landing_horizons (
        model text primary key,
        horizon timestamptz not null,
        invocation_id text not null,
        recorded_at timestamptz not null default now()
    );
    alter table {{ target.schema }}.dbt_landing_horizons
        add column if not exists changed_after timestamptz;
{% endmacro %}


{#- pre-hook of the incremental models: measure this build's horizon H (a statement of its own,
    so it is taken before the model's statement takes its snapshot) into a transaction-local
    setting. pg_stat_activity shows other roles' transactions to a superuser or a member of
    pg_read_all_stats; a session whose state it hides counts as open since the lookback bound. -#}
{% macro landing_horizon_measure() %}
    {%- if model.config.materialized == 'incremental' -%}
        select pg_stat_clear_snapshot();
        select set_config('wtc.landing_horizon', (
            select greatest(
                least(
                    clock_timestamp(),
                    min(coalesce(
                        activity.xact_start,
                        case when activity.state is null then '-infinity'::timestamptz end
                    ))
                ),
                clock_timestamp() - greatest(
                    interval '{{ var("landing_lookback") }}', interval '{{ var("crm_lookback") }}'
                )
            )::text
            from pg_stat_activity as activity
            where
                activity.datname = current_database()
                and activity.pid <> pg_backend_pid()
                and activity.backend_type = 'client backend'
        ), true);
        select set_config('wtc.whole_build', '{{ "off" if is_incremental() else "on" }}', true);
        {{ changed_rows_measure() }}
    {%- endif -%}
{% endmacro %}


{#- post-hook of the incremental models: store the horizon measured by the pre-hook, committed
    with the model's rows (a failed build stores nothing and keeps the previous one). -#}
{% macro landing_horizon_store() %}
    {%- if model.config.materialized == 'incremental' -%}
        insert into {{ target.schema }}.dbt_landing_horizons (
            model, horizon, invocation_id, changed_after
        )
        values (
            '{{ this.schema }}.{{ this.identifier }}',
            current_setting('wtc.landing_horizon')::timestamptz,
            '{{ invocation_id }}',
            nullif(current_setting('wtc.changed_after', true), '')::timestamptz
        )
        on conflict (model) do update
        set
            horizon = excluded.horizon,
            invocation_id = excluded.invocation_id,
            recorded_at = excluded.recorded_at,
            changed_after = excluded.changed_after;
        {#- after a first build or a full refresh the table has no statistics until autovacuum
            comes by (a minute or more): a plan made meanwhile (the next build's, its data tests')
            takes a third of the rows for any range and scans the whole table -#}
        do $$
        begin
            if current_setting('wtc.whole_build', true) = 'on' then
                analyze {{ this }};
            end if;
        end
        $$
    {%- endif -%}
{% endmacro %}


{#- The horizon H of the model being built (SQL expression; null when none is stored: a target
    built before horizons were kept). In a unit test, the var `landing_horizon` (null if unset). -#}
{% macro landing_horizon() -%}
    {%- if model.resource_type == 'unit_test' -%}
        {%- set horizon = var('landing_horizon', none) -%}
        {{ ("'" ~ horizon ~ "'::timestamptz") if horizon else 'null::timestamptz' }}
    {%- else -%}
        (
            select marks.horizon
            from {{ target.schema }}.dbt_landing_horizons as marks
            where marks.model = '{{ this.schema }}.{{ this.identifier }}'
        )
    {%- endif -%}
{%- endmacro %}
