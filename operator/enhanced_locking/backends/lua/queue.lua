-- queue: the waiters of one key (the caller orders them with the shared service order).
-- KEYS[8] the key's lock hash
-- ARGV[11] lock key
-- returns {now ms, waiter records}
-- decoded by redis_replies.queue
local records = {}
for level = 0, 3 do
  for _, member in ipairs(redis.call('ZRANGE', queue_name(ARGV[11], level), 0, -1)) do
    local rec = read_waiter(string.sub(member, 18))
    if rec then table.insert(records, rec.flat) end
  end
end
return {NOW, records}
