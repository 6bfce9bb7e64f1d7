-- One flat ARGV list, no JSON (decoding JSON in Lua cost as much as the increments):
--   pause key, ttl,
--   nfiles, then per bitmap: key, nruns, first, last, ... (runs of consecutive offsets),
--   nhashes, then per hash: key, nfields, then nfields times field, n,
--   nsets, then per member: set key, member.
-- A run is checked with one BITCOUNT and set with SETRANGE (whole bytes) and SETBIT (its ends);
-- single offsets are checked and set with one BITFIELD per bitmap. A hash's fields are added to
-- with one HMGET and one HSET (two calls, however many fields): a sum is written only where both
-- numbers are plain integers of at most 15 digits, which Lua's doubles add exactly; any other
-- field is left to HINCRBY, whose errors and limits stay Redis's own. Returns, for the bits that
-- were set already, `bitmap number, offset` pairs (1-based bitmap number, in ARGV order); if
-- there is any, nothing was changed. Keys travel in ARGV (one Redis instance, not Redis Cluster).
-- While the pause key exists (a rebuild from the raw tables is writing, hvs/rebuild.py), nothing
-- is changed and the status PAUSED is returned: the consumer waits and applies the batch after.
if redis.call('HLEN', ARGV[1]) > 0 then return redis.status_reply('PAUSED') end
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
local function plain(v)  -- an integer Redis and Lua read alike, small enough to add exactly
  return #v <= 15 and (v == '0' or string.find(v, '^%-?[1-9]%d*$') ~= nil)
end
for _ = 1, nhashes do
  local key, nfields = ARGV[i], tonumber(ARGV[i + 1])
  for s = 1, nfields, 1000 do  -- unpack() takes a few thousand values at most
    local names, set = {}, {}
    local e = math.min(s + 999, nfields)
    for j = s, e do names[#names + 1] = ARGV[i + 2 * j] end
    local old = redis.call('HMGET', key, unpack(names))
    for j = s, e do
      local name, add, cur = ARGV[i + 2 * j], ARGV[i + 2 * j + 1], old[j - s + 1]
      if not cur then
        set[#set + 1] = name; set[#set + 1] = add
      elseif plain(cur) and plain(add) then
        set[#set + 1] = name
        set[#set + 1] = string.format('%.0f', tonumber(cur) + tonumber(add))
      else
        redis.call('HINCRBY', key, name, add)
      end
    end
    if #set > 0 then redis.call('HSET', key, unpack(set)) end
  end
  i = i + 2 + 2 * nfields
  redis.call('EXPIRE', key, ttl)
end
local nsets = tonumber(ARGV[i])
i = i + 1
for _ = 1, nsets do
  redis.call('SADD', ARGV[i], ARGV[i + 1])
  redis.call('EXPIRE', ARGV[i], ttl)
  i = i + 2
end
return dups
