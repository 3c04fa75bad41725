-- wait-graph: every key with waiters, its holders' owners and its waiters, in one snapshot
-- (so deadlock detection sees the waits of every replica at once).
-- KEYS   the seven of lib.lua; every queued key's keys and its waiters it asks for (and,
--        with ARGV[11], every held key's holders)
-- ARGV[11] '1': with concurrency rules, also every held key of a concurrency group, with
--          its holders and what the rules see of them (the deadlock check counts each
--          group's locks and their holders, as the grant step does: `group_counts`)
-- returns {now ms, {{key, first holder repo or '', its pull or '', {waiter ids},
--          {{repo, pull} of every holder}, 1 if it is held shared else 0}...}, waiter records,
--          {{key, {{repo, pull} of every holder}, 1 if held shared else 0, repo, path,
--          workspace}...} (the held keys of the groups; empty without ARGV[11])}
-- decoded by redis_replies.wait_graph
local function main()
  local keys = members(QUEUED)
  for _, k in ipairs(keys) do expect(key_names, k) end
  local grouped = ARGV[11] == '1' and #rules()['c'] > 0
  local held = grouped and members(HELD) or {}
  for _, k in ipairs(held) do
    expect(lock_name, k)
    expect(shared_name, k)
  end
  ask()
  local entries_of = {}
  for _, k in ipairs(keys) do entries_of[k] = expect_queued(k) end
  ask()
  local entries, records, seen = {}, {}, {}
  for _, k in ipairs(keys) do
    local ids = graph_waiters(entries_of[k], seen, records)
    if #ids > 0 then table.insert(entries, graph_entry(k, ids)) end
  end
  local in_groups = {}
  for _, k in ipairs(held) do
    local owners, shared, first = {}, 1, false
    for _, h in ipairs(holders(k)) do
      if not h.bad then
        table.insert(owners, {h[6], h[7]})
        first = first or h
      end
      if h.bad or h[10] ~= 'shared' then shared = 0 end
    end
    if first and #groups_of(k, first[6], first[11], first[12]) > 0 then
      table.insert(in_groups, {k, owners, shared, first[6], first[11], first[12]})
    end
  end
  return {NOW, entries, records, in_groups}
end
return run(main)
