-- Who holds a phone number when (docs/business-rules.md, section 7): the timeline of each
-- number cut at every start and end of an account version holding it; in each segment
-- [held_from, held_to) the holder is the valid version with the latest valid_from, ties to the
-- smallest account_id. A CDR event belongs to the holder of its msisdn at its event time.
with

account_versions as (
    select * from {{ ref('int_crm__account_versions') }}
),

versions as (
    select
        account_id,
        phone_number,
        version_lsn,
        valid_from,
        valid_to
    from account_versions
    where
        phone_number is not null
        and (valid_to is null or valid_to > valid_from)
),

bounds as (
    select
        phone_number,
        valid_from as bound
    from versions
    union
    select
        phone_number,
        valid_to as bound
    from versions
    where valid_to is not null
),

segments as (
    select
        phone_number,
        bound as held_from,
        lead(bound) over (partition by phone_number order by bound) as held_to
    from bounds
),

holders as (
    select distinct on (segments.phone_number, segments.held_from)
        segments.phone_number,
        segments.held_from,
        segments.held_to,
        versions.account_id,
        versions.version_lsn
    from segments
    inner join versions
        on
            segments.phone_number = versions.phone_number
            and segments.held_from >= versions.valid_from
            and (versions.valid_to is null or segments.held_from < versions.valid_to)
    order by
        segments.phone_number asc,
        segments.held_from asc,
        versions.valid_from desc,
        versions.account_id asc,
        versions.version_lsn desc
)

select
    phone_number::text as msisdn,
    held_from,
    held_to,
    account_id,
    version_lsn
from holders
