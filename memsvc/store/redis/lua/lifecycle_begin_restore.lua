-- Lifecycle step 1 of Resume (ADR 0004): build the resumed working memory in
-- the staging keys, leaving the live ones untouched, and set the 'resuming'
-- marker (writes refused). Step 3 swaps staging into live with RENAME.
-- KEYS[5..7]: staging D', X', K'.
-- ARGV: op, next_epoch, merge ('0'|'1'), max_keys, max_bytes, allowed states
-- (comma-separated; 'missing' allows a lost working memory), the checkpoint
-- as one string in its stored format (memsvc/domain/_snapshot.py), parsed here
-- so that no argument per key crosses the wire ('' when memsvc did not read
-- it), then the held checkpoint: id ('' for none), key count, bytes, and the
-- session's memory epoch (a marker of another epoch is an older copy: not kept).
-- A paused memory that still holds the held checkpoint (the Pause that took it
-- set the marker, no key can expire, count and size match) is not rebuilt: its
-- keys are renamed into staging as they are (O(1)) and 'kept' is set, so that
-- lifecycle_finish swaps them back as usual and lifecycle_abort renames them
-- back instead of dropping them.
-- Returns {'ok', key_count}, {'state', state},
-- {'limit', 'keys'|'bytes', limit, current, requested}, {'contents'} (nothing
-- changed) when the memory does not hold the checkpoint and no contents came,
-- or {'late'} (nothing changed) for a step of an operation already settled.
local SD, SX, SK = KEYS[5], KEYS[6], KEYS[7]
if already_settled(ARGV[1]) then
  return {'late'}
end
local now = now_ms()
purge(now)
local state = redis.call('HGET', M, 'state') or 'missing'
if not string.find(',' .. ARGV[6] .. ',', ',' .. state .. ',', 1, true) then
  return {'state', state}
end
redis.call('DEL', SD, SX, SK)
local held_count, held_bytes = tonumber(ARGV[9]), tonumber(ARGV[10])
local current_bytes = tonumber(redis.call('HGET', M, 'bytes') or '0')
local marker_epoch = redis.call('HGET', M, 'epoch')
if ARGV[8] ~= '' and state == 'paused' and redis.call('HGET', M, 'snapshot') == ARGV[8]
    and (ARGV[11] == '' or not marker_epoch or marker_epoch == ARGV[11])
    and redis.call('EXISTS', X) == 0 and redis.call('HLEN', D) == held_count
    and redis.call('ZCARD', K) == held_count and current_bytes == held_bytes
    and held_count <= tonumber(ARGV[4]) and held_bytes <= tonumber(ARGV[5]) then
  if held_count > 0 then
    redis.call('RENAME', D, SD)
    redis.call('RENAME', K, SK)
  end
  redis.call('HSET', M, 'state', 'resuming', 'op', ARGV[1], 'prior', state,
    'next_epoch', ARGV[2], 'staged_bytes', held_bytes, 'kept', '1')
  return {'ok', held_count}
end
if ARGV[7] == '' then
  return {'contents'}
end
local bytes = 0
if ARGV[3] == '1' and redis.call('EXISTS', D) == 1 then
  redis.call('COPY', D, SD)
  redis.call('COPY', K, SK)
  if redis.call('EXISTS', X) == 1 then
    redis.call('COPY', X, SX)
  end
  -- COPY keeps the live keys' expiry (set when every live key has a TTL), but
  -- the checkpoint's entries land in staging too: it must not expire with
  -- them. Step 3 sets the session's expiry again after the swap.
  redis.call('PERSIST', SD)
  redis.call('PERSIST', SK)
  redis.call('PERSIST', SX)
  bytes = tonumber(redis.call('HGET', M, 'bytes') or '0')
end
local blob = ARGV[7]
local entries, pos = struct.unpack('<I4', blob, 5)
local fields, lex, timed = {}, {}, {}
-- Lengths kept in locals: '#t' searches for the table's border on every append.
local n_fields, n_lex, n_timed = 0, 0, 0
local merging = ARGV[3] == '1'
local key, value, ttl
for _ = 1, entries do
  -- One call per entry: 'c0' reads a string whose length is the preceding u32.
  key, value, ttl, pos = struct.unpack('<I4c0I4c0i8', blob, pos)
  if merging then
    local old = redis.call('HSTRLEN', SD, key)
    if old > 0 then
      bytes = bytes - #key - old
    end
  end
  bytes = bytes + #key + #value
  fields[n_fields + 1] = key
  fields[n_fields + 2] = value
  n_fields = n_fields + 2
  -- The score as a string: a Lua number is formatted with '%.17g' for every member.
  lex[n_lex + 1] = '0'
  lex[n_lex + 2] = key
  n_lex = n_lex + 2
  if ttl >= 0 then
    timed[n_timed + 1] = now + math.max(1, ttl)
    timed[n_timed + 2] = key
    n_timed = n_timed + 2
  elseif merging then
    redis.call('ZREM', SX, key)
  end
end
-- Written in chunks: one command per 500 entries, not one per key.
local function in_chunks(command, target, items, width)
  local step = 500 * width
  for i = 1, #items, step do
    redis.call(command, target, unpack(items, i, math.min(i + step - 1, #items)))
  end
end
in_chunks('HSET', SD, fields, 2)
in_chunks('ZADD', SK, lex, 2)
in_chunks('ZADD', SX, timed, 2)
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
