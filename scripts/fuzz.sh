#!/usr/bin/env bash
# scripts/fuzz.sh: fuzz the WAL segment reader (src/wal_format.c) with libFuzzer.
#
#   scripts/fuzz.sh [SECONDS]     build, then fuzz both targets for SECONDS
#                                 each, side by side (default 600)
#   scripts/fuzz.sh build         build only
#   scripts/fuzz.sh repro FILE... run inputs once through the target they
#                                 belong to (framed-* artifacts and files in
#                                 a framed/ folder: framed; others: raw)
#   scripts/fuzz.sh seeds         rewrite fuzz/corpus/ with fuzz/wal_seed_gen.c
#
# Targets (fuzz/wal_reader_fuzz.c says what each checks):
#   raw     wal_reader_fuzz: the input is a segment file
#   framed  wal_framed_fuzz: the input describes a segment built with
#           wal_record_frame() (valid checksums, so payloads reach jansson)
#
# Both are built with clang-14 -fsanitize=fuzzer,address,undefined (Debian
# packages clang-14 and libclang-rt-14-dev, in scripts/setup.sh).  Limits:
# -timeout=5 (a hang), -rss_limit_mb=512 and -malloc_limit_mb=256 (unbounded
# allocation), LeakSanitizer (a record the reader leaks), inputs up to 1 MiB.
#
# Each target starts from fuzz/corpus/<target>/ (the seeds, written by
# "scripts/fuzz.sh seeds"), fuzz/regressions/<target>/ (inputs that once
# failed: each must pass before fuzzing starts) and
# $FUZZ_BUILD_DIR/corpus-<target>/ (what earlier runs found, kept between
# runs, the only one written).  A finding is written to
# $FUZZ_BUILD_DIR/artifacts/<target>-{crash,timeout,oom,leak}-*; the run
# goes on with the other target and fails at the end.
#
# Environment:
#   FUZZ_BUILD_DIR  where binaries, corpora, logs and artifacts go
#                   (default fuzz/build, git-ignored)
#   FUZZ_TARGETS    which targets to run (default "raw framed")
#   WAL_FUZZ_SKIP   checks of the harness to skip, comma-separated, to fuzz
#                   past a known finding (e.g. range,torn)
#   CC              compiler (default clang-14)
#
# Exit status: 0 when no target found anything; 1 on a finding; 2 when the
# targets could not be built.  The last line is "fuzz: all N targets passed"
# or "fuzz: N of M targets failed" (not in the "N passed, N failed" form, so
# that it is never taken for the closing line of scripts/test.sh).

set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FUZZ_DIR="$REPO_ROOT/fuzz"
BUILD=${FUZZ_BUILD_DIR:-$FUZZ_DIR/build}
TARGETS=${FUZZ_TARGETS:-raw framed}
CC=${CC:-clang-14}
PG_INCLUDE_SERVER=/usr/include/postgresql/15/server
PG_LIBDIR=/usr/lib/postgresql/15/lib

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

build() {
    local flags=(-g -O1 -fno-omit-frame-pointer -fno-sanitize-recover=all
                 -Wall -Wextra -Werror -I "$REPO_ROOT/src" -isystem "$PG_INCLUDE_SERVER")
    local srcs=("$REPO_ROOT/src/wal_format.c" "$FUZZ_DIR/wal_reader_fuzz.c" "$FUZZ_DIR/crc32c.c")

    if ! command -v "$CC" >/dev/null 2>&1; then
        echo "fuzz: $CC not found (Debian package clang-14; scripts/setup.sh installs it)" >&2
        return 1
    fi
    # (explicit returns: set -e does not apply in "if ! build")
    mkdir -p "$BUILD" || return 1
    rm -f "$BUILD/wal_reader_fuzz" "$BUILD/wal_framed_fuzz"
    "$CC" "${flags[@]}" -fsanitize=fuzzer,address,undefined \
        "${srcs[@]}" -ljansson -o "$BUILD/wal_reader_fuzz" || return 1
    "$CC" "${flags[@]}" -fsanitize=fuzzer,address,undefined -DWAL_FUZZ_FRAMED \
        "${srcs[@]}" -ljansson -o "$BUILD/wal_framed_fuzz" || return 1
    echo "fuzz: built $BUILD/wal_reader_fuzz and $BUILD/wal_framed_fuzz"
}

binary_of() {
    case $1 in
        raw) echo "$BUILD/wal_reader_fuzz" ;;
        framed) echo "$BUILD/wal_framed_fuzz" ;;
        *) echo "fuzz: unknown target $1 (raw, framed)" >&2; return 1 ;;
    esac
}

# the libFuzzer options of a target, for a run of $1 seconds
options_of() {
    local opts=(-max_total_time="$2" -timeout=5 -rss_limit_mb=512 -malloc_limit_mb=256
                -print_final_stats=1 -artifact_prefix="$BUILD/artifacts/$1-")
    case $1 in
        raw) opts+=(-max_len=1048576 -dict="$FUZZ_DIR/wal.dict" -use_value_profile=1) ;;
        framed) opts+=(-max_len=65536) ;;
    esac
    printf '%s\n' "${opts[@]}"
}

# fuzz TARGET SECONDS: runs in the background, log in $BUILD/<target>.log
fuzz_one() {
    local target=$1 seconds=$2 bin opts dirs
    bin=$(binary_of "$target")
    mapfile -t opts < <(options_of "$target" "$seconds")
    mkdir -p "$BUILD/corpus-$target" "$BUILD/artifacts"
    dirs=("$BUILD/corpus-$target" "$FUZZ_DIR/corpus/$target")
    if [ -d "$FUZZ_DIR/regressions/$target" ]; then
        dirs+=("$FUZZ_DIR/regressions/$target")
    fi
    # a hard stop well after libFuzzer's own, in case it cannot stop itself
    timeout --kill-after=10 $((seconds + 60)) \
        "$bin" "${opts[@]}" "${dirs[@]}" >"$BUILD/$target.log" 2>&1
}

# one line about a finished run: executions, coverage, verdict
report_one() {
    local target=$1 rc=$2 log="$BUILD/$1.log" runs cov artifact
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    cov=$(grep -E '^#[0-9]+' "$log" | tail -n 1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*' || true)
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    if [ "$rc" -eq 0 ]; then
        echo "fuzz $target: ok, ${runs:-?} executions, ${cov:-no coverage line}"
        return 0
    fi
    echo "fuzz $target: FAILED (exit $rc) after ${runs:-?} executions, ${cov:-no coverage line}"
    grep -E '^\*\*\* wal_reader_fuzz|^==[0-9]+==ERROR|^SUMMARY|ALARM|out-of-memory|malloc\(' "$log" | head -n 8 | sed 's/^/    /'
    # the input itself, for a CI log whose files are gone
    grep -E '^Base64: ' "$log" | tail -n 1 | cut -c1-400 | sed 's/^/    /'
    if [ -n "$artifact" ]; then
        echo "    input: $artifact"
        echo "    reproduce: scripts/fuzz.sh repro $artifact"
    fi
    echo "    log: $log"
    return 1
}

run() {
    local seconds=$1 target pids=() rcs=() i passed=0 failed=0
    if ! build; then
        echo "fuzz: the targets could not be built"
        exit 2
    fi
    echo "fuzz: running ${TARGETS} for ${seconds} s${WAL_FUZZ_SKIP:+ (skipping checks: $WAL_FUZZ_SKIP)}"
    read -r -a targets <<<"$TARGETS"
    for target in "${targets[@]}"; do
        binary_of "$target" >/dev/null
        fuzz_one "$target" "$seconds" &
        pids+=($!)
    done
    for i in "${!targets[@]}"; do
        rcs[i]=0
        wait "${pids[i]}" || rcs[i]=$?
    done
    for i in "${!targets[@]}"; do
        if report_one "${targets[i]}" "${rcs[i]}"; then
            passed=$((passed + 1))
        else
            failed=$((failed + 1))
        fi
    done
    if [ "$failed" -eq 0 ]; then
        echo "fuzz: all $passed targets passed"
    else
        echo "fuzz: $failed of $((passed + failed)) targets failed"
    fi
    [ "$failed" -eq 0 ]
}

repro() {
    local f target rc=0
    build >/dev/null
    for f in "$@"; do
        case $f in
            framed-*|*/framed-*|*/framed/*) target=framed ;;
            *) target=raw ;;
        esac
        "$(binary_of "$target")" -rss_limit_mb=512 -malloc_limit_mb=256 -timeout=30 "$f" || rc=1
    done
    return "$rc"
}

seeds() {
    local out="$FUZZ_DIR/corpus"
    mkdir -p "$BUILD"
    gcc -O1 -g -Wall -Wextra -Werror -I "$REPO_ROOT/src" -isystem "$PG_INCLUDE_SERVER" \
        -DCRC32C_NO_PG_SYMBOL "$FUZZ_DIR/wal_seed_gen.c" "$REPO_ROOT/src/wal_format.c" \
        "$FUZZ_DIR/crc32c.c" "$PG_LIBDIR/libpgport.a" -ljansson -o "$BUILD/wal_seed_gen"
    rm -rf "$out/raw" "$out/framed"
    "$BUILD/wal_seed_gen" "$out"
    echo "fuzz: wrote $(find "$out" -type f | wc -l) seeds to $out"
}

case ${1:-600} in
    build) build ;;
    repro) shift; [ $# -gt 0 ] || usage; repro "$@" ;;
    seeds) seeds ;;
    -h|--help|help) usage ;;
    *[!0-9]*|'') usage ;;
    *) run "${1:-600}" ;;
esac
