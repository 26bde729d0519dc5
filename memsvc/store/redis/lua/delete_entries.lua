-- Deletes keys atomically. ARGV: the keys.
-- Returns {'ok', existed_1, ...} or {'state', state}.
purge(now_ms())
local blocked = write_blocked()
if blocked then
  return {'state', blocked}
end
local reply = {'ok'}
local freed = 0
for i = 1, #ARGV do
  local size = redis.call('HSTRLEN', D, ARGV[i])
  if size > 0 then
    freed = freed + size + #ARGV[i]
    redis.call('HDEL', D, ARGV[i])
    redis.call('ZREM', K, ARGV[i])
    redis.call('ZREM', X, ARGV[i])
    reply[#reply + 1] = 1
  else
    reply[#reply + 1] = 0
  end
end
if freed > 0 then
  redis.call('HINCRBY', M, 'bytes', -freed)
  refresh_session_expiry()
end
return reply
