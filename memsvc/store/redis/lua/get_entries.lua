-- Reads keys in order until the values would pass a byte budget.
-- ARGV: budget_bytes, then the keys.
-- Returns {processed, value_1, expire_at_1, ...} for the first `processed`
-- keys; a missing key has value false (nil) and expire_at false.
-- Returns {-1} when a read cannot be served (read_blocked).
local blocked = read_blocked()
if blocked then
  return {-1, blocked}
end
if purge(now_ms()) then
  return {-1, 'missing'}  -- evicted in part: dropped, marker included
end
local budget = tonumber(ARGV[1])
local used = 0
local found = 0
local reply = {0}
for i = 2, #ARGV do
  local value = redis.call('HGET', D, ARGV[i])
  if value then
    if found > 0 and used + #value > budget then
      break
    end
    used = used + #value
    found = found + 1
    reply[#reply + 1] = value
    reply[#reply + 1] = redis.call('ZSCORE', X, ARGV[i])
  else
    reply[#reply + 1] = false
    reply[#reply + 1] = false
  end
  reply[1] = i - 1
end
return reply
