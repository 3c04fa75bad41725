#!/usr/bin/env bash
# Makes sure luacheck is installed (Debian's lua-check package): `make lint` checks the Redis
# backend's Lua scripts with it. Installs only when it is missing.
set -euo pipefail
if command -v luacheck >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "luacheck is missing: install Debian's lua-check package (apt-get install lua-check)" >&2
  exit 1
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
echo "installing luacheck from Debian's packages (lua-check)" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq lua-check >/dev/null
