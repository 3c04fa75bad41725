-- luacheck settings for the Redis backend's scripts (operator/enhanced_locking/backends/lua).
-- Redis runs Lua 5.1 with these globals and no others (a script may not create globals).
std = "lua51"
max_line_length = 100
read_globals = {
  "redis", "KEYS", "ARGV",
  "cjson", "cmsgpack", "bit", "struct",
}
