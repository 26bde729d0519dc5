-- Lifecycle step 1 of Spawn (ADR 0004): the caller holds the new session's row
-- in an open database transaction, so no other session of this name exists;
-- anything left here is an orphan of an unfinished call and is replaced.
-- KEYS[5..7]: staging D', X', K' (cleared too).
-- ARGV: op, epoch, then triples (key, value, ttl_ms; 0 = none).
-- Returns {'ok'}, or {'late'} (nothing changed) for a step of a settled operation.
if already_settled(ARGV[1]) then
  return {'late'}
end
local now = now_ms()
redis.call('DEL', D, X, K, M, KEYS[5], KEYS[6], KEYS[7])
local op, epoch = ARGV[1], ARGV[2]
local bytes = 0
for i = 3, #ARGV, 3 do
  local key, value, ttl = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  redis.call('HSET', D, key, value)
  redis.call('ZADD', K, 0, key)
  if ttl > 0 then
    redis.call('ZADD', X, now + ttl, key)
  end
  bytes = bytes + #key + #value
end
redis.call('HSET', M, 'state', 'spawning', 'op', op, 'next_epoch', epoch, 'bytes', bytes)
refresh_session_expiry()
return {'ok'}
