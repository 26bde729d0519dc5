-- Lifecycle step 1 of Pause, Terminate and CreateCheckpoint (ADR 0004): read the
-- whole working memory in one atomic step and, for Pause and Terminate, set the
-- transitional marker that refuses writes from this moment on.
-- ARGV: op, new_state ('' = leave the marker), clear_on_finish ('0'|'1'), then
-- the states the marker may be in ('missing' allows a lost working memory).
-- Returns {'ok', state, key_1, value_1, remaining_ttl_ms_1 (-1 = none), ...},
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
local reply = {'ok', state}
local flat = redis.call('HGETALL', D)
for i = 1, #flat, 2 do
  local key = flat[i]
  local at = redis.call('ZSCORE', X, key)
  reply[#reply + 1] = key
  reply[#reply + 1] = flat[i + 1]
  if at then
    reply[#reply + 1] = math.max(1, tonumber(at) - now)
  else
    reply[#reply + 1] = -1
  end
end
return reply
