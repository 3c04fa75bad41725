-- luacheck settings for the service's Lua for Redis: operator/enhanced_locking/backends/lua
-- (the function library) and lua/standalone (scripts sent alone, by EVALSHA).
-- Redis runs Lua 5.1 with these globals and no others (a script may not create globals).
std = "lua51"
max_line_length = 100
read_globals = {
  "redis", "KEYS", "ARGV",
  "cjson", "cmsgpack", "bit", "struct",
}
