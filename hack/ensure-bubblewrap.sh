#!/usr/bin/env bash
# Makes sure bubblewrap (bwrap) is installed (Debian's package). The chart's e2e tests run the
# operator the way the image runs it (user 65532, read-only root filesystem, only /data and
# /tmp writable) in a bubblewrap sandbox, since no container engine runs here.
set -euo pipefail
if command -v bwrap >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "bwrap is missing: install Debian's bubblewrap package (apt-get install bubblewrap)" >&2
  exit 1
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
echo "installing bubblewrap from Debian's packages" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq bubblewrap >/dev/null
