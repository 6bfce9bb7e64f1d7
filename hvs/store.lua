-- One flat ARGV list, no JSON (decoding JSON in Lua cost as much as the increments):
--   pause key, ttl,
--   nfiles, then per bitmap: key, nruns, first, last, ... (runs of consecutive offsets),
--   nhashes, then per hash: key, nnew, nincr, then nnew + nincr times field, n,
--   nsets, then per member: set key, member.
-- A run is checked with one BITCOUNT and set with SETRANGE (whole bytes) and SETBIT (its ends);
-- single offsets are checked and set with one BITFIELD per bitmap. A hash's first `nnew` fields
-- are a usage group's event count and the fields always written with it: if HINCRBY of the count
-- created it, the others do not exist either and one HSET writes them (a new group: one call
-- instead of up to five). The other `nincr` fields are HINCRBY'd. Returns, for the bits that
-- were set already, `bitmap number, offset` pairs (1-based bitmap number, in ARGV order); if
-- there is any, nothing was changed. Keys travel in ARGV (one Redis instance, not Redis Cluster).
-- While the pause key exists (a rebuild from the raw tables is writing, hvs/rebuild.py), nothing
-- is changed and the status PAUSED is returned: the consumer waits and applies the batch after.
-- A key of another type than the script writes (written there by hand) would stop the script
-- half-way. The few bitmaps and sets are checked with TYPE first; a usage hash (one per
-- subscriber-day, so about one per event) is checked by its first write: the first HINCRBY of
-- every hash runs under pcall before anything else is written, and if any fails, those that
-- succeeded are undone (a field they created is deleted, else decremented) and nothing is
-- changed. {'WRONGTYPE', key, found, wanted, ...} is then returned (the caller moves those keys
-- aside). A TYPE per hash cost a tenth of the whole script.
local wrong = {}
local function want(key, wanted)
  local found = redis.call('TYPE', key)['ok']
  if found ~= wanted and found ~= 'none' then
    wrong[#wrong + 1] = key; wrong[#wrong + 1] = found; wrong[#wrong + 1] = wanted
  end
  return found
end
if want(ARGV[1], 'hash') == 'hash' then return redis.status_reply('PAUSED') end
local ttl = ARGV[2]
local nfiles = tonumber(ARGV[3])
local dups, files = {}, {}
local i = 4
local hashes_at  -- where the hashes start in ARGV
do  -- the bitmaps' and sets' types: walks ARGV as the script does below, changes nothing
  local j = 4
  for _ = 1, nfiles do
    want(ARGV[j], 'string')
    j = j + 2 + 2 * tonumber(ARGV[j + 1])
  end
  hashes_at = j
  local n = tonumber(ARGV[j])
  j = j + 1
  for _ = 1, n do
    j = j + 3 + 2 * (tonumber(ARGV[j + 1]) + tonumber(ARGV[j + 2]))
  end
  local checked = {}
  n = tonumber(ARGV[j])
  j = j + 1
  for _ = 1, n do
    if not checked[ARGV[j]] then checked[ARGV[j]] = true; want(ARGV[j], 'set') end
    j = j + 2
  end
end
if #wrong > 0 then table.insert(wrong, 1, 'WRONGTYPE'); return wrong end
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
  local singles, runs = {}, {}
  i = i + 2
  for _ = 1, nruns do
    local a, b = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
    i = i + 2
    if a == b then
      singles[#singles + 1] = a
    else
      runs[#runs + 1] = a; runs[#runs + 1] = b
      if redis.call('BITCOUNT', key, a, b, 'BIT') > 0 then
        local offs = {}
        for o = a, b do offs[#offs + 1] = o end
        getbits(key, f, offs)
      end
    end
  end
  getbits(key, f, singles)
  files[f] = {key, singles, runs}
end
if #dups > 0 then return dups end
-- the first HINCRBY of every hash, under pcall; `firsts[h]` is its reply
local firsts = {}
do
  local j = hashes_at + 1
  local failed = false
  for h = 1, tonumber(ARGV[hashes_at]) do
    local key, nnew, nincr = ARGV[j], tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
    if nnew + nincr > 0 then
      local got = redis.pcall('HINCRBY', key, ARGV[j + 3], ARGV[j + 4])
      if type(got) == 'table' then  -- an error reply: nothing was written
        failed, got = true, false
        local found, wanted = redis.call('TYPE', key)['ok'], 'hash'
        if found == 'hash' then  -- the field holds something else than an integer
          found, wanted = 'hash with a field that is not an integer', 'hash of integers'
        end
        wrong[#wrong + 1] = key; wrong[#wrong + 1] = found; wrong[#wrong + 1] = wanted
      end
      firsts[h] = got
    end
    j = j + 3 + 2 * (nnew + nincr)
  end
  if failed then
    j = hashes_at + 1
    local undo = {}
    for h = 1, tonumber(ARGV[hashes_at]) do
      if firsts[h] then undo[#undo + 1] = j end
      j = j + 3 + 2 * (tonumber(ARGV[j + 1]) + tonumber(ARGV[j + 2]))
    end
    for u = #undo, 1, -1 do  -- newest first: a field written twice is decremented, then deleted
      local k = undo[u]
      local key, field, n = ARGV[k], ARGV[k + 3], ARGV[k + 4]
      if tonumber(redis.call('HGET', key, field)) == tonumber(n) then
        redis.call('HDEL', key, field)
      else
        redis.call('HINCRBY', key, field, -tonumber(n))
      end
    end
    table.insert(wrong, 1, 'WRONGTYPE')
    return wrong
  end
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
local nhashes = tonumber(ARGV[i])
i = i + 1
for h = 1, nhashes do
  local key, nnew, nincr = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  i = i + 3
  if nnew > 0 then  -- the first field was written above
    if firsts[h] == tonumber(ARGV[i + 1]) and nnew > 1 then
      redis.call('HSET', key, unpack(ARGV, i + 2, i + 2 * nnew - 1))
    else
      for j = i + 2, i + 2 * nnew - 1, 2 do
        redis.call('HINCRBY', key, ARGV[j], ARGV[j + 1])
      end
    end
    i = i + 2 * nnew
  elseif nincr > 0 then
    i = i + 2
    nincr = nincr - 1
  end
  for _ = 1, nincr do
    redis.call('HINCRBY', key, ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  if firsts[h] then redis.call('EXPIRE', key, ttl) end
end
local nsets = tonumber(ARGV[i])
i = i + 1
for _ = 1, nsets do
  redis.call('SADD', ARGV[i], ARGV[i + 1])
  redis.call('EXPIRE', ARGV[i], ttl)
  i = i + 2
end
return dups
