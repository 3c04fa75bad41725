-- wait-graph: every key with waiters, its holders' owners and its waiters, in one snapshot
-- (so deadlock detection sees the waits of every replica at once).
-- KEYS   the seven of lib.lua; every queued key's keys and its waiters it asks for
-- returns {now ms, {{key, first holder repo or '', its pull or '', {waiter ids},
--          {{repo, pull} of every holder}, 1 if it is held shared else 0}...}, waiter records}
-- decoded by redis_replies.wait_graph
local function main()
  local keys = members(QUEUED)
  for _, k in ipairs(keys) do expect(key_names, k) end
  ask()
  local entries_of = {}
  for _, k in ipairs(keys) do
    entries_of[k] = {}
    for level = 0, 3 do
      for _, member in ipairs(queue_range(k, level, 0, -1)) do  -- another type: skipped
        table.insert(entries_of[k], member)
        expect(waiter_name, string.sub(member, 18))
      end
    end
  end
  ask()
  local entries, records, seen = {}, {}, {}
  for _, k in ipairs(keys) do
    local ids = {}
    for _, member in ipairs(entries_of[k]) do
      local id = string.sub(member, 18)
      if not seen[id] then
        local rec = read_waiter(id)
        seen[id] = rec or false
        if rec then table.insert(records, rec.flat) end
      end
      if seen[id] then table.insert(ids, id) end
    end
    if #ids > 0 then
      local owners, shared = {}, 1
      for _, h in ipairs(holders(k)) do
        if not h.bad then table.insert(owners, {h[6], h[7]}) end  -- an unreadable one: unknown
        if h.bad or h[10] ~= 'shared' then shared = 0 end
      end
      if #owners > 0 then
        table.insert(entries, {k, owners[1][1], owners[1][2], ids, owners, shared})
      else
        table.insert(entries, {k, '', '', ids, owners, 0})
      end
    end
  end
  return {NOW, entries, records}
end
return run(main)
