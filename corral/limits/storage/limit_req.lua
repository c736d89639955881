-- nginx limit_req for one request over all of its zones, judged and committed
-- atomically. Mirrors corral/limits/leaky.py: evaluate(), retry_after_ms() and
-- expires_at_ms(); keep the two in step (a property test compares them).
--
-- KEYS[i]  hash for zone i under this request's key: e = excess, l = last (ms)
-- ARGV[1]  now in ms, or "" for the server's TIME (see prelude.lua)
-- ARGV[3i-1], ARGV[3i], ARGV[3i+1]  rate, burst, delay of zone i (milli-requests)
--
-- Returns {busy, delay_ms, retry_after_ms, now, then per zone: excess, last}
-- (the node committed for zone i is {excess, last} unless a zone was busy).
-- busy is the 1-based index of the first zone over its burst, 0 when none is.

local n = #KEYS
local busy, max_delay, retry = 0, 0, 0
local out_e, out_l, params = {}, {}, {}

for i = 1, n do
  local rate = tonumber(ARGV[3 * i - 1])
  local burst = tonumber(ARGV[3 * i])
  local delay = tonumber(ARGV[3 * i + 1])
  params[i] = rate
  local state = redis.call('HMGET', KEYS[i], 'e', 'l')
  local e, l = tonumber(state[1]), tonumber(state[2])
  local x, last
  if e == nil or l == nil then
    -- a new key starts at excess 0 with last = now
    x, last = 0, now
  else
    local raw = now - l
    local ms = raw
    if ms < -60000 then ms = 1 elseif ms < 0 then ms = 0 end
    x = e - floordiv(rate * ms, 1000) + 1000
    if x < 0 then x = 0 end
    if ms ~= 0 then last = now else last = l end
    -- retry: the wait until this zone would accept the request
    if not (x <= burst and raw >= -60000) then
      local need = e + 1000 - burst
      local ms_needed = 0
      if need > 0 then ms_needed = ceildiv(need * 1000, rate) end
      local wait = l + ms_needed - now
      if wait > retry then retry = wait end
    end
  end
  out_e[i], out_l[i] = x, last
  if busy == 0 and x > burst then busy = i end
  if x > delay then
    local d = floordiv((x - delay) * 1000, rate)
    if d > max_delay then max_delay = d end
  end
end

local result = {busy, max_delay, 0, now}
if busy ~= 0 then
  result[3] = retry
else
  -- a rejected request charges no zone; an accepted one charges them all
  for i = 1, n do
    redis.call('HSET', KEYS[i], 'e', int(out_e[i]), 'l', int(out_l[i]))
    -- once fully decayed the node is indistinguishable from a missing one;
    -- one second of slack covers the rounding of key expiry
    local ttl = out_l[i] + ceildiv((out_e[i] + 1000) * 1000, params[i]) - now + 1000
    redis.call('PEXPIRE', KEYS[i], int(ttl))
  end
end
for i = 1, n do
  result[#result + 1] = out_e[i]
  result[#result + 1] = out_l[i]
end
return result
