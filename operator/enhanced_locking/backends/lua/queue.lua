-- queue: the waiters of one key (the caller orders them with the shared service order).
-- KEYS[8..] the key's keys (RedisKeys.of_key); its waiters' records it asks for
-- ARGV[11] lock key
-- returns {now ms, waiter records}, and a third field, why, when one of the key's queues is
--         another Redis type (its waiters cannot be read: the key is answered unreadable)
-- decoded by redis_replies.queue
return run(function()
  expect(key_names, ARGV[11])
  ask()
  local ids = {}
  for level = 0, 3 do
    for _, member in ipairs(queue_range(ARGV[11], level, 0, -1)) do
      table.insert(ids, string.sub(member, 18))
      expect(waiter_name, ids[#ids])
    end
  end
  ask()
  local records = {}
  for _, id in ipairs(ids) do
    local rec = read_waiter(id)
    if rec then table.insert(records, rec.flat) end
  end
  return {NOW, records, QUEUE_DAMAGE[ARGV[11]] or nil}
end)
