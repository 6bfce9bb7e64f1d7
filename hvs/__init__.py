"""The HVS consumer: CDR events and forex ticks from the stream into daily usage in Redis.

    python -m hvs              # follow the stream until SIGTERM / Ctrl-C
    python -m hvs --drain      # apply what is on the stream, then exit
    python -m hvs rebuild --from 2024-01-01 --to 2024-01-02   # days rebuilt from the raw tables

Per msisdn, day, category and usage type it keeps events, bytes (up, down, total), call seconds
and the cost in ZAR and WAK (hvs/keys.py has the layout, docs/usage-api.md the rules).

Exactly-once effect: every event has an id (CDR: `source_file:line_no`, a bit in a per-file
bitmap; tick: pair, hour and 100 ms slot). One Lua script checks the batch's bits, and only if none
is set yet sets them all and applies all the batch's increments, atomically; if some are set
(a redelivery or a republish), it changes nothing and returns them, and the batch is rebuilt
without them. The stream is committed only after Redis answered, so a crash anywhere re-delivers
at most what then turns out to be already applied.

Modules: `keys` (the key layout, shared with the API), `settings`, `decode` (the one decoder of
each message kind), `pricing` (costs in ZAR and WAK, the as-of rates), `store` (applying batches
to Redis; its Lua script is `store.lua`), `metrics`, `runner` (the poll/apply/commit loop),
`rebuild` (days rebuilt from the raw tables) and `__main__` (the command line).
"""
