#!/bin/sh
# Chromium for the browser tests (tests/browser), from the distribution, where this machine allows
# it: Debian's `chromium` package through apt-get, as root or with sudo that asks no password.
# Elsewhere it prints how to install Chromium and exits 0: the browser tests are then skipped.
# A failed install on a machine that allows it is an error (the tests would silently not run).
# Usage: scripts/install_chromium.sh [path the tests use, default /usr/bin/chromium]
set -e
CHROMIUM="${1:-/usr/bin/chromium}"
HINT="install Chromium (Debian/Ubuntu: apt-get install chromium) or set LLMSYS_CHROMIUM=/path/to/chromium"

if [ -x "$CHROMIUM" ]; then
    echo "browser tests: $CHROMIUM"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "browser tests skipped: no Chromium at $CHROMIUM and no apt-get here; $HINT"
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "browser tests skipped: no Chromium at $CHROMIUM, and installing it needs root; $HINT"
    exit 0
fi
echo "installing the distribution's chromium for the browser tests"
$SUDO apt-get update -qq
if ! apt-cache policy chromium | grep -q 'Candidate: [0-9]'; then
    echo "browser tests skipped: this distribution has no 'chromium' package; $HINT"
    exit 0
fi
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
[ -x "$CHROMIUM" ] || { echo "chromium was installed but $CHROMIUM is missing; set CHROMIUM=/path/to/it" >&2; exit 1; }
echo "browser tests: $CHROMIUM"
