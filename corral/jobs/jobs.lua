-- Batch jobs in Redis. Mirrors corral/jobs/memory.py operation for operation.
--
-- Every change of a job's state is one call of this script, so no two replicas can
-- take the same job, and a job is always in exactly one of the ready queue, the
-- retry queue or the running set -- or finished, with a TTL on its hash.
--
-- KEYS[1] ready    zset: score = priority * 1e13 + arrival number (class, then FIFO)
-- KEYS[2] delayed  zset: jobs waiting to be retried, score = not-before (ms)
-- KEYS[3] running  zset: leased jobs, score = lease expiry (ms)
-- KEYS[4] pending  hash: owner -> unfinished jobs
-- KEYS[5] index    zset: every job id, score = creation (ms)
-- KEYS[6] seq      counter of arrivals
-- KEYS[7] callbacks zset: finished jobs' pending callbacks, score = when one may be
--                  claimed (ms): at once, after a backoff, or when the holder's lease ends
-- ARGV[1] now in ms, or "" to read the server's TIME (one clock for all replicas)
-- ARGV[2] operation; ARGV[3] prefix of job hashes ("job:<id>") and owner indexes
-- ("owner:<owner>"); ARGV[4..] the operation's arguments, below.
--
-- Job hashes and owner indexes are named from ARGV, not KEYS: on Redis Cluster the
-- prefix must carry a hash tag, e.g. "{corral}:jobs:", so all keys share a slot.

-- The shared prelude (replication mode, `now`, `int`, `floordiv`) is prepended when
-- the script is loaded: corral/limits/storage/prelude.lua.

local READY, DELAYED, RUNNING, PENDING, INDEX, SEQ, CALLBACKS =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local op, prefix = ARGV[2], ARGV[3]

local function jobkey(id) return prefix .. 'job:' .. id end
local function ownerkey(owner) return prefix .. 'owner:' .. owner end

-- Drop a few of the oldest ids whose job has expired, so an index that is never
-- listed still follows the jobs that are kept.
local function tidy(index)
  local oldest = redis.call('ZRANGE', index, 0, 9)
  for _, id in ipairs(oldest) do
    if redis.call('EXISTS', jobkey(id)) == 0 then redis.call('ZREM', index, id) end
  end
end

local function holder(id, worker)
  local key = jobkey(id)
  local v = redis.call('HMGET', key, 'status', 'worker')
  return v[1] == 'running' and v[2] == worker
end

-- Finished: out of every queue, body and credential dropped, expires after ttl; a
-- callback_url makes the callback deliverable in the same step (delivery.deliverable).
local function finalize(id, status, result, err, http_status, ttl)
  local key = jobkey(id)
  redis.call('ZREM', READY, id)
  redis.call('ZREM', DELAYED, id)
  redis.call('ZREM', RUNNING, id)
  local owner = redis.call('HGET', key, 'owner')
  if redis.call('HINCRBY', PENDING, owner, -1) <= 0 then redis.call('HDEL', PENDING, owner) end
  redis.call('HSET', key, 'status', status, 'finished', int(now), 'result', result,
             'error', err, 'http_status', http_status, 'worker', '', 'not_before', '')
  redis.call('HDEL', key, 'body', 'auth')
  redis.call('PEXPIRE', key, ttl)
  local url = redis.call('HGET', key, 'callback_url')
  if url and url ~= '' then
    redis.call('HSET', key, 'cb_status', 'pending', 'cb_attempts', 0, 'cb_error', '',
               'cb_holder', '', 'cb_due', int(now))
    redis.call('ZADD', CALLBACKS, int(now), id)
  end
end

-- The callback's state (delivery.CallbackState), for the caller.
local CB_FIELDS = {'cb_status', 'cb_attempts', 'cb_error', 'cb_holder', 'cb_due', 'delivery'}
local function callback_state(key)
  return redis.call('HMGET', key, unpack(CB_FIELDS))
end

-- delivery.holds: the holder is making this attempt, and nobody has claimed since.
local function holds_callback(key, holder, attempt)
  local v = redis.call('HMGET', key, 'cb_status', 'cb_holder', 'cb_attempts')
  return v[1] == 'pending' and v[2] == holder and v[3] == attempt
end

if op == 'submit' then
  -- id owner priority endpoint model client_ip callback_url body auth max max_per_client
  -- delivery_id
  local id, owner, priority = ARGV[4], ARGV[5], tonumber(ARGV[6])
  local unfinished = redis.call('ZCARD', READY) + redis.call('ZCARD', DELAYED)
                     + redis.call('ZCARD', RUNNING)
  if unfinished >= tonumber(ARGV[13]) then return {'full', 'queue'} end
  if tonumber(redis.call('HGET', PENDING, owner) or '0') >= tonumber(ARGV[14]) then
    return {'full', 'client'}
  end
  local sort = priority * 1e13 + redis.call('INCR', SEQ)
  local key = jobkey(id)
  redis.call('HSET', key, 'id', id, 'owner', owner, 'priority', ARGV[6],
             'endpoint', ARGV[7], 'model', ARGV[8], 'client_ip', ARGV[9],
             'callback_url', ARGV[10], 'body', ARGV[11], 'auth', ARGV[12],
             'status', 'queued', 'created', int(now), 'attempts', 0, 'failures', 0,
             'sort', int(sort), 'delivery', ARGV[15])
  redis.call('ZADD', READY, int(sort), id)
  redis.call('HINCRBY', PENDING, owner, 1)
  redis.call('ZADD', INDEX, int(now), id)
  redis.call('ZADD', ownerkey(owner), int(now), id)
  tidy(INDEX)
  tidy(ownerkey(owner))
  return {'ok', redis.call('HGETALL', key)}
end

if op == 'claim' then
  -- worker lease_ms
  local worker, lease = ARGV[4], tonumber(ARGV[5])
  -- Retries that are due join the ready queue with their old place.
  local due = redis.call('ZRANGEBYSCORE', DELAYED, '-inf', int(now), 'LIMIT', 0, 100)
  for _, id in ipairs(due) do
    redis.call('ZREM', DELAYED, id)
    local v = redis.call('HMGET', jobkey(id), 'status', 'sort')
    if v[1] == 'queued' then
      redis.call('HSET', jobkey(id), 'not_before', '')
      redis.call('ZADD', READY, v[2], id)
    end
  end
  while true do
    local head = redis.call('ZRANGE', READY, 0, 0)
    if #head == 0 then return {} end
    local id = head[1]
    redis.call('ZREM', READY, id)
    local key = jobkey(id)
    if redis.call('HGET', key, 'status') == 'queued' then
      redis.call('HSET', key, 'status', 'running', 'worker', worker, 'started', int(now),
                 'not_before', '')
      redis.call('HINCRBY', key, 'attempts', 1)
      redis.call('ZADD', RUNNING, int(now + lease), id)
      return {'ok', redis.call('HGETALL', key)}
    end
  end
end

if op == 'refresh' then
  -- id worker lease_ms
  local id = ARGV[4]
  if not holder(id, ARGV[5]) or not redis.call('ZSCORE', RUNNING, id) then return 0 end
  redis.call('ZADD', RUNNING, int(now + tonumber(ARGV[6])), id)
  return 1
end

if op == 'requeue' then
  -- id worker delay_ms failed error http_status
  local id, delay = ARGV[4], tonumber(ARGV[6])
  if not holder(id, ARGV[5]) then return 0 end
  local key = jobkey(id)
  redis.call('ZREM', RUNNING, id)
  redis.call('HSET', key, 'status', 'queued', 'worker', '', 'error', ARGV[8],
             'http_status', ARGV[9])
  if ARGV[7] == '1' then redis.call('HINCRBY', key, 'failures', 1) end
  if delay > 0 then
    redis.call('HSET', key, 'not_before', int(now + delay))
    redis.call('ZADD', DELAYED, int(now + delay), id)
  else
    redis.call('HSET', key, 'not_before', '')
    redis.call('ZADD', READY, redis.call('HGET', key, 'sort'), id)
  end
  return 1
end

if op == 'finish' then
  -- id worker status result error http_status ttl_ms
  local id = ARGV[4]
  if not holder(id, ARGV[5]) then return {} end
  finalize(id, ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10])
  return {'ok', redis.call('HGETALL', jobkey(id))}
end

if op == 'reap' then
  -- max_attempts ttl_ms error; returns the ids that failed
  local max, failed = tonumber(ARGV[4]), {}
  local expired = redis.call('ZRANGEBYSCORE', RUNNING, '-inf', int(now), 'LIMIT', 0, 100)
  for _, id in ipairs(expired) do
    redis.call('ZREM', RUNNING, id)
    local key = jobkey(id)
    if redis.call('HGET', key, 'status') == 'running' then
      local failures = redis.call('HINCRBY', key, 'failures', 1)
      if failures >= max then
        finalize(id, 'failed', '', ARGV[6], '', ARGV[5])
        failed[#failed + 1] = id
      else
        redis.call('HSET', key, 'status', 'queued', 'worker', '', 'error', ARGV[6],
                   'not_before', '')
        redis.call('ZADD', READY, redis.call('HGET', key, 'sort'), id)
      end
    end
  end
  return failed
end

if op == 'cancel' then
  -- id ttl_ms; returns {status before, fields after}
  local id = ARGV[4]
  local before = redis.call('HGET', jobkey(id), 'status')
  if not before then return {} end
  if before == 'queued' or before == 'running' then
    finalize(id, 'cancelled', '', '', '', ARGV[5])
  end
  return {before, redis.call('HGETALL', jobkey(id))}
end

if op == 'claim_callback' then
  -- holder lease_ms tries lapsed_error; delivery.claim on the first due callback
  local holder, lease, tries = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
  -- Bounded work per call: a caller that gets nothing polls again.
  for _ = 1, 100 do
    local head = redis.call('ZRANGEBYSCORE', CALLBACKS, '-inf', int(now), 'LIMIT', 0, 1)
    if #head == 0 then return {} end
    local id = head[1]
    local key = jobkey(id)
    local v = redis.call('HMGET', key, 'cb_status', 'cb_holder', 'cb_attempts', 'cb_error')
    if v[1] ~= 'pending' then
      redis.call('ZREM', CALLBACKS, id)       -- the job expired, or the callback is final
    else
      -- A holder still named here never reported: its lease lapsed mid-attempt.
      local err = v[4]
      if v[2] and v[2] ~= '' then err = ARGV[7] end
      local attempts = tonumber(v[3])
      if attempts >= tries then
        redis.call('ZREM', CALLBACKS, id)
        redis.call('HSET', key, 'cb_status', 'failed', 'cb_error', err, 'cb_holder', '',
                   'cb_due', '')
      else
        redis.call('HSET', key, 'cb_attempts', attempts + 1, 'cb_error', err,
                   'cb_holder', holder, 'cb_due', int(now + lease))
        redis.call('ZADD', CALLBACKS, int(now + lease), id)
        return {'ok', redis.call('HGETALL', key)}
      end
    end
  end
  return {}
end

if op == 'refresh_callback' then
  -- id holder attempt lease_ms; delivery.refresh
  local key = jobkey(ARGV[4])
  if not holds_callback(key, ARGV[5], ARGV[6]) then return 0 end
  local due = int(now + tonumber(ARGV[7]))
  redis.call('HSET', key, 'cb_due', due)
  redis.call('ZADD', CALLBACKS, due, ARGV[4])
  return 1
end

if op == 'report_callback' then
  -- id holder attempt delivered error give_up tries retry_ms; delivery.report.
  -- Returns the callback's state after it, {} when the job is gone.
  local id, holder, attempt = ARGV[4], ARGV[5], ARGV[6]
  local key = jobkey(id)
  local status = redis.call('HGET', key, 'cb_status')
  if not status then return {} end
  if status ~= 'pending' then return callback_state(key) end
  if ARGV[7] == '1' then
    -- Whoever got the 2xx: the receiver has it, even from a former holder.
    redis.call('HSET', key, 'cb_status', 'delivered', 'cb_error', '', 'cb_holder', '',
               'cb_due', '')
    redis.call('ZREM', CALLBACKS, id)
  elseif holds_callback(key, holder, attempt) then
    if ARGV[9] == '1' or tonumber(attempt) >= tonumber(ARGV[10]) then
      redis.call('HSET', key, 'cb_status', 'failed', 'cb_error', ARGV[8], 'cb_holder', '',
                 'cb_due', '')
      redis.call('ZREM', CALLBACKS, id)
    else
      local due = int(now + tonumber(ARGV[11]))
      redis.call('HSET', key, 'cb_error', ARGV[8], 'cb_holder', '', 'cb_due', due)
      redis.call('ZADD', CALLBACKS, due, id)
    end
  end
  return callback_state(key)
end

return redis.error_reply('unknown job operation ' .. tostring(op))
