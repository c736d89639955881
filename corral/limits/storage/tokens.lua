-- Token budgets as token buckets. Mirrors corral/limits/tokens.py: check(),
-- charge() and expires_at_ms(); keep the two in step (a property test compares them).
--
-- KEYS[i]  hash for budget i under this request's key: v = level (1/60000 token),
--          l = last tick (ms)
-- ARGV[1]  now in ms, or "" for the server's TIME (see prelude.lua)
-- ARGV[2]  "check" | "charge"
-- ARGV[3]  tokens to charge (charge only)
-- ARGV[2i+2], ARGV[2i+3]  budget tokens per window and tick length (ms) of budget i
--
-- check returns {busy, retry_after_ms, remaining_1, ..., remaining_n}: busy is the
-- 1-based index of the first empty or indebted budget, 0 when none is.
-- charge returns {}.

local UNITS_PER_TOKEN = 60000

local mode, charged = ARGV[2], tonumber(ARGV[3])
local n = #KEYS

-- Returns level, last as of now; a missing bucket is a full one.
local function refill(key, budget, tick)
  local capacity = budget * UNITS_PER_TOKEN
  local state = redis.call('HMGET', key, 'v', 'l')
  local level, last = tonumber(state[1]), tonumber(state[2])
  if level == nil or last == nil then return capacity, now end
  local elapsed = now - last
  if elapsed < 0 then return level, last end  -- clock went back: nothing earned yet
  local ticks = floordiv(elapsed, tick)
  level = level + ticks * budget
  -- a full bucket forgets its tick phase, so it is identical to a missing one
  if level >= capacity then return capacity, now end
  return level, last + ticks * tick
end

if mode == 'check' then
  local busy, retry, remaining = 0, 0, {}
  for i = 1, n do
    local budget, tick = tonumber(ARGV[2 * i + 2]), tonumber(ARGV[2 * i + 3])
    local level, last = refill(KEYS[i], budget, tick)
    remaining[i] = floordiv(level, UNITS_PER_TOKEN)
    if level <= 0 then
      if busy == 0 then busy = i end
      local wait = last + ceildiv(1 - level, budget) * tick - now
      if wait > retry then retry = wait end
    end
  end
  local result = {busy, retry}
  for i = 1, n do result[i + 2] = remaining[i] end
  return result
elseif mode == 'charge' then
  for i = 1, n do
    local budget, tick = tonumber(ARGV[2 * i + 2]), tonumber(ARGV[2 * i + 3])
    local level, last = refill(KEYS[i], budget, tick)
    level = level - charged * UNITS_PER_TOKEN
    redis.call('HSET', KEYS[i], 'v', int(level), 'l', int(last))
    -- once full again the bucket is indistinguishable from a missing one
    local full_at = last + ceildiv(budget * UNITS_PER_TOKEN - level, budget) * tick
    redis.call('PEXPIRE', KEYS[i], int(math.max(full_at - now, 0) + 1000))
  end
  return {}
end
return redis.error_reply('tokens.lua: unknown mode ' .. tostring(mode))
