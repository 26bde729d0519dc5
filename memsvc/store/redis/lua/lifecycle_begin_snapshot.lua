-- Lifecycle step 1 of Pause, Terminate and CreateCheckpoint (ADR 0004): read the
-- whole working memory in one atomic step and, for Pause and Terminate, set the
-- transitional marker that refuses writes from this moment on.
-- ARGV: op, new_state ('' = leave the marker), clear_on_finish ('0'|'1'),
-- with_contents ('0'|'1', see below), the id of the checkpoint this snapshot becomes
-- (recorded with a new state: lifecycle_begin_restore keeps a paused memory
-- that still holds it), the epoch the database says the memory is in ('' =
-- unchecked; a marker of another one is reported as state 'stale': a Redis
-- restored from a copy older than the last Resume), then the states the marker
-- may be in ('missing' allows a lost working memory).
-- Returns {'ok', state, HGETALL of the data, ZRANGE WITHSCORES of the expiries,
-- Redis's now in ms, key count, bytes}; without contents, the data and expiries
-- are empty (a Terminate that records no episode moves no values, or memsvc
-- reads them with plain commands after the script) and the keys with a TTL are
-- counted after the bytes,
-- {'state', state} when the marker is in another state, or {'late'} (nothing
-- changed) for a step of an operation already settled.
if already_settled(ARGV[1]) then
  return {'late'}
end
local now = now_ms()
purge(now)
local state = redis.call('HGET', M, 'state') or 'missing'
local allowed = false
for i = 7, #ARGV do
  if ARGV[i] == state then
    allowed = true
  end
end
if not allowed then
  return {'state', state}
end
local epoch = redis.call('HGET', M, 'epoch')
if ARGV[6] ~= '' and epoch and epoch ~= ARGV[6] then
  return {'state', 'stale'}
end
if ARGV[2] ~= '' then
  redis.call('HSET', M, 'state', ARGV[2], 'op', ARGV[1], 'prior', state, 'clear', ARGV[3])
  if ARGV[5] ~= '' then
    redis.call('HSET', M, 'snapshot', ARGV[5])
  end
end
-- Contents only when asked (ARGV[4] '1', a Redis Cluster): on a single Redis,
-- memsvc queues HGETALL and ZRANGE behind this script in the same MULTI/EXEC,
-- which costs Redis a third of copying every entry into Lua and back. Either
-- way two flat replies, not one element per key: memsvc packs them into the
-- checkpoint format (building that string in Lua cost more than it saved).
local count, bytes = redis.call('HLEN', D), tonumber(redis.call('HGET', M, 'bytes') or '0')
if ARGV[4] == '0' then
  return {'ok', state, {}, {}, now, count, bytes, redis.call('ZCARD', X)}
end
return {'ok', state, redis.call('HGETALL', D), redis.call('ZRANGE', X, 0, -1, 'WITHSCORES'), now,
  count, bytes}
