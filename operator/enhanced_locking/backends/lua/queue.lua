-- queue: the waiters of one key (the caller orders them with the shared service order).
-- KEYS[8..] the key's keys (RedisKeys.of_key); its waiters' records it asks for
-- ARGV[11] lock key  ARGV[12] (optional) only the first this many in the service order
-- returns {now ms, waiter records}, and a third field, why, when one of the key's queues is
--         another Redis type (its waiters cannot be read: the key is answered unreadable)
-- decoded by redis_replies.queue
return run(function()
  expect(key_names, ARGV[11])
  ask()
  local ids, limit = {}, tonumber(ARGV[12] or '')
  if limit then  -- the head of the line: read as a hand-off reads it, O(limit log n)
    local next_waiter = walker(ARGV[11])
    while #ids < limit do
      local entry = next_waiter()
      if not entry then break end
      table.insert(ids, entry.id)
      expect(waiter_name, entry.id)
    end
  else
    for level = 0, 3 do
      for _, member in ipairs(queue_range(ARGV[11], level, 0, -1)) do
        table.insert(ids, member_waiter(member))
        expect(waiter_name, ids[#ids])
      end
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
