-- Lists live keys after a position, in byte order, with values or sizes.
-- ARGV: after ('' = from the start), limit, with_values (0|1), budget_bytes,
-- framing_bytes (what each entry adds to a response besides its key and value).
-- Returns {more, key_1, value_or_size_1, expire_at_1, ...}; more is 1 when
-- keys follow the last one returned. Returns {-1} when a read cannot be served (read_blocked).
local blocked = read_blocked()
if blocked then
  return {-1, blocked}
end
if purge(now_ms()) then
  return {-1, 'missing'}  -- evicted in part: dropped, marker included
end
local after, limit = ARGV[1], tonumber(ARGV[2])
local with_values, budget, framing = ARGV[3] == '1', tonumber(ARGV[4]), tonumber(ARGV[5])
local start = '-'
if after ~= '' then
  start = '(' .. after
end
local keys = redis.call('ZRANGE', K, start, '+', 'BYLEX', 'LIMIT', 0, limit + 1)
local reply = {0}
local used = 0
for i = 1, math.min(#keys, limit) do
  local key = keys[i]
  if with_values then
    local value = redis.call('HGET', D, key)
    local size = #value + #key + framing
    if i > 1 and used + size > budget then
      reply[1] = 1
      return reply
    end
    used = used + size
    reply[#reply + 1] = key
    reply[#reply + 1] = value
  else
    reply[#reply + 1] = key
    reply[#reply + 1] = redis.call('HSTRLEN', D, key)
  end
  reply[#reply + 1] = redis.call('ZSCORE', X, key)
end
if #keys > limit then
  reply[1] = 1
end
return reply
