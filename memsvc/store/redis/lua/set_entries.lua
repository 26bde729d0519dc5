-- Writes N entries atomically, or none when a limit would be passed.
-- ARGV: max_keys, max_bytes, then N triples (key, value, ttl_ms; 0 = none).
-- Returns {'ok', created_1, expire_at_1, ...} (expire_at 0 = none),
-- {'state', state} or {'limit', 'keys'|'bytes', limit, current, requested}.
local now = now_ms()
purge(now)
local blocked = write_blocked()
if blocked then
  return {'state', blocked}
end
local max_keys, max_bytes = tonumber(ARGV[1]), tonumber(ARGV[2])
local count = redis.call('HLEN', D)
local bytes = tonumber(redis.call('HGET', M, 'bytes') or '0')
local new_count, new_bytes = count, bytes
local created = {}
for i = 3, #ARGV, 3 do
  local key, value = ARGV[i], ARGV[i + 1]
  -- Every stored value is at least one byte, so HSTRLEN 0 means absent.
  local old = redis.call('HSTRLEN', D, key)
  if old > 0 then
    new_bytes = new_bytes - #key - old
    created[#created + 1] = 0
  else
    new_count = new_count + 1
    created[#created + 1] = 1
  end
  new_bytes = new_bytes + #key + #value
end
-- Only a write that grows the session past a limit: one over it already (its limits
-- lowered since) may still overwrite and shrink what it holds.
if new_count > max_keys and new_count > count then
  return {'limit', 'keys', max_keys, count, new_count}
end
if new_bytes > max_bytes and new_bytes > bytes then
  return {'limit', 'bytes', max_bytes, bytes, new_bytes}
end
local reply = {'ok'}
for i = 3, #ARGV, 3 do
  local key, value, ttl = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  redis.call('HSET', D, key, value)
  redis.call('ZADD', K, 0, key)
  local expire_at = 0
  if ttl > 0 then
    expire_at = now + ttl
    redis.call('ZADD', X, expire_at, key)
  else
    redis.call('ZREM', X, key)
  end
  reply[#reply + 1] = created[i / 3]
  reply[#reply + 1] = expire_at
end
redis.call('HSET', M, 'bytes', new_bytes)
refresh_session_expiry()
return reply
