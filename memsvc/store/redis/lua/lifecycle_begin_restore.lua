-- Lifecycle step 1 of Resume (ADR 0004): build the resumed working memory in
-- the staging keys, leaving the live ones untouched, and set the 'resuming'
-- marker (writes refused). Step 3 swaps staging into live with RENAME.
-- KEYS[5..7]: staging D', X', K'.
-- ARGV: op, next_epoch, merge ('0'|'1'), max_keys, max_bytes, allowed states
-- (comma-separated; 'missing' allows a lost working memory), then triples
-- (key, value, remaining_ttl_ms; -1 = none).
-- Returns {'ok', key_count}, {'state', state} or
-- {'limit', 'keys'|'bytes', limit, current, requested}.
local SD, SX, SK = KEYS[5], KEYS[6], KEYS[7]
local now = now_ms()
purge(now)
local state = redis.call('HGET', M, 'state') or 'missing'
if not string.find(',' .. ARGV[6] .. ',', ',' .. state .. ',', 1, true) then
  return {'state', state}
end
redis.call('DEL', SD, SX, SK)
local bytes = 0
if ARGV[3] == '1' and redis.call('EXISTS', D) == 1 then
  redis.call('COPY', D, SD)
  redis.call('COPY', K, SK)
  if redis.call('EXISTS', X) == 1 then
    redis.call('COPY', X, SX)
  end
  bytes = tonumber(redis.call('HGET', M, 'bytes') or '0')
end
for i = 7, #ARGV, 3 do
  local key, value, ttl = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local old = redis.call('HSTRLEN', SD, key)
  if old > 0 then
    bytes = bytes - #key - old
  end
  bytes = bytes + #key + #value
  redis.call('HSET', SD, key, value)
  redis.call('ZADD', SK, 0, key)
  if ttl >= 0 then
    redis.call('ZADD', SX, now + math.max(1, ttl), key)
  else
    redis.call('ZREM', SX, key)
  end
end
local count = redis.call('HLEN', SD)
local max_keys, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
if count > max_keys or bytes > max_bytes then
  redis.call('DEL', SD, SX, SK)
  if count > max_keys then
    return {'limit', 'keys', max_keys, redis.call('HLEN', D), count}
  end
  return {'limit', 'bytes', max_bytes, tonumber(redis.call('HGET', M, 'bytes') or '0'), bytes}
end
redis.call('HSET', M, 'state', 'resuming', 'op', ARGV[1], 'prior', state, 'next_epoch', ARGV[2],
  'staged_bytes', bytes)
return {'ok', count}
