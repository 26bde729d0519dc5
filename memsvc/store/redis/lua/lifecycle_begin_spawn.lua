-- Lifecycle step 1 of Spawn (ADR 0004): the caller holds the new session's row
-- in an open database transaction, so no other session of this name exists;
-- anything left here is an orphan of an unfinished call and is replaced.
-- An existing memory (any marker) is replaced only when the call names it
-- (ARGV[3], the identity an 'exists' answer gave: state, operation and epoch): a
-- late copy of the step 1 of a Spawn that failed, arriving after a retry of it
-- spawned the session (or while the retry, or a later operation, is between its
-- steps), must not wipe that live session, and only the call that is still
-- waiting for the reply can tell. A late copy of that naming call finds another
-- memory there by then, and changes nothing either.
-- KEYS[5..7]: staging D', X', K' (cleared too).
-- ARGV: op, epoch, the identity of the memory to replace ('' for none), then
-- triples (key, value, ttl_ms; 0 = none).
-- Returns {'ok'}, {'exists', identity} (nothing changed), or {'late'} (nothing
-- changed) for a step of a settled operation.
if already_settled(ARGV[1]) then
  return {'late'}
end
local state = redis.call('HGET', M, 'state')
if state then
  local fields = redis.call('HMGET', M, 'op', 'epoch', 'next_epoch')
  local identity = table.concat(
    {state, fields[1] or '', fields[2] or '', fields[3] or ''}, '|')
  if identity ~= ARGV[3] then
    return {'exists', identity}
  end
end
local now = now_ms()
-- The fence of settled operations outlives the orphan it replaces.
local settled = redis.call('HGET', M, 'settled')
redis.call('DEL', D, X, K, M, KEYS[5], KEYS[6], KEYS[7])
if settled then
  redis.call('HSET', M, 'settled', settled)
end
local op, epoch = ARGV[1], ARGV[2]
local bytes = 0
for i = 4, #ARGV, 3 do
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
