#!/bin/sh
# A tool the test suite needs, from the distribution, where this machine allows it: a Debian package
# through apt-get, as root or with sudo that asks no password. Elsewhere it prints how to install the
# tool and exits 0: the tests that need it are then skipped (the caller says which, and how it shows).
# A failed install on a machine that allows it is an error (the tests would silently not run).
# Used by `make browser-deps` (Chromium for tests/browser) and `make sandbox-deps` (bubblewrap for
# the grader's per-submission sandbox, llmsys_lab/grading/sandbox.py).
# Usage: scripts/install_debian_package.sh PACKAGE TOOL PURPOSE HINT
#   TOOL: a path (/usr/bin/chromium) or a command name looked up on PATH (bwrap)
set -e
PACKAGE="$1"; TOOL="$2"; PURPOSE="$3"; HINT="$4"
[ -n "$PACKAGE" ] && [ -n "$TOOL" ] && [ -n "$PURPOSE" ] || { echo "usage: $0 PACKAGE TOOL PURPOSE HINT" >&2; exit 2; }

found() {
    case "$TOOL" in
        */*) [ -x "$TOOL" ] && echo "$TOOL" ;;
        *) command -v "$TOOL" 2>/dev/null ;;
    esac
}

if where=$(found); then
    echo "$PURPOSE: $where"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "$PURPOSE unavailable: no $TOOL and no apt-get here; $HINT"
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "$PURPOSE unavailable: no $TOOL, and installing it needs root; $HINT"
    exit 0
fi
echo "installing the distribution's $PACKAGE for the $PURPOSE"
$SUDO apt-get update -qq
if ! apt-cache policy "$PACKAGE" | grep -q 'Candidate: [0-9]'; then
    echo "$PURPOSE unavailable: this distribution has no '$PACKAGE' package; $HINT"
    exit 0
fi
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$PACKAGE" >/dev/null
where=$(found) || { echo "$PACKAGE was installed but $TOOL is missing" >&2; exit 1; }
echo "$PURPOSE: $where"
