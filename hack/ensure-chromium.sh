#!/usr/bin/env bash
# Makes sure a headless browser is installed for the console's browser tests: Debian's
# chromium and chromium-driver (the WebDriver the tests drive through selenium). Nothing is
# downloaded outside Debian's packages; nothing is started here.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "chromium is missing: install Debian's chromium and chromium-driver packages" \
       "(apt-get install chromium chromium-driver)" >&2
  exit 1
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
echo "installing chromium and chromium-driver from Debian's packages" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
  chromium chromium-driver fonts-dejavu-core >/dev/null
