#!/usr/bin/env bash
# scripts/setup.sh: get a machine ready to build, test and demo athena_deferred.
#
# Idempotent.  Can be run directly or sourced; sourcing also gives the
# caller PATH, PG_BINDIR, PG_CONFIG, PGXS_DIR, REPO_ROOT and the helpers
# as_root / as_test_user / test_user_name.  With SETUP_SH_DEFINE_ONLY=1 a
# sourcing script gets only those definitions and no setup is run
# (scripts/test.sh uses that, then runs this file as its own process so that
# it can report a failed setup instead of dying with it).
#
#   1. installs the Debian packages that are missing (only then does it touch
#      the network: apt-get update + apt-get install), as root or via sudo;
#   2. builds the extension (make) and installs it (make install) into the
#      PostgreSQL 15 server from the Debian packages;
#   3. puts /usr/lib/postgresql/15/bin first in PATH.

set -euo pipefail

PG_MAJOR=15
PG_BINDIR=/usr/lib/postgresql/${PG_MAJOR}/bin
PG_CONFIG=${PG_BINDIR}/pg_config
# shellcheck disable=SC2034  # used by the scripts that source this file
PGXS_DIR=/usr/lib/postgresql/${PG_MAJOR}/lib/pgxs
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="${PG_BINDIR}:${PATH}"

SETUP_PACKAGES=(
    "postgresql-${PG_MAJOR}"
    "postgresql-server-dev-${PG_MAJOR}"
    libjansson-dev
    libipc-run-perl
    build-essential
    make
    gcc
    python3
    python3-psycopg
    clang-14
    libclang-rt-14-dev
)

# Run a command as root: directly if we are root, through sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "setup.sh: need root (or sudo) to run: $*" >&2
        return 1
    fi
}

# Run a command as the user that owns test clusters.  initdb refuses to run
# as root, so root hands over to the postgres account; any other user runs
# its clusters itself.
as_test_user() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# Name of that user, for chown.
test_user_name() {
    if [ "$(id -u)" -eq 0 ]; then echo postgres; else id -un; fi
}

setup_packages() {
    local missing=() pkg
    for pkg in "${SETUP_PACKAGES[@]}"; do
        # dpkg -s alone also succeeds for removed packages whose config
        # files remain, so look at the status itself.
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        echo "setup: all required packages are installed"
        return 0
    fi
    echo "setup: installing missing packages: ${missing[*]}"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}"
}

setup_build() {
    echo "setup: building and installing athena_deferred"
    make -C "$REPO_ROOT" -s PG_CONFIG="$PG_CONFIG"
    local pkglibdir sharedir
    pkglibdir=$("$PG_CONFIG" --pkglibdir)
    sharedir=$("$PG_CONFIG" --sharedir)
    if [ -w "$pkglibdir" ] && [ -w "$sharedir/extension" ]; then
        make -C "$REPO_ROOT" -s PG_CONFIG="$PG_CONFIG" install
    else
        as_root make -C "$REPO_ROOT" -s PG_CONFIG="$PG_CONFIG" install
    fi
}

setup_main() {
    setup_packages
    if [ ! -x "$PG_CONFIG" ]; then
        echo "setup: $PG_CONFIG not found after installing packages" >&2
        return 1
    fi
    setup_build
    echo "setup: done ($("$PG_BINDIR/postgres" --version))"
}

if [ "${SETUP_SH_DEFINE_ONLY:-0}" != 1 ]; then
    setup_main
fi
