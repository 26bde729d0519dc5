-- Shared by every working-memory script (prepended to each one).
--
-- One session's working memory is four keys under one hash tag, so they live
-- in one Redis Cluster slot and one script can touch them all atomically:
--   KEYS[1] D  hash   key -> encoded value
--   KEYS[2] X  zset   key -> expiry (Unix ms), only for keys with a TTL
--   KEYS[3] K  zset   key -> 0, the lexicographic index used for pagination
--   KEYS[4] M  hash   'bytes' (sum of key and value sizes), 'state' (lifecycle)
-- (lifecycle scripts: KEYS[5..7] the staging D', X', K'), and last the guard
-- key, which no script touches and nothing ever creates: declaring it makes a
-- Redis Cluster node refuse the whole script (TRYAGAIN) while the slot
-- migrates, instead of failing it midway on a key that just moved (ADR 0007).
-- Every script first purges the keys whose expiry has passed (by Redis's own
-- clock), so what it reads or counts afterwards is live.
local D, X, K, M = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Deletes members in chunks: unpack() has a stack limit of a few thousand.
local function remove_members(members)
  for i = 1, #members, 1000 do
    local j = math.min(i + 999, #members)
    redis.call('HDEL', D, unpack(members, i, j))
    redis.call('ZREM', K, unpack(members, i, j))
    redis.call('ZREM', X, unpack(members, i, j))
  end
end

-- Whether Redis evicted part of the session (a maxmemory-policy other than
-- noeviction), given whether its data and its key index exist: they are written,
-- renamed and expired together, so one without the other was evicted; unless the
-- one left is about to expire, a moment apart from the other (a slot moved to
-- another node re-bases TTLs). Both evicted at once look like a session that
-- expired: not detected.
local function evicted(has_data, has_index)
  if has_data == has_index then
    return false
  end
  local ttl = redis.call('PTTL', has_data == 1 and D or K)
  return not (ttl >= 0 and ttl <= 1000)
end

-- Drops what has expired; returns true when it dropped the whole session,
-- marker included, as Redis had evicted part of it.
local function purge(now)
  local has_data, has_index = redis.call('EXISTS', D), redis.call('EXISTS', K)
  if evicted(has_data, has_index) then
    -- What is left is not the session: dropped with its marker, so that every
    -- call reports the memory lost, as after a flush, instead of serving part of
    -- it (an operation between its steps finds its marker gone: lost as well).
    redis.call('DEL', D, X, K, M)
    return true
  end
  if has_data == 0 or has_index == 0 then
    -- The whole session expired (or never existed; or its keys are expiring a
    -- moment apart): reset what it left behind.
    redis.call('DEL', D, X, K)
    redis.call('HDEL', M, 'bytes')
    return
  end
  local expired = redis.call('ZRANGE', X, '-inf', now, 'BYSCORE')
  if #expired == 0 then
    return
  end
  local freed = 0
  for i = 1, #expired do
    freed = freed + #expired[i] + redis.call('HSTRLEN', D, expired[i])
  end
  remove_members(expired)
  redis.call('HINCRBY', M, 'bytes', -freed)
end

-- After a write: when every key has a TTL, let Redis expire the whole session
-- at the last expiry, so sessions nobody reads again do not stay forever.
local function refresh_session_expiry()
  if redis.call('EXISTS', D) == 0 then
    redis.call('DEL', X, K)
    redis.call('HDEL', M, 'bytes')
    return
  end
  local keep_meta = redis.call('HEXISTS', M, 'state') == 1
  if redis.call('ZCARD', X) == redis.call('HLEN', D) then
    local last = redis.call('ZRANGE', X, -1, -1, 'WITHSCORES')
    local at = last[2]
    redis.call('PEXPIREAT', D, at)
    redis.call('PEXPIREAT', X, at)
    redis.call('PEXPIREAT', K, at)
    if not keep_meta then
      redis.call('PEXPIREAT', M, at)
    end
  else
    redis.call('PERSIST', D)
    redis.call('PERSIST', X)
    redis.call('PERSIST', K)
    redis.call('PERSIST', M)
  end
end

-- Returns the state that forbids writes ('missing' without a marker: never
-- spawned, terminated, or lost by Redis), or false when writes are allowed.
local function write_blocked()
  local state = redis.call('HGET', M, 'state')
  if state == 'active' then
    return false
  end
  return state or 'missing'
end

-- The lifecycle operations settled here last (finished or aborted), so that a
-- step 1 of one of them that arrives late (a copy the network held back after
-- memsvc retried it on a new connection) changes nothing. Operation ids are
-- unique per call; a late copy comes within seconds, long before four more
-- operations of the same session, so four are kept (about 150 bytes).
local SETTLED_KEEP = 4

local function already_settled(op)
  local list = redis.call('HGET', M, 'settled')
  return list and string.find(',' .. list .. ',', ',' .. op .. ',', 1, true) ~= nil
end

local function remember_settled(op)
  local ops = {}
  for item in string.gmatch(redis.call('HGET', M, 'settled') or '', '[^,]+') do
    ops[#ops + 1] = item
  end
  ops[#ops + 1] = op
  while #ops > SETTLED_KEEP do
    table.remove(ops, 1)
  end
  redis.call('HSET', M, 'settled', table.concat(ops, ','))
end

-- Ends operation `op` with the marker in `state` (step 3, or the undo of step 1):
-- the operation's fields go, and the checkpoint a Pause took ('snapshot') stays
-- only while the memory is paused.
local function settle_marker(state, op)
  redis.call('HSET', M, 'state', state)
  redis.call('HDEL', M, 'op', 'prior', 'next_epoch', 'staged_bytes', 'clear', 'kept')
  if state ~= 'paused' then
    redis.call('HDEL', M, 'snapshot')
  end
  remember_settled(op)
  refresh_session_expiry()
end

-- Returns why a read cannot be served now, or false when it can: 'missing'
-- without a marker (the session does not exist here), or the state of a
-- spawn, resume or terminate between its steps: what the memory holds then
-- depends on whether that operation committed, which only the database knows.
local function read_blocked()
  local state = redis.call('HGET', M, 'state')
  if not state then
    return 'missing'
  end
  if state == 'spawning' or state == 'resuming' or state == 'terminating' then
    return state
  end
  return false
end
