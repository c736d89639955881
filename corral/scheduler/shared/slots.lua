-- Backend slots shared by every Corral replica: the protocol of
-- corral/scheduler/shared/protocol.py (its invariants are written there), operation
-- for operation; the memory store runs that module as it is, and both pass
-- tests/contract/test_slot_store.py and the model-based test.
--
-- A slot is a lease: a member of the backend's zset whose score is its expiry (ms).
-- A backend's use is the number of unexpired leases, so the slots of a replica that
-- died come back by themselves once their leases lapse; expired ones are removed by
-- whichever operation reads the zset next.
--
-- KEYS[1] waiting  hash: job id -> descriptor (JSON) of jobs queued for a slot
-- KEYS[2] granted  hash: job id -> "<backend> <lease> <placement>" of jobs given a
--                  slot, until the replica that queued them has taken it
-- KEYS[3] charges  hash: client -> fair-share service not yet taken in by the leader
-- KEYS[4] leader   string: the id of the replica that orders the queue (with a TTL)
-- KEYS[5] running  hash: lease -> "<backend>|<what a preemption needs>" of the running
--                  requests a higher class may stop (their tier is preemptible)
-- KEYS[6] epoch    hash: name, at (ms created), grace (ms: no slot is given before it)
-- KEYS[7] memo     string: this operation's answer, kept MEMO_MS under its id (a
--                  repeat of the operation answers the same and changes nothing)
-- KEYS[8..] the lease zsets of the backends the operation is about (or, for hello,
--                  the replica's key and the set of replica names)
-- ARGV[1] now in ms, or "" to read the server's TIME (one clock for all replicas)
-- ARGV[2] operation; ARGV[3] the epoch the caller knows; ARGV[4] the grace period in
-- ms; ARGV[5] a name for a new epoch (unique to the call); ARGV[6..] the operation's arguments, below.
--
-- Channels are named from ARGV: the leader's (events that may change who goes next)
-- and each replica's (the grants it waits for).

-- The shared prelude (replication mode, `now`, `int`, `floordiv`) is prepended when
-- the script is loaded: corral/limits/storage/prelude.lua.

local WAITING, GRANTED, CHARGES, LEADER, RUNNING = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local EPOCH, MEMO = KEYS[6], KEYS[7]
local FIRST = 8                -- KEYS[FIRST..] are lease zsets
local MEMO_MS = 60000
local op = ARGV[2]
local function arg(i) return ARGV[5 + i] end

-- The epoch: created at first use (or after the store lost its data), with a grace
-- period during which no slot is given (every replica records what it runs first).
local function epoch()
  local e = redis.call('HMGET', EPOCH, 'name', 'at', 'grace')
  local name, at, grace = e[1], tonumber(e[2]), tonumber(e[3] or '0')
  if not name then
    -- Whoever reaches an empty store first cannot tell a first use from a data loss:
    -- a grace period always. ARGV[5] is unique per call: no two epochs share a name.
    name, at, grace = int(now) .. '-' .. ARGV[5], now, now + tonumber(ARGV[4])
    redis.call('HSET', EPOCH, 'name', name, 'at', int(at), 'grace', int(grace))
  end
  return name, grace
end

local function stale(name, grace)
  return redis.error_reply('STALE ' .. name .. ' ' .. int(grace))
end

local function recall()
  local seen = redis.call('GET', MEMO)
  if seen then return cjson.decode(seen) end
  return nil
end

local function remember(answer)
  redis.call('SET', MEMO, cjson.encode(answer), 'PX', MEMO_MS)
  return answer
end

local function backend_of(key)
  return string.match(key, 'lease:(.*)$')
end

-- A preemptible request taking a slot is registered for the leader to find.
local function stoppable(key, lease, desc)
  if desc ~= '' then redis.call('HSET', RUNNING, lease, backend_of(key) .. '|' .. desc) end
end

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

-- hello: KEYS[FIRST] the replica's key, KEYS[FIRST+1] the set of replica names;
-- arg(1) replica id, arg(2) what it is (JSON), arg(3) ttl ms -> {epoch, grace end}.
if op == 'hello' then
  redis.call('SET', KEYS[FIRST], arg(2), 'PX', tonumber(arg(3)))
  redis.call('SADD', KEYS[FIRST + 1], arg(1))
  local name, grace = epoch()
  return {name, int(grace)}
end

-- grace -> the end of the grace period (ms; 0: none was ever needed).
if op == 'grace' then
  return tonumber(redis.call('HGET', EPOCH, 'grace') or '0')
end

-- Every operation below changes slots: refused when the caller's epoch is not the
-- store's (it records what runs again, then asks again).
local mutating = {acquire = true, release = true, grant = true, cancel = true,
                  renew = true, adopt = true}
local in_grace = false
if mutating[op] then
  local name, grace = epoch()
  if name ~= ARGV[3] then return stale(name, grace) end
  in_grace = now < grace
end

-- acquire: arg(1) lease (the operation's id), arg(2) ttl ms, arg(3) job id, arg(4)
-- descriptor ('' = do not queue), arg(5) leader channel, arg(6) client, arg(7) its
-- charge when a slot is taken, arg(8) what a preemption needs ('' = not
-- preemptible), arg(9..) the cap of each KEYS[FIRST..] backend, in the order of
-- preference. Nobody waiting and no grace period: the first backend with a free slot
-- is taken -> {index (1-based), its use}. Otherwise the job is queued (once; not when
-- it was granted meanwhile) and the leader told -> {0, jobs waiting}. A job never
-- overtakes one that waits.
if op == 'acquire' then
  local seen = recall()
  if seen then return seen end
  local lease, ttl, job, desc, chan = arg(1), tonumber(arg(2)), arg(3), arg(4), arg(5)
  local waiting = redis.call('HLEN', WAITING)
  if waiting == 0 and not in_grace then
    for i = FIRST, #KEYS do
      local cap = tonumber(arg(9 + i - FIRST))
      local n = used_lazily(KEYS[i], cap)
      if n < cap then
        take(KEYS[i], lease, ttl)
        charge(arg(6), arg(7))
        stoppable(KEYS[i], lease, arg(8))
        return remember({i - FIRST + 1, n + 1})
      end
    end
  end
  if desc == '' or redis.call('HEXISTS', GRANTED, job) == 1 then
    return remember({0, waiting})
  end
  if redis.call('HSETNX', WAITING, job, desc) == 1 then
    redis.call('PUBLISH', chan, 'enq ' .. job)
    waiting = waiting + 1
  end
  return remember({0, waiting})
end

-- release: KEYS[FIRST] the backend's leases; arg(1) lease, arg(2) job id, arg(3)
-- leader channel, arg(4) backend name, arg(5) client, arg(6) the correction of its
-- charge. {1 released | 0 the lease had lapsed and was taken back (a late release:
-- nothing is freed twice), use, jobs waiting}; the correction is made once.
if op == 'release' then
  local seen = recall()
  if seen then return seen end
  local removed = redis.call('ZREM', KEYS[FIRST], arg(1))
  redis.call('HDEL', GRANTED, arg(2))
  redis.call('HDEL', RUNNING, arg(1))
  charge(arg(5), arg(6))
  local n = used(KEYS[FIRST])
  local waiting = redis.call('HLEN', WAITING)
  if removed == 1 and waiting > 0 then
    redis.call('PUBLISH', arg(3), 'rel ' .. arg(4))
  end
  return remember({removed, n, waiting})
end

-- grant (the leader): KEYS[FIRST] the backend's leases; arg(1) job id, arg(2) lease
-- (the operation's id), arg(3) ttl, arg(4) cap, arg(5) the job's replica's channel,
-- arg(6) backend, arg(7) placement ("resident" or "load"), arg(8) fleet channel,
-- arg(9) model, arg(10) num_ctx or "", arg(11) what a preemption needs ('' = not
-- preemptible). A load is announced on the fleet channel, so that every replica
-- stops sending requests to the model it evicts.
-- {1 granted | 0 the job is no longer waiting | -1 no free slot (or a grace period), use}.
if op == 'grant' then
  local seen = recall()
  if seen then return seen end
  local job, lease, ttl, cap = arg(1), arg(2), tonumber(arg(3)), tonumber(arg(4))
  if redis.call('HEXISTS', WAITING, job) == 0 then return remember({0, -1}) end
  local n = used(KEYS[FIRST])
  if in_grace then return remember({-1, math.max(n, cap)}) end
  if n >= cap then return remember({-1, n}) end
  take(KEYS[FIRST], lease, ttl)
  stoppable(KEYS[FIRST], lease, arg(11))
  redis.call('HDEL', WAITING, job)
  local grant = arg(6) .. ' ' .. lease .. ' ' .. arg(7)
  redis.call('HSET', GRANTED, job, grant)
  redis.call('PUBLISH', arg(5), 'grant ' .. job .. ' ' .. grant)
  if arg(7) == 'load' then
    redis.call('PUBLISH', arg(8), 'load ' .. arg(6) .. ' ' .. arg(9) .. ' ' .. arg(10))
  end
  return remember({1, n + 1})
end

-- cancel: arg(1) job id, arg(2) leader channel. The job leaves the queue -> {1, ''};
-- or it had been granted a slot in the meantime -> {2, "<backend> <lease> <placement>"}
-- (the caller releases it, or uses it); or it is unknown -> {0, ''}. Told once.
if op == 'cancel' then
  local seen = recall()
  if seen then return seen end
  if redis.call('HDEL', WAITING, arg(1)) == 1 then
    redis.call('PUBLISH', arg(2), 'cancel ' .. arg(1))
    return remember({1, ''})
  end
  local grant = redis.call('HGET', GRANTED, arg(1))
  if grant then
    redis.call('HDEL', GRANTED, arg(1))
    return remember({2, grant})
  end
  return remember({0, ''})
end

-- renew / adopt: KEYS[FIRST..] backends; arg(1) ttl, arg(2..) one lease per key.
-- Every lease is extended; one the store no longer had (it lapsed during a pause, or
-- the store lost its data) is recorded again — the request runs at the backend
-- whatever the counts say — and named: -> the 1-based indexes of those. Nothing is
-- ever freed here.
if op == 'renew' or op == 'adopt' then
  local ttl, lost = tonumber(arg(1)), {}
  for i = FIRST, #KEYS do
    local lease = arg(2 + i - FIRST)
    local expiry = redis.call('ZSCORE', KEYS[i], lease)
    if not expiry or tonumber(expiry) <= now then
      table.insert(lost, i - FIRST + 1)
    end
    take(KEYS[i], lease, ttl)
  end
  return lost
end

-- counts: KEYS[FIRST..] backends -> the use of each, then the number of jobs waiting.
if op == 'counts' then
  local out = {}
  for i = FIRST, #KEYS do table.insert(out, used(KEYS[i])) end
  table.insert(out, redis.call('HLEN', WAITING))
  return out
end

-- lead: arg(1) replica id, arg(2) ttl ms. Become the leader when there is none, or
-- stay it -> {1 | 0, the leader's id}.
if op == 'lead' then
  local current = redis.call('GET', LEADER)
  if not current or current == arg(1) then
    redis.call('SET', LEADER, arg(1), 'PX', tonumber(arg(2)))
    return {1, arg(1)}
  end
  return {0, current}
end

-- resign: arg(1) replica id. Stop leading (a replica shutting down) -> {1 | 0}.
if op == 'resign' then
  if redis.call('GET', LEADER) == arg(1) then
    redis.call('DEL', LEADER)
    return {1}
  end
  return {0}
end

-- job: arg(1) job id -> its descriptor, or false when it no longer waits.
if op == 'job' then
  return redis.call('HGET', WAITING, arg(1))
end

-- stoppable: the preemptible requests running -> {lease, "<backend>|...", ...}.
if op == 'stoppable' then
  return redis.call('HGETALL', RUNNING)
end

-- charges: take in the charges made since the last call -> {client, amount, ...};
-- a repeat of the same call (its answer was lost) gets the same answer.
if op == 'charges' then
  local seen = recall()
  if seen then return seen end
  local all = redis.call('HGETALL', CHARGES)
  redis.call('DEL', CHARGES)
  return remember(all)
end

-- sweep (the leader's housekeeping): arg(1) the lease keys' prefix, arg(2..) the
-- replicas alive. Preemptible entries whose lease is gone, and grants whose lease is
-- gone to replicas that are gone, are forgotten -> how many entries went.
if op == 'sweep' then
  local alive, went = {}, 0
  for i = 2, #ARGV - 5 do alive[arg(i)] = true end
  local function live(backend, lease)
    local expiry = redis.call('ZSCORE', arg(1) .. backend, lease)
    return expiry and tonumber(expiry) > now
  end
  local entries = redis.call('HGETALL', RUNNING)
  for i = 1, #entries, 2 do
    local backend = string.match(entries[i + 1], '^([^|]*)')
    if not live(backend, entries[i]) then
      redis.call('HDEL', RUNNING, entries[i])
      went = went + 1
    end
  end
  local grants = redis.call('HGETALL', GRANTED)
  for i = 1, #grants, 2 do
    local backend, lease = string.match(grants[i + 1], '^(%S+) (%S+)')
    local replica = string.match(grants[i], '^(.*)%.[^.]*$') or ''
    if not alive[replica] and not live(backend, lease) then
      redis.call('HDEL', GRANTED, grants[i])
      went = went + 1
    end
  end
  return went
end

return redis.error_reply('slots.lua: unknown operation ' .. tostring(op))
