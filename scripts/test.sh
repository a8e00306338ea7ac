#!/usr/bin/env bash
# scripts/test.sh: build, install and run every test suite of athena_deferred.
#
#   pg_regress tests   sql/*.sql    + expected/*.out  (one unit per test)
#   isolation specs    specs/*.spec + expected/*.out  (one unit per spec)
#   TAP tests          t/*.pl                          (one unit per FILE:
#                      a file passes when all of its assertions pass and it
#                      exits cleanly; assertions are not counted one by one)
#
# pg_regress and pg_isolation_regress are called directly (not through
# `make installcheck`, which stops at the first failing suite), with the
# test lists, order and options the Makefile defines, as PGXS computes them:
# REGRESS + REGRESS_OPTS (with the --dbname PGXS adds), ISOLATION +
# ISOLATION_OPTS.  TAP files run like the PGXS prove_installcheck macro.
#
# The suites run in a copy of the working tree (without .git) in a temporary
# directory owned by the postgres user (initdb refuses root), so the
# repository itself is left untouched.  Each server is a throwaway instance
# listening on a Unix socket only.
#
# The last line printed is always "N passed, N failed" over all suites.  The
# exit status is non-zero if anything failed, including a suite that could
# not run at all (it counts as failed, never as passed) and an empty sql/.
#
# t/021_disk_faults.pl fills a filesystem on purpose.  Run as root, this
# script mounts a small tmpfs for it (SMALL_FS_SIZE, owned by the test user,
# mode 0700), passes its path in ATHENA_TEST_SMALL_FS and unmounts it on
# exit, whatever happened.  Not root, it passes ATHENA_TEST_SMALL_FS on as
# the caller set it (a small filesystem of their own); without one that
# test fails, saying why.
#
# TAP_ONLY="t/021_disk_faults.pl ..." runs only those TAP files (for
# development): pg_regress, isolation and fuzz are then not run, and the
# count covers only those files.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=setup.sh
SETUP_SH_DEFINE_ONLY=1 source "$SCRIPT_DIR/setup.sh"

# Time limits (seconds): per suite run, and for all suites together, so that
# a hung test cannot keep CI waiting (the whole run must stay under 15 min).
SUITE_TIMEOUT=${SUITE_TIMEOUT:-300}
TOTAL_BUDGET=${TOTAL_BUDGET:-720}

TOTAL_PASSED=0
TOTAL_FAILED=0
WORK=
SMALL_FS=           # the tmpfs this script mounted, if any
SMALL_FS_SIZE=${SMALL_FS_SIZE:-8m}
FAILED_SUITES=()    # pg_regress / isolation, when they had failures
FAILED_TAP=()       # TAP files that failed

finish() {
    echo "$TOTAL_PASSED passed, $TOTAL_FAILED failed"
    if [ "$TOTAL_FAILED" -ne 0 ]; then exit 1; fi
    exit 0
}

# Stop any server a killed or crashed suite left behind in the work dir,
# then remove the work dir.  Silent: the count line must stay the last one.
# shellcheck disable=SC2317  # invoked by trap
cleanup() {
    local pidfile
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        while IFS= read -r pidfile; do
            as_test_user "$PG_BINDIR/pg_ctl" -D "$(dirname "$pidfile")" \
                -m immediate -w stop >/dev/null 2>&1 || true
        done < <(find "$WORK" -name postmaster.pid 2>/dev/null)
        # the servers are gone, so nothing keeps the tmpfs busy; lazily
        # detach it if something still does, so that rm never crosses it
        if [ -n "$SMALL_FS" ] && mountpoint -q "$SMALL_FS"; then
            umount "$SMALL_FS" 2>/dev/null || umount -l "$SMALL_FS" 2>/dev/null || true
        fi
        if [ -n "$SMALL_FS" ] && mountpoint -q "$SMALL_FS"; then
            echo "warning: could not unmount $SMALL_FS; $WORK left in place" >&2
        else
            rm -rf "$WORK"
        fi
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- setup
echo "=== setup (packages, make, make install)"
if ! bash "$SCRIPT_DIR/setup.sh"; then
    echo "setup failed: the extension could not be built or installed; no suite ran"
    TOTAL_FAILED=$((TOTAL_FAILED + 1))
    finish
fi

if [ "$(id -u)" -ne 0 ] && [ "$(id -un)" != postgres ]; then
    echo "note: not root, running the test servers as $(id -un)"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/athena_deferred_test.XXXXXX")
SRC="$WORK/src"
mkdir "$SRC"
# The working tree as it is (tracked or not), minus .git and test leftovers.
tar -C "$REPO_ROOT" \
    --exclude=./.git --exclude=./fuzz/build \
    --exclude='./tmp_*' \
    --exclude=./results --exclude=./output_iso \
    --exclude=./regression.diffs --exclude=./regression.out \
    -cf - . | tar -C "$SRC" -xf -
chown -R "$(test_user_name)" "$WORK"
cd "$SRC"

# ---------------------------------------------------------------- small fs
if [ "$(id -u)" -eq 0 ]; then
    mkdir "$WORK/small_fs"
    if mount -t tmpfs -o "size=$SMALL_FS_SIZE,mode=0700,uid=$(id -u postgres),gid=$(id -g postgres)" \
            athena_deferred_test "$WORK/small_fs"; then
        SMALL_FS="$WORK/small_fs"
        ATHENA_TEST_SMALL_FS=$SMALL_FS
        echo "small filesystem for the disk fault tests: tmpfs of $SMALL_FS_SIZE on $SMALL_FS"
    else
        echo "*** could not mount a tmpfs on $WORK/small_fs: t/021_disk_faults.pl will fail"
        ATHENA_TEST_SMALL_FS=
    fi
elif [ -z "${ATHENA_TEST_SMALL_FS:-}" ]; then
    echo "note: not root and ATHENA_TEST_SMALL_FS not set: t/021_disk_faults.pl will fail"
fi

START=$(date +%s)

# Seconds a suite may still use: the smaller of SUITE_TIMEOUT and what is
# left of TOTAL_BUDGET (at least 1).
time_left() {
    local left=$((TOTAL_BUDGET - ($(date +%s) - START)))
    if [ "$left" -gt "$SUITE_TIMEOUT" ]; then left=$SUITE_TIMEOUT; fi
    if [ "$left" -lt 1 ]; then left=1; fi
    echo "$left"
}

# run_logged LOG CMD...: runs CMD as the test user under a time limit, in
# the work copy, output to stdout and LOG; sets RUN_RC.
run_logged() {
    local log=$1
    shift
    set +e
    as_test_user env PATH="$PG_BINDIR:$SRC:$PATH" \
        timeout --kill-after=20 "$(time_left)" "$@" 2>&1 | tee "$log"
    RUN_RC=${PIPESTATUS[0]}
    set -e
    if [ "$RUN_RC" -eq 124 ] || [ "$RUN_RC" -eq 137 ]; then
        echo "*** timed out"
    fi
}

# count_results LOG REQUESTED SUITE: pg_regress and pg_isolation_regress
# print one line per test ending in "... ok" or "... FAILED"/"failed"
# (optionally followed by a duration), e.g.
#   test basic                        ... ok           12 ms
#   ok 1         - basic              12 ms     (later versions)
# Tests that printed no "ok" line count as failed, and so does a run that
# exited non-zero with nothing failed (e.g. the instance did not start).
count_results() {
    local log=$1 requested=$2 suite=$3 ok failed
    # only lines after the driver's "running regression test queries" banner
    ok=$(awk '/running regression test queries/ { on = 1; next }
              on && (/^[ \t]*(test[ \t]+)?[^ \t]+[ \t]+\.\.\.[ \t]+ok([ \t]|$)/ ||
                     /^ok [0-9]+ /) { n++ }
              END { print n + 0 }' "$log")
    if [ "$ok" -gt "$requested" ]; then ok=$requested; fi
    failed=$((requested - ok))
    if [ "$RUN_RC" -ne 0 ] && [ "$failed" -eq 0 ]; then
        echo "*** $suite exited with status $RUN_RC"
        failed=1
    fi
    echo "--- $suite: $ok passed, $failed failed"
    if [ "$failed" -ne 0 ]; then FAILED_SUITES+=("$suite"); fi
    TOTAL_PASSED=$((TOTAL_PASSED + ok))
    TOTAL_FAILED=$((TOTAL_FAILED + failed))
}

# make_var NAME...: the values of Makefile variables, one line each, as PGXS
# computes them (so REGRESS_OPTS includes the --dbname PGXS adds).  The
# suites run exactly the tests, order and options `make installcheck` uses.
make_var() {
    local v args=()
    for v in "$@"; do args+=("print-$v"); done
    # shellcheck disable=SC2016  # $($*) is for make, not the shell
    printf 'print-%%:\n\t@echo $($*)\n' |
        make -s --no-print-directory PG_CONFIG="$PG_CONFIG" \
            -f Makefile -f - "${args[@]}"
}

# opt_value NAME OPTS...: value of --NAME=value among OPTS (empty if absent).
opt_value() {
    local name=$1 o
    shift
    for o in "$@"; do
        case $o in --"$name"=*) echo "${o#--"$name"=}"; return 0 ;; esac
    done
}

# run_suite LABEL DRIVER OUTPUTDIR DEFAULT_INSTANCE TESTS_VAR OPTS_VAR
run_suite() {
    local label=$1 driver=$2 outputdir=$3 default_instance=$4 tests opts conf
    local -a test_list opt_list extra
    tests=$5
    opts=$6
    read -r -a test_list <<<"$tests"
    read -r -a opt_list <<<"$opts $LOCALE_FLAGS ${EXTRA_REGRESS_OPTS:-}"
    echo
    echo "=== $label: ${#test_list[@]} test(s): ${test_list[*]}"
    if [ "${#test_list[@]}" -eq 0 ]; then
        return 1
    fi
    extra=()
    if [ -z "$(opt_value temp-instance "${opt_list[@]}")" ]; then
        extra+=("--temp-instance=$default_instance")
    fi
    conf=$(opt_value temp-config "${opt_list[@]}")
    if [ -n "$conf" ] && [ ! -f "$conf" ]; then
        echo "*** $conf (--temp-config) does not exist"
    fi
    run_logged "$WORK/$label.log" "$driver" \
        --bindir="$PG_BINDIR" --inputdir=. --outputdir="$outputdir" \
        "${extra[@]}" "${opt_list[@]}" "${test_list[@]}"
    count_results "$WORK/$label.log" "${#test_list[@]}" "$label"
}

# Files that exist but that the Makefile does not list do not run: say so.
warn_unlisted() {
    local dir=$1 ext=$2 listed=" $3 " f n
    for f in "$dir"/*."$ext"; do
        [ -e "$f" ] || continue
        n=${f##*/}
        n=${n%."$ext"}
        case $listed in
            *" $n "*) ;;
            *) echo "warning: $f is not listed in the Makefile and does not run" ;;
        esac
    done
}

if ! mapfile -t MAKE_VARS < <(make_var REGRESS REGRESS_OPTS ISOLATION ISOLATION_OPTS \
        pg_regress_locale_flags TAP_TESTS) || [ "${#MAKE_VARS[@]}" -ne 6 ]; then
    echo "*** could not read the test settings from the Makefile; no suite ran"
    TOTAL_FAILED=$((TOTAL_FAILED + 1))
    finish
fi
REGRESS=${MAKE_VARS[0]}
REGRESS_OPTS=${MAKE_VARS[1]}
ISOLATION=${MAKE_VARS[2]}
ISOLATION_OPTS=${MAKE_VARS[3]}
LOCALE_FLAGS=${MAKE_VARS[4]}

# ---------------------------------------------------------------- pg_regress
if [ -n "${TAP_ONLY:-}" ]; then
    echo
    echo "=== TAP_ONLY is set: pg_regress, isolation and fuzz are not run"
else
    warn_unlisted sql sql "$REGRESS"
    if ! run_suite pg_regress "$PGXS_DIR/src/test/regress/pg_regress" . \
            tmp_regress "$REGRESS" "$REGRESS_OPTS"; then
        echo "*** no pg_regress tests (REGRESS in the Makefile, sql/): counted as a failure"
        TOTAL_FAILED=$((TOTAL_FAILED + 1))
    fi

# ---------------------------------------------------------------- isolation
    warn_unlisted specs spec "$ISOLATION"
    if ! run_suite isolation "$PGXS_DIR/src/test/isolation/pg_isolation_regress" \
            output_iso tmp_isolation "$ISOLATION" "$ISOLATION_OPTS"; then
        echo "(no isolation specs, skipped)"
    fi
fi  # TAP_ONLY

# ---------------------------------------------------------------- TAP
# Same environment as the PGXS prove_installcheck macro: TESTDIR (logs go to
# $TESTDIR/tmp_check/log), PG bin dir first in PATH, PGPORT, PG_REGRESS.
# PG_TEST_TIMEOUT_DEFAULT (poll timeouts) is 90 s rather than 180 s, so a
# stuck test fails within the time budget and lets the others run.
# prove runs once per file so that each file gets its own verdict.
TAP_FILES=()
if [ -n "${TAP_ONLY:-}" ]; then
    read -r -a TAP_FILES <<<"$TAP_ONLY"
    for f in "${TAP_FILES[@]}"; do
        if [ ! -e "$f" ]; then
            echo "*** TAP_ONLY: $f does not exist"
            TOTAL_FAILED=$((TOTAL_FAILED + 1))
            finish
        fi
    done
else
    for f in t/*.pl; do
        [ -e "$f" ] && TAP_FILES+=("$f")
    done
fi
echo
echo "=== TAP: ${#TAP_FILES[@]} file(s)"
if [ "${#TAP_FILES[@]}" -ne 0 ] && [ -z "${MAKE_VARS[5]}" ]; then
    echo "warning: TAP_TESTS is not set in the Makefile (make installcheck would skip t/); running them anyway"
fi
if [ "${#TAP_FILES[@]}" -eq 0 ]; then
    echo "(no t/*.pl, skipped)"
else
    rm -rf tmp_check
    as_test_user mkdir -p tmp_check
    tap_passed=0
    tap_failed=0
    for f in "${TAP_FILES[@]}"; do
        run_logged "$WORK/tap.log" \
            env TESTDIR="$SRC" PGPORT=65432 \
            ATHENA_TEST_SMALL_FS="${ATHENA_TEST_SMALL_FS:-}" \
            PG_TEST_TIMEOUT_DEFAULT="${PG_TEST_TIMEOUT_DEFAULT:-90}" \
            PG_REGRESS="$PGXS_DIR/src/test/regress/pg_regress" \
            prove -I "$PGXS_DIR/src/test/perl/" -I . -I t "$f"
        if [ "$RUN_RC" -eq 0 ]; then
            tap_passed=$((tap_passed + 1))
        else
            tap_failed=$((tap_failed + 1))
            FAILED_TAP+=("$f")
        fi
    done
    echo "--- TAP: $tap_passed passed, $tap_failed failed (unit: test file)"
    TOTAL_PASSED=$((TOTAL_PASSED + tap_passed))
    TOTAL_FAILED=$((TOTAL_FAILED + tap_failed))
fi

# ---------------------------------------------------------------- fuzz
# The WAL segment reader under libFuzzer for a bounded time (scripts/fuzz.sh,
# fuzz/README.md): one unit, failed when a target finds a crash, a hang, a
# leak or a broken check, or cannot be built.  No server is involved, so it
# runs as the invoking user (root in CI), with its build in the work dir.
FUZZ_SECONDS=${FUZZ_SECONDS:-30}
if [ -z "${TAP_ONLY:-}" ]; then
    echo
    echo "=== fuzz: WAL reader, ${FUZZ_SECONDS} s per target"
    set +e
    FUZZ_BUILD_DIR="$WORK/fuzz" timeout --kill-after=20 $((FUZZ_SECONDS + 180)) \
        bash "$SRC/scripts/fuzz.sh" "$FUZZ_SECONDS" 2>&1 | tee "$WORK/fuzz.log"
    FUZZ_RC=${PIPESTATUS[0]}
    set -e
    if [ "$FUZZ_RC" -eq 0 ]; then
        echo "--- fuzz: 1 passed, 0 failed"
        TOTAL_PASSED=$((TOTAL_PASSED + 1))
    else
        if [ "$FUZZ_RC" -eq 124 ] || [ "$FUZZ_RC" -eq 137 ]; then
            echo "*** timed out"
        fi
        echo "--- fuzz: 0 passed, 1 failed (exit $FUZZ_RC; run scripts/fuzz.sh to reproduce)"
        TOTAL_FAILED=$((TOTAL_FAILED + 1))
    fi
fi  # TAP_ONLY

# ---------------------------------------------------------------- report
# Why things failed, for CI logs: diffs, server logs, TAP logs.
show() {
    if [ -s "$2" ]; then
        echo
        echo "=== $1 $2"
        if [ "$1" = tail ]; then tail -n "$3" "$2"; else cat "$2"; fi
    fi
}
for suite in "${FAILED_SUITES[@]}"; do
    case $suite in
        pg_regress)
            show diffs regression.diffs
            show tail log/postmaster.log 40 ;;
        isolation)
            show diffs output_iso/regression.diffs
            show tail output_iso/log/postmaster.log 40 ;;
    esac
done
for f in "${FAILED_TAP[@]}"; do
    name=$(basename "$f" .pl)
    for l in tmp_check/log/regress_log_"$name" tmp_check/log/"$name"_*.log; do
        show tail "$l" 80
    done
done
if [ "$TOTAL_FAILED" -ne 0 ]; then echo; fi
finish
