-- Backend slots shared by every Corral replica. Mirrors corral/scheduler/shared/memory.py
-- operation for operation; both pass tests/contract/test_slot_store.py.
--
-- A slot is a lease: a member of the backend's zset whose score is its expiry (ms).
-- A backend's use is the number of unexpired leases, so the slots of a replica that
-- died come back by themselves once their leases lapse; expired ones are removed by
-- whichever operation reads the zset next.
--
-- KEYS[1] waiting  hash: job id -> descriptor (JSON) of jobs queued for a slot
-- KEYS[2] granted  hash: job id -> "<backend> <lease>" of jobs given a slot, until the
--                  replica that queued them has taken it (its grant message may be lost)
-- KEYS[3] charges hash: client -> fair-share service not yet taken in by the leader
-- KEYS[4] leader   string: the id of the replica that orders the queue (with a TTL)
-- KEYS[5] running  hash: lease -> "<backend>|<what a preemption needs>" of the running
--                  requests a higher class may stop (their tier is preemptible)
-- KEYS[6..] the lease zsets of the backends the operation is about
-- ARGV[1] now in ms, or "" to read the server's TIME (one clock for all replicas)
-- ARGV[2] operation; ARGV[3..] the operation's arguments, below.
--
-- Channels are named from ARGV: the leader's (events that may change who goes next)
-- and each replica's (the grants it waits for).

-- The shared prelude (replication mode, `now`, `int`, `floordiv`) is prepended when
-- the script is loaded: corral/limits/storage/prelude.lua.

local WAITING, GRANTED, CHARGES, LEADER, RUNNING = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local FIRST = 6                -- KEYS[FIRST..] are lease zsets

local function backend_of(key)
  return string.match(key, 'lease:(.*)$')
end

-- A preemptible request taking a slot is registered for the leader to find.
local function stoppable(key, lease, desc)
  if desc ~= '' then redis.call('HSET', RUNNING, lease, backend_of(key) .. '|' .. desc) end
end
local op = ARGV[2]

-- Fair-share service a replica charged on its own (a slot taken without the leader,
-- or the correction once a request's real token counts are known): the leader adds
-- it to the counters it orders the queue by.
local function charge(client, amount)
  if client ~= '' and tonumber(amount) ~= 0 then
    redis.call('HINCRBYFLOAT', CHARGES, client, amount)
  end
end

local function used(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  return redis.call('ZCARD', key)
end

-- The uncontended path's count: lapsed leases matter only when the backend looks
-- full, so they are cleared then (one command fewer on every free slot).
local function used_lazily(key, cap)
  local n = redis.call('ZCARD', key)
  if n < cap then return n end
  return used(key)
end

-- A backend's zset has no TTL of its own: Redis drops it when its last lease is
-- released, and lapsed leases are cleared by whoever counts them next.
local function take(key, lease, ttl)
  redis.call('ZADD', key, now + ttl, lease)
end

-- acquire: ARGV[3] lease, ARGV[4] ttl ms, ARGV[5] job id, ARGV[6] descriptor ('' =
-- do not queue), ARGV[7] leader channel, ARGV[8] client, ARGV[9] its charge when a
-- slot is taken, ARGV[10] what a preemption needs ('' = not preemptible), ARGV[11..]
-- the cap of each KEYS[FIRST..] backend, in the order of preference. Nobody waiting: the first backend with a free slot is taken -> {index
-- (1-based), its use}. Otherwise the job is queued (and the leader told) -> {0, jobs
-- waiting}. A job never overtakes one that waits.
if op == 'acquire' then
  local lease, ttl, job, desc, chan = ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7]
  local waiting = redis.call('HLEN', WAITING)
  if waiting == 0 then
    for i = FIRST, #KEYS do
      local cap = tonumber(ARGV[i + 11 - FIRST])
      local n = used_lazily(KEYS[i], cap)
      if n < cap then
        take(KEYS[i], lease, ttl)
        charge(ARGV[8], ARGV[9])
        stoppable(KEYS[i], lease, ARGV[10])
        return {i - FIRST + 1, n + 1}
      end
    end
  end
  if desc == '' then return {0, waiting} end
  if redis.call('HSETNX', WAITING, job, desc) == 1 then
    redis.call('PUBLISH', chan, 'enq ' .. job)
    waiting = waiting + 1
  end
  return {0, waiting}
end

-- release: KEYS[FIRST] the backend's leases; ARGV[3] lease, ARGV[4] job id, ARGV[5]
-- leader channel, ARGV[6] backend name, ARGV[7] client, ARGV[8] the correction of its
-- charge. {1 released | 0 the lease had lapsed and was taken back (a late release:
-- nothing is freed twice), use, jobs waiting}.
if op == 'release' then
  local removed = redis.call('ZREM', KEYS[FIRST], ARGV[3])
  redis.call('HDEL', GRANTED, ARGV[4])
  redis.call('HDEL', RUNNING, ARGV[3])
  charge(ARGV[7], ARGV[8])
  local n = used(KEYS[FIRST])
  local waiting = redis.call('HLEN', WAITING)
  if removed == 1 and waiting > 0 then
    redis.call('PUBLISH', ARGV[5], 'rel ' .. ARGV[6])
  end
  return {removed, n, waiting}
end

-- grant (the leader): KEYS[FIRST] the backend's leases; ARGV[3] job id, ARGV[4] lease,
-- ARGV[5] ttl, ARGV[6] cap, ARGV[7] the job's replica's channel, ARGV[8] backend,
-- ARGV[9] placement ("resident" or "load"), ARGV[10] fleet channel, ARGV[11] model,
-- ARGV[12] num_ctx or "", ARGV[13] what a preemption needs ('' = not preemptible). A
-- load is announced on the fleet channel, so that every replica stops sending
-- requests to the model it evicts.
-- {1 granted | 0 the job is no longer waiting | -1 no free slot, use}.
if op == 'grant' then
  local job, lease, ttl, cap = ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
  if redis.call('HEXISTS', WAITING, job) == 0 then return {0, -1} end
  local n = used(KEYS[FIRST])
  if n >= cap then return {-1, n} end
  take(KEYS[FIRST], lease, ttl)
  stoppable(KEYS[FIRST], lease, ARGV[13])
  redis.call('HDEL', WAITING, job)
  local grant = ARGV[8] .. ' ' .. lease .. ' ' .. ARGV[9]
  redis.call('HSET', GRANTED, job, grant)
  redis.call('PUBLISH', ARGV[7], 'grant ' .. job .. ' ' .. grant)
  if ARGV[9] == 'load' then
    redis.call('PUBLISH', ARGV[10], 'load ' .. ARGV[8] .. ' ' .. ARGV[11] .. ' ' .. ARGV[12])
  end
  return {1, n + 1}
end

-- cancel: ARGV[3] job id, ARGV[4] leader channel. The job leaves the queue -> {1, ''};
-- or it had been granted a slot in the meantime -> {2, "<backend> <lease> <placement>"}
-- (the caller releases it, or uses it); or it is unknown -> {0, ''}.
if op == 'cancel' then
  if redis.call('HDEL', WAITING, ARGV[3]) == 1 then
    redis.call('PUBLISH', ARGV[4], 'cancel ' .. ARGV[3])
    return {1, ''}
  end
  local grant = redis.call('HGET', GRANTED, ARGV[3])
  if grant then
    redis.call('HDEL', GRANTED, ARGV[3])
    return {2, grant}
  end
  return {0, ''}
end

-- renew: KEYS[FIRST..] backends; ARGV[3] ttl, ARGV[4..] one lease per key. A lease
-- still there (even past its time, when nobody has taken the slot back yet) is
-- extended; -> the 1-based indexes of the leases that were gone (lost: the slot was
-- taken back).
if op == 'renew' then
  local ttl, lost = tonumber(ARGV[3]), {}
  for i = FIRST, #KEYS do
    local lease = ARGV[i + 4 - FIRST]
    if redis.call('ZSCORE', KEYS[i], lease) then
      take(KEYS[i], lease, ttl)
    else
      table.insert(lost, i - FIRST + 1)
    end
  end
  return lost
end

-- adopt: KEYS[FIRST..] backends; ARGV[3] ttl, ARGV[4..] one lease per key. Requests
-- that started while the store was away are running at the backends: their leases
-- are recorded whatever the counts, so nobody else takes their slots.
if op == 'adopt' then
  local ttl = tonumber(ARGV[3])
  for i = FIRST, #KEYS do take(KEYS[i], ARGV[i + 4 - FIRST], ttl) end
  return #KEYS - FIRST + 1
end

-- counts: KEYS[FIRST..] backends -> the use of each, then the number of jobs waiting.
if op == 'counts' then
  local out = {}
  for i = FIRST, #KEYS do table.insert(out, used(KEYS[i])) end
  table.insert(out, redis.call('HLEN', WAITING))
  return out
end

-- lead: ARGV[3] replica id, ARGV[4] ttl ms. Become the leader when there is none, or
-- stay it -> {1 | 0, the leader's id}.
if op == 'lead' then
  local current = redis.call('GET', LEADER)
  if not current or current == ARGV[3] then
    redis.call('SET', LEADER, ARGV[3], 'PX', tonumber(ARGV[4]))
    return {1, ARGV[3]}
  end
  return {0, current}
end

-- resign: ARGV[3] replica id. Stop leading (a replica shutting down) -> {1 | 0}.
if op == 'resign' then
  if redis.call('GET', LEADER) == ARGV[3] then
    redis.call('DEL', LEADER)
    return {1}
  end
  return {0}
end

-- job: ARGV[3] job id -> its descriptor, or false when it no longer waits.
if op == 'job' then
  return redis.call('HGET', WAITING, ARGV[3])
end

-- stoppable: the preemptible requests running -> {lease, "<backend>|...", ...}.
if op == 'stoppable' then
  return redis.call('HGETALL', RUNNING)
end

-- charges: take in the charges made since the last call -> {client, amount, ...}.
if op == 'charges' then
  local all = redis.call('HGETALL', CHARGES)
  redis.call('DEL', CHARGES)
  return all
end

return redis.error_reply('slots.lua: unknown operation ' .. tostring(op))
