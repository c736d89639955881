-- Shared by every limiter script: prepended to each when it is loaded (redis.py).
--
-- ARGV[1] of every script is now in ms, or "" to read the server's TIME (one clock
-- for all replicas).

-- Before Redis 5 a script that reads TIME and then writes must replicate effects.
if redis.replicate_commands then redis.replicate_commands() end

-- Lua numbers are doubles: divide through the exact remainder so that integer
-- division stays exact (a plain a / b can round up across an integer).
local function floordiv(a, b)
  local r = math.fmod(a, b)
  if r < 0 then r = r + b end
  return (a - r) / b
end

local function ceildiv(a, b)
  return -floordiv(-a, b)
end

-- Numbers go to Redis as integer text: tostring() keeps only 14 digits.
local function int(x)
  return string.format('%.0f', x)
end

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + floordiv(tonumber(t[2]), 1000)
end
