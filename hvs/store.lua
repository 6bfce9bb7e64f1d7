-- One flat ARGV list, no JSON (decoding JSON in Lua cost as much as the increments):
--   pause key, ttl,
--   nfiles, then per bitmap: key, nruns, first, last, ... (runs of consecutive offsets),
--   nsets, then per member: set key, member,
--   nhashes, then per hash: key, nnew, nincr, then nnew + nincr times field, n.
-- A run is checked with one BITCOUNT and set with SETRANGE (whole bytes) and SETBIT (its ends);
-- single offsets are checked and set with one BITFIELD per bitmap. A hash's first `nnew` fields
-- are a usage group's event count and the fields always written with it: if HINCRBY of the count
-- created it, the others do not exist either and one HSET writes them (a new group: one call
-- instead of up to five). The other `nincr` fields are HINCRBY'd. Returns, for the bits that
-- were set already, `bitmap number, offset` pairs (1-based bitmap number, in ARGV order); if
-- there is any, nothing was changed. Keys travel in ARGV (one Redis instance, not Redis Cluster).
-- While the pause key exists (a rebuild from the raw tables is writing, hvs/rebuild.py), nothing
-- is changed and the status PAUSED is returned: the consumer waits and applies the batch after.
-- A key of another type than the script writes (written there by hand) must not stop the script
-- half-way. The few bitmaps and sets are checked with TYPE before anything is written. The usage
-- hashes (one per subscriber-day, so about one per event) are checked by their writes: every
-- HINCRBY runs under pcall, the hashes are written before the bitmaps and sets, and each hash is
-- touched once, whole (a TYPE per hash, or a first pass over them all, cost a tenth to a fifth
-- of the script). If a write fails, what the hashes were given until then is taken back (a field
-- they created is deleted, else decremented, newest first), the rest of the batch is only read to
-- find any other wrong key, and {'WRONGTYPE', key, found, wanted, ...} is returned: nothing was
-- changed, and the caller moves those keys aside.
local wrong, reported = {}, {}
local function report(key, found, wanted)
  if not reported[key] then
    reported[key] = true
    wrong[#wrong + 1] = key; wrong[#wrong + 1] = found; wrong[#wrong + 1] = wanted
  end
end
local function want(key, wanted)
  local found = redis.call('TYPE', key)['ok']
  if found ~= wanted and found ~= 'none' then report(key, found, wanted) end
  return found
end
if want(ARGV[1], 'hash') == 'hash' then return redis.status_reply('PAUSED') end
local ttl = ARGV[2]
local nfiles = tonumber(ARGV[3])
local dups, files = {}, {}
local i = 4
local function getbits(key, f, offs)
  local n = #offs
  for s = 1, n, 1000 do
    local args = {}
    for j = s, math.min(s + 999, n) do
      args[#args + 1] = 'GET'; args[#args + 1] = 'u1'; args[#args + 1] = offs[j]
    end
    local got = redis.call('BITFIELD', key, unpack(args))
    for k = 1, #got do
      if got[k] == 1 then dups[#dups + 1] = f; dups[#dups + 1] = offs[s + k - 1] end
    end
  end
end
for f = 1, nfiles do
  local key, nruns = ARGV[i], tonumber(ARGV[i + 1])
  want(key, 'string')
  local readable = not reported[key]  -- BITCOUNT and BITFIELD fail on another type
  local singles, runs = {}, {}
  i = i + 2
  for _ = 1, nruns do
    local a, b = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
    i = i + 2
    if a == b then
      singles[#singles + 1] = a
    else
      runs[#runs + 1] = a; runs[#runs + 1] = b
      if readable and redis.call('BITCOUNT', key, a, b, 'BIT') > 0 then
        local offs = {}
        for o = a, b do offs[#offs + 1] = o end
        getbits(key, f, offs)
      end
    end
  end
  if readable then getbits(key, f, singles) end
  files[f] = {key, singles, runs}
end
local nsets = tonumber(ARGV[i])
local sets_at = i + 1
i = sets_at + 2 * nsets
for j = sets_at, i - 1, 2 do
  if not reported[ARGV[j]] then want(ARGV[j], 'set') end
end
if #wrong > 0 then table.insert(wrong, 1, 'WRONGTYPE'); return wrong end
if #dups > 0 then return dups end
-- the hashes, each whole before the next; `firsts[h]`: the reply of its first HINCRBY
local nhashes = tonumber(ARGV[i])
local hashes_at = i + 1
local firsts = {}
local failed_h, failed_at, failed_key  -- the hash whose write failed, the ARGV index of its field
i = hashes_at
for h = 1, nhashes do
  local key, nnew, nincr = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  i = i + 3
  if nnew + nincr > 0 then
    local first = redis.pcall('HINCRBY', key, ARGV[i], ARGV[i + 1])
    if type(first) == 'table' then failed_h, failed_at, failed_key = h, i, key; break end
    firsts[h] = first
    if nnew > 1 and first == tonumber(ARGV[i + 1]) then
      redis.call('HSET', key, unpack(ARGV, i + 2, i + 2 * nnew - 1))
      i = i + 2 * nnew
    else
      i = i + 2
      nincr = nincr + nnew - 1
    end
    for _ = 1, nincr do
      if type(redis.pcall('HINCRBY', key, ARGV[i], ARGV[i + 1])) == 'table' then
        failed_h, failed_at, failed_key = h, i, key
        break
      end
      i = i + 2
    end
    if failed_h then break end
    redis.call('EXPIRE', key, ttl)
  end
end
if failed_h then
  local function not_integer(key, field)
    local found = redis.call('TYPE', key)['ok']
    if found == 'none' then return false end
    if found ~= 'hash' then report(key, found, 'hash'); return true end
    local v = redis.call('HGET', key, field)
    if v and not string.match(v, '^-?%d+$') then
      report(key, 'hash with a field that is not an integer', 'hash of integers')
      return true
    end
  end
  -- what was written before `failed_at`: {key index, field index, created by HSET}, in order
  local undo = {}
  local j, failed_j = hashes_at, nil
  for h = 1, failed_h do
    failed_j = j
    local nnew, nincr = tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
    local hset = nnew > 1 and firsts[h] == tonumber(ARGV[j + 4])
    for f = 1, nnew + nincr do
      local k = j + 1 + 2 * f
      if k >= failed_at then break end
      undo[#undo + 1] = {j, k, hset and f > 1 and f <= nnew}
    end
    j = j + 3 + 2 * (nnew + nincr)
  end
  for u = #undo, 1, -1 do
    local key, field, n = ARGV[undo[u][1]], ARGV[undo[u][2]], ARGV[undo[u][2] + 1]
    if undo[u][3] or tonumber(redis.call('HGET', key, field)) == tonumber(n) then
      redis.call('HDEL', key, field)
    else
      redis.call('HINCRBY', key, field, -tonumber(n))
    end
  end
  -- the failed write, then the rest of the batch, read only
  if not not_integer(failed_key, ARGV[failed_at]) then  -- e.g. the sum would overflow
    report(failed_key, 'hash with a field HINCRBY refused', 'hash of integers')
  end
  local k = failed_at + 2
  j = failed_j
  for h = failed_h, nhashes do
    local key, nfields = ARGV[j], tonumber(ARGV[j + 1]) + tonumber(ARGV[j + 2])
    if h > failed_h then k = j + 3 end
    while k < j + 3 + 2 * nfields do
      if reported[key] or not_integer(key, ARGV[k]) then break end
      k = k + 2
    end
    j = j + 3 + 2 * nfields
  end
  table.insert(wrong, 1, 'WRONGTYPE')
  return wrong
end
for _, file in ipairs(files) do
  local key, singles, runs = file[1], file[2], file[3]
  local n = #singles
  for s = 1, n, 1000 do
    local args = {}
    for j = s, math.min(s + 999, n) do
      args[#args + 1] = 'SET'; args[#args + 1] = 'u1'; args[#args + 1] = singles[j]
      args[#args + 1] = 1
    end
    redis.call('BITFIELD', key, unpack(args))
  end
  for r = 1, #runs, 2 do
    local a, b = runs[r], runs[r + 1]
    local first, last = math.floor((a + 7) / 8), math.floor((b + 1) / 8) - 1
    if first > last then
      for o = a, b do redis.call('SETBIT', key, o, 1) end
    else
      for o = a, first * 8 - 1 do redis.call('SETBIT', key, o, 1) end
      redis.call('SETRANGE', key, first, string.rep('\255', last - first + 1))
      for o = (last + 1) * 8, b do redis.call('SETBIT', key, o, 1) end
    end
  end
  redis.call('EXPIRE', key, ttl)
end
for j = sets_at, sets_at + 2 * nsets - 1, 2 do
  redis.call('SADD', ARGV[j], ARGV[j + 1])
  redis.call('EXPIRE', ARGV[j], ttl)
end
return dups
