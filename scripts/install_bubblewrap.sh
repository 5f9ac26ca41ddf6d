#!/bin/sh
# bubblewrap (bwrap) for the grader's per-submission sandbox (llmsys_lab/grading/sandbox.py), from the
# distribution, where this machine allows it: Debian's `bubblewrap` through apt-get, as root or with sudo
# that asks no password. Elsewhere it prints how to install it and exits 0: the sandbox tests are then
# skipped and the grader refuses official grades (--unsafe grades anyway, labelled).
# A failed install on a machine that allows it is an error.
set -e
HINT="install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)"

if command -v bwrap >/dev/null 2>&1; then
    echo "grading sandbox: $(command -v bwrap)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "grading sandbox unavailable: no bwrap and no apt-get here; $HINT"
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "grading sandbox unavailable: no bwrap, and installing it needs root; $HINT"
    exit 0
fi
echo "installing the distribution's bubblewrap for the grading sandbox"
$SUDO apt-get update -qq
if ! apt-cache policy bubblewrap | grep -q 'Candidate: [0-9]'; then
    echo "grading sandbox unavailable: this distribution has no 'bubblewrap' package; $HINT"
    exit 0
fi
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
command -v bwrap >/dev/null 2>&1 || { echo "bubblewrap was installed but bwrap is not on PATH" >&2; exit 1; }
echo "grading sandbox: $(command -v bwrap)"
