-- nginx limit_conn with leases. Mirrors corral/limits/conn.py.
--
-- KEYS[i]  sorted set for zone i under this request's key: member = holder id,
--          score = lease expiry (ms). A lease expiring at or before now has lapsed,
--          so a replica that dies holding slots gives them back by itself.
-- ARGV[1]  now in ms, or "" for the server's TIME (see prelude.lua)
-- ARGV[2]  "acquire" | "refresh" | "release"
-- ARGV[3]  holder id
-- ARGV[4]  lease length in ms
-- ARGV[4+i]  limit of zone i (acquire only)
--
-- acquire returns {busy, count_1, ..., count_n}: busy is the 1-based index of the
-- first zone at its limit (0 when none; then counts include this request).
-- refresh returns {1} when the lease was still held in every zone, else {0}.
-- release returns {}.

local mode, holder, lease = ARGV[2], ARGV[3], tonumber(ARGV[4])
local n = #KEYS

local function purge(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now))
end

-- The key lives as long as its longest lease (plus slack), whatever lease length
-- other replicas are configured with.
local function extend(key)
  local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if top[2] then
    redis.call('PEXPIRE', key, int(math.max(tonumber(top[2]) - now, 0) + 1000))
  end
end

if mode == 'acquire' then
  local counts, busy = {}, 0
  for i = 1, n do
    purge(KEYS[i])
    counts[i] = redis.call('ZCARD', KEYS[i])
    if busy == 0 and counts[i] >= tonumber(ARGV[4 + i]) then busy = i end
  end
  -- nginx undoes earlier zones' increments on a refusal: not incrementing is the same
  if busy == 0 then
    for i = 1, n do
      redis.call('ZADD', KEYS[i], int(now + lease), holder)
      extend(KEYS[i])
      counts[i] = counts[i] + 1
    end
  end
  local result = {busy}
  for i = 1, n do result[i + 1] = counts[i] end
  return result
elseif mode == 'refresh' then
  local held = 1
  for i = 1, n do
    purge(KEYS[i])
    if redis.call('ZSCORE', KEYS[i], holder) then
      redis.call('ZADD', KEYS[i], int(now + lease), holder)
      extend(KEYS[i])
    else
      -- lapsed: the slot may be someone else's by now, so it is not taken back
      held = 0
    end
  end
  return {held}
elseif mode == 'release' then
  for i = 1, n do
    -- an empty sorted set is deleted by Redis itself
    redis.call('ZREM', KEYS[i], holder)
  end
  return {}
end
return redis.error_reply('limit_conn.lua: unknown mode ' .. tostring(mode))
