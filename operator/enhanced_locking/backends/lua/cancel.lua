-- cancel: take a waiter out of every queue it is in and tell its replica why; then serve the
-- queues of its keys (the shared requests an exclusive one held back join the shared holders).
-- KEYS[8..] the waiter's record and outcome (and its keys' keys, if known); more it asks for
-- ARGV[11] waiter id  ARGV[12] reason (cancelled, timeout, deadlock, unavailable, limited):
--          with timeout or deadlock the caller is answered with a grant the cancel finds (it
--          hears it), with limited the grant is left as it is (`kept`: its caller hears it),
--          with the others it gives the grant back (its caller went away)
-- ARGV[13] caller ('': any; else only if that caller still owns the waiter, or owned it when
--          it was granted)
-- returns {'removed', waiter record, the waiters its leaving served ({waiter record, locks,
--         fresh} each)}, {'kept', waiter record} (a retry owns it now, or was granted it; or,
--         with limited, it was granted),
--         {'none'}, or, when it had been granted already,
--         {'granted', waiter record, locks it still holds (now confirmed; another waiter's
--         claim on a lock its pull held already only when heard: lib.lua `settle_heard`),
--         fresh 0/1, the keys
--         of those its pull held already, or false when the grant does not say (lib.lua
--         `kept_keys`); a lock the grant made that another answer told its pull it holds
--         is one of them, and given back, one the grant found held goes when its count
--         in `told` was the last (lib.lua `kept_for_others`), the keys of those whose
--         shared hold of its pull the grant upgraded (lib.lua `kept_keys`)}
-- decoded by redis_replies.cancel
local refused = guard()
if refused then return refused end
local function main()
  local id = ARGV[11]
  expect(waiter_names, id, nil)
  local rec = read_waiter(id)
  if rec then
    if ARGV[13] ~= '' and rec['caller'] ~= ARGV[13] then return {'kept', rec.flat} end
    expect(waiter_names, id, rec)
    GONE[id] = true  -- the serving is planned as after it left
    serve(rec.keys, PLAN)
    planned()
    drop_waiter(id, rec, ARGV[12], nil)
    local fx = new_effects()
    serve(rec.keys, fx)
    return {'removed', rec.flat, fx.granted}
  end
  local out = redis.pcall('HMGET', outcome_name(id), 'kind', 'waiter', 'locks', 'fresh')
  if is_error(out) or out[1] ~= 'granted' then return {'none'} end
  local granted_to = cjson.decode(out[2])
  -- A limit lowered (limited) refuses only a waiter still queued: granted first, its caller
  -- hears its grant, which stays as it is.
  if ARGV[12] == 'limited' then return {'kept', granted_to} end
  if ARGV[13] ~= '' then
    for i = 1, #granted_to, 2 do
      if granted_to[i] == 'caller' and granted_to[i + 1] ~= ARGV[13] then
        return {'kept', granted_to}  -- granted to the retry that took it over: its own
      end
    end
  end
  local still, tokens = {}, cjson.decode(out[3])
  -- The wait's end (timeout) and a deadlock refusal answer the caller with the grant; any
  -- other reason is a caller gone, which gives it back.
  local heard = ARGV[12] == 'timeout' or ARGV[12] == 'deadlock'
  for _, pair in ipairs(tokens) do
    expect(lock_name, pair[1])
    expect(shared_name, pair[1])
  end
  planned()
  local kept, upgraded = kept_keys(tokens)
  for _, pair in ipairs(tokens) do
    local holder = holder_with_token(pair[1], pair[2])
    if holder then
      settle_heard(holder, id, heard)
      table.insert(still, holder)
      if kept then kept_for_others(holder, id, pair[3], heard, kept) end
    end
  end
  return {'granted', granted_to, still, fresh_with(tokens, kept, tonumber(out[4]) or 1), kept,
          upgraded}
end
return run(main, true)
