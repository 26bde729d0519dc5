-- Lifecycle step 1 of Pause, Terminate and CreateCheckpoint (ADR 0004): read the
-- whole working memory in one atomic step and, for Pause and Terminate, set the
-- transitional marker that refuses writes from this moment on.
-- ARGV: op, new_state ('' = leave the marker), clear_on_finish ('0'|'1'), then
-- the states the marker may be in ('missing' allows a lost working memory).
-- Returns {'ok', state, snapshot, key_count, size_bytes} (snapshot in the
-- checkpoint format, remaining TTLs in it),
-- {'state', state} when the marker is in another state.
local now = now_ms()
purge(now)
local state = redis.call('HGET', M, 'state') or 'missing'
local allowed = false
for i = 4, #ARGV do
  if ARGV[i] == state then
    allowed = true
  end
end
if not allowed then
  return {'state', state}
end
if ARGV[2] ~= '' then
  redis.call('HSET', M, 'state', ARGV[2], 'op', ARGV[1], 'prior', state, 'clear', ARGV[3])
end
-- The snapshot leaves as one string in the checkpoint format
-- (memsvc/domain/_snapshot.py), so neither Redis nor memsvc handles a reply
-- element per key. Expiries are read once, not looked up key by key.
local expiry = {}
local timed = redis.call('ZRANGE', X, 0, -1, 'WITHSCORES')
for i = 1, #timed, 2 do
  expiry[timed[i]] = tonumber(timed[i + 1])
end
local flat = redis.call('HGETALL', D)
local parts = {'MSN1', struct.pack('<I4', #flat / 2)}
local size = 0
for i = 1, #flat, 2 do
  local key, value = flat[i], flat[i + 1]
  local ttl = -1
  if expiry[key] then
    ttl = math.max(1, expiry[key] - now)
  end
  parts[#parts + 1] = struct.pack('<I4', #key) .. key .. struct.pack('<I4', #value) .. value
    .. struct.pack('<i8', ttl)
  size = size + #key + #value
end
return {'ok', state, table.concat(parts), #flat / 2, size}
