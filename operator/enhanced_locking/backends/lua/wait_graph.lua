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
  for _, k in ipairs(keys) do entries_of[k] = expect_queued(k) end
  ask()
  local entries, records, seen = {}, {}, {}
  for _, k in ipairs(keys) do
    local ids = graph_waiters(entries_of[k], seen, records)
    if #ids > 0 then table.insert(entries, graph_entry(k, ids)) end
  end
  return {NOW, entries, records}
end
return run(main)
