#!/usr/bin/env bash
# bench/run.sh: the athena_deferred benchmark.  One command:
#
#     bench/run.sh
#
# Builds and installs the extension (scripts/setup.sh; BENCH_SKIP_SETUP=1
# uses what is installed), starts a throwaway PostgreSQL 15 cluster in a
# temporary directory (Unix socket only, run as the postgres user when
# started as root), runs every comparison of the performance targets side
# by side with pgbench, and prints a markdown table of ratios, followed by
# latency percentiles, scaling with 1, 8 and 32 clients, the worker's
# backlog and the machine it ran on.  The report is also written to
# bench/results/latest.md.  The cluster is removed on exit.
#
# Only ratios of runs made back to back on the same machine mean anything:
# the absolute numbers depend on the machine and on whatever else runs.
#
# Environment (defaults in brackets):
#   BENCH_SECONDS     length of each pgbench run, in seconds [10]
#   BENCH_ROUNDS      rounds of each pair; odd rounds run A then B, even
#                     rounds B then A; tps are averaged, latencies pooled [2]
#   BENCH_CLIENTS     clients for the target table [8]
#   BENCH_JOBS        pgbench threads (-j), at most the clients [2]
#   BENCH_SCALING     client counts for the scaling table ["1 8 32"]
#   BENCH_FLUSH_ROWS  entries queued for the flush-versus-COPY row [200000]
#   BENCH_QUEUE_SIZE  athena_deferred.queue_size [256MB, more for runs longer
#                     than 15 s: 15MB per second of run]
#   BENCH_PORT        port number of the socket (in a private directory) [54339]
#   BENCH_PERF        1: profile the server during one more deferred_insert
#                     run with perf: CPU per call split by function, top
#                     symbols [0]
#   BENCH_OUT         report file [bench/results/latest.md, none with
#                     BENCH_ONLY]; empty: none
#   BENCH_KEEP        1: keep the temporary directory (logs, cluster) [0]
#   BENCH_SKIP_SETUP  1: do not build and install the extension first [0]
#   BENCH_ONLY        comma list of the rows to run [all]: idle (deferred_insert,
#                     wal_sync = batch, against SELECT 1; also the call with
#                     the row built in SQL, and that building alone), always (wal_sync =
#                     always, against INSERT), worker (worker flushing, against
#                     INSERT with synchronous_commit = off), scaling, flush
#                     (deferred_flush() against COPY), shmem (shared memory per
#                     entry: queues and flushes the entries, no COPY)

set -euo pipefail

BENCH_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$BENCH_SRC/.." && pwd)
# helpers: as_test_user, test_user_name, PATH with the PostgreSQL 15 binaries
# shellcheck source-path=SCRIPTDIR source=../scripts/setup.sh
SETUP_SH_DEFINE_ONLY=1 source "$REPO_ROOT/scripts/setup.sh"

SECONDS_PER_RUN=${BENCH_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-2}
CLIENTS=${BENCH_CLIENTS:-8}
JOBS=${BENCH_JOBS:-2}
SCALING=${BENCH_SCALING:-1 8 32}
FLUSH_ROWS=${BENCH_FLUSH_ROWS:-200000}
QUEUE_SIZE=${BENCH_QUEUE_SIZE:-}
PORT=${BENCH_PORT:-54339}
PERF=${BENCH_PERF:-0}
# a partial run (BENCH_ONLY) does not overwrite the full report unless asked
if [ -n "${BENCH_ONLY:-}" ]; then
    OUT=${BENCH_OUT-}
else
    OUT=${BENCH_OUT-$BENCH_SRC/results/latest.md}
fi
KEEP=${BENCH_KEEP:-0}
ONLY=${BENCH_ONLY:-idle,always,worker,scaling,flush,shmem}
FLUSH_TIMEOUT_MS=1800000
PAYLOAD_TEXT='the quick brown fox jumps over'   # as in bench/pgbench/*.sql
# the row deferred_insert.sql sends as its bound parameter
ROW_JSON="{\"id\": 123456789, \"payload\": \"$PAYLOAD_TEXT\"}"

for v in SECONDS_PER_RUN ROUNDS CLIENTS JOBS FLUSH_ROWS PORT; do
    if ! [[ ${!v} =~ ^[1-9][0-9]*$ ]]; then
        echo "bench: $v must be a positive integer, not '${!v}'" >&2
        exit 2
    fi
done

ALL_ROWS="idle always worker scaling flush shmem"
IFS=', ' read -r -a only_rows <<<"$ONLY"
declare -A RUN_ROW
for row in "${only_rows[@]}"; do
    if ! [[ " $ALL_ROWS " == *" $row "* ]]; then
        echo "bench: BENCH_ONLY lists '$row'; the rows are: $ALL_ROWS" >&2
        exit 2
    fi
    RUN_ROW[$row]=1
done
if [ "${#RUN_ROW[@]}" -eq 0 ]; then
    echo "bench: BENCH_ONLY names no row; the rows are: $ALL_ROWS" >&2
    exit 2
fi
# runs ROW: was ROW asked for?
runs() { [ -n "${RUN_ROW[$1]:-}" ]; }

# the queue must hold one run with the worker idle (about 150 bytes an
# entry; 15MB a second leaves room for 100000 calls/s) and the flush row;
# pages of the ring are touched only when used
if [ -z "$QUEUE_SIZE" ]; then
    QUEUE_SIZE="$(( SECONDS_PER_RUN * 15 > 256 ? SECONDS_PER_RUN * 15 : 256 ))MB"
fi

DIR=
SAMPLER_PID=
PERF_PID=
NOTES=()            # odd things seen during the run, for the report

cleanup() {
    local rc=$?
    set +e
    for pid in "$SAMPLER_PID" "$PERF_PID"; do
        if [ -n "$pid" ]; then
            kill "$pid" 2>/dev/null
            wait "$pid" 2>/dev/null
        fi
    done
    if [ -n "$DIR" ] && [ -d "$DIR" ]; then
        if [ "$rc" -ne 0 ] && [ -s "$DIR/server.log" ]; then
            echo
            echo "==== benchmark failed; end of the server log:"
            tail -n 30 "$DIR/server.log"
        fi
        if [ -f "$DIR/data/postmaster.pid" ]; then
            as_test_user pg_ctl -D "$DIR/data" -m fast -w -t 60 stop >/dev/null 2>&1 ||
                as_test_user pg_ctl -D "$DIR/data" -m immediate -w stop >/dev/null 2>&1
        fi
        if [ "$KEEP" = 1 ]; then
            echo "bench: kept $DIR"
        else
            rm -rf "$DIR"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '%s  %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

DIR=$(mktemp -d "${TMPDIR:-/tmp}/athena_deferred_bench.XXXXXX")
chmod 755 "$DIR"
chown "$(test_user_name)" "$DIR"
mkdir -p "$DIR/logs" "$DIR/out"

# ---------------------------------------------------------------- build
if [ "${BENCH_SKIP_SETUP:-0}" != 1 ]; then
    log "building and installing the extension (scripts/setup.sh)"
    if ! bash "$REPO_ROOT/scripts/setup.sh" >"$DIR/setup.log" 2>&1; then
        cat "$DIR/setup.log" >&2
        echo "bench: setup failed" >&2
        exit 1
    fi
fi

# ---------------------------------------------------------------- cluster
max_clients=$CLIENTS
for c in $SCALING; do
    if ! [[ $c =~ ^[1-9][0-9]*$ ]]; then
        echo "bench: BENCH_SCALING must list positive integers, not '$SCALING'" >&2
        exit 2
    fi
    if [ "$c" -gt "$max_clients" ]; then max_clients=$c; fi
done
MAX_CONNECTIONS=$((max_clients + 20))

log "starting a throwaway cluster in $DIR"
as_test_user initdb -D "$DIR/data" -U postgres --auth=trust --no-sync \
    >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log" >&2; exit 1; }
cat >>"$DIR/data/postgresql.conf" <<EOF

# athena_deferred benchmark
listen_addresses = ''
unix_socket_directories = '$DIR'
port = $PORT
max_connections = $MAX_CONNECTIONS
shared_buffers = 256MB
max_wal_size = 8GB
checkpoint_timeout = 30min
autovacuum = off
shared_preload_libraries = 'athena_deferred'
athena_deferred.database = 'postgres'
athena_deferred.queue_size = '$QUEUE_SIZE'
# worker idle: no timer, no size trigger (the runs that want it change this)
athena_deferred.batch_window_ms = 0
athena_deferred.batch_max_size = 0
athena_deferred.wal_sync = 'batch'
EOF
if ! as_test_user pg_ctl -D "$DIR/data" -l "$DIR/server.log" -w -t 120 start >/dev/null; then
    echo "bench: the server did not start (shared memory for queue_size = $QUEUE_SIZE?)" >&2
    tail -n 20 "$DIR/server.log" >&2
    exit 1
fi

PGCONN=(-h "$DIR" -p "$PORT" -U postgres)
q() { psql -X -q -At -v ON_ERROR_STOP=1 "${PGCONN[@]}" -d postgres "$@"; }

q <<'SQL'
CREATE EXTENSION athena_deferred;
CREATE TABLE bench_t (id bigint, payload text);       -- target of deferred_insert
CREATE TABLE bench_plain (id bigint, payload text);   -- target of INSERT
CREATE TABLE bench_copy (id bigint, payload text);    -- target of COPY
SQL

CAPACITY=$(q -c 'SELECT capacity_bytes FROM deferred_stats')
PG_VERSION=$(q -c 'SHOW server_version')

# wait until the worker has recovered its (empty) queue and accepts entries
q -c 'SELECT deferred_flush(60000)' >/dev/null

# ---------------------------------------------------------------- helpers

# set NAME=VALUE... : athena_deferred settings through ALTER SYSTEM + reload
set_conf() {
    local kv args=()
    for kv in "$@"; do
        args+=(-c "ALTER SYSTEM SET athena_deferred.${kv%%=*} = '${kv#*=}'")
    done
    q "${args[@]}" -c 'SELECT pg_reload_conf()' >/dev/null
    # backends read the file at their next command, the worker when it wakes
    sleep 1
}

worker_idle() { set_conf "batch_window_ms=0" "batch_max_size=0" "wal_sync=${1:-batch}"; }

# stats COLUMNS: one row of deferred_stats, '|'-separated
stats() { q -c "SELECT $1 FROM deferred_stats"; }

# empty the queue (entries of earlier runs) and the tables, checkpoint
reset_state() {
    local t0 t1 n
    n=$(stats pending)
    if [ "$n" -gt 0 ]; then
        t0=$(date +%s.%N)
        q -c "SELECT deferred_flush($FLUSH_TIMEOUT_MS)" >/dev/null
        t1=$(date +%s.%N)
        log "  emptied the queue: $n entries in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s"
    fi
    q -c 'TRUNCATE bench_t, bench_plain, bench_copy' -c 'CHECKPOINT' >/dev/null
}

declare -A TPS_SUM TPS_N TPS_RUNS
# pgbench_run KEY SCRIPT CLIENTS [VAR=VALUE...]: one pgbench run; its tps is
# added to KEY's, its per-transaction log pooled under KEY
pgbench_run() {
    local key=$1 script=$2 clients=$3
    shift 3
    local jobs=$JOBS rc=0 n out tps
    if [ "$clients" -lt "$jobs" ]; then jobs=$clients; fi
    n=$((${TPS_N[$key]:-0} + 1))
    mkdir -p "$DIR/logs/$key"
    out="$DIR/out/$key.$n.out"
    env "$@" pgbench -n -M prepared -c "$clients" -j "$jobs" -T "$SECONDS_PER_RUN" \
        -D row="$ROW_JSON" -f "$BENCH_SRC/pgbench/$script" -l --log-prefix="$DIR/logs/$key/r$n" \
        "${PGCONN[@]}" postgres >"$out" 2>&1 || rc=$?
    tps=$(awk '/^tps = /{print $3; exit}' "$out")
    if [ "$rc" -ne 0 ] || [ -z "$tps" ]; then
        NOTES+=("pgbench run $key (#$n) exited with $rc: $(grep -m3 -iE 'error|abort' "$out" | tr '\n' ' ')")
        log "  $key: pgbench failed (rc $rc), see below"
        grep -iE 'error|abort' "$out" | sort | uniq -c | head -5 >&2 || true
    fi
    if grep -qE '^number of failed transactions: [1-9]' "$out"; then
        NOTES+=("pgbench run $key (#$n): $(grep -m1 '^number of failed' "$out")")
    fi
    tps=${tps:-0}
    TPS_SUM[$key]=$(awk -v a="${TPS_SUM[$key]:-0}" -v b="$tps" 'BEGIN{print a+b}')
    TPS_N[$key]=$n
    TPS_RUNS[$key]="${TPS_RUNS[$key]:-} $tps"
    log "  $key: $tps tps"
}

tps_of() { awk -v s="${TPS_SUM[$1]:-0}" -v n="${TPS_N[$1]:-1}" 'BEGIN{printf "%.0f", s/n}'; }

# after a run with the worker idle: did the queue come close to full?
check_queue() {
    local key=$1 row
    row=$(stats "pending, pending_bytes")
    if [ "$((${row#*|} * 10))" -gt "$((CAPACITY * 9))" ]; then
        NOTES+=("queue above 90% full after $key: ${row#*|} of $CAPACITY bytes; raise BENCH_QUEUE_SIZE")
    fi
}

# ---------------------------------------------------------------- runs
run_select1() { # KEY CLIENTS
    reset_state
    pgbench_run "$1" select1.sql "$2"
}

run_select1_script() { # KEY CLIENTS SCRIPT: a run without athena_deferred
    reset_state
    pgbench_run "$1" "$3" "$2"
}

run_insert() { # KEY CLIENTS SYNCHRONOUS_COMMIT
    reset_state
    pgbench_run "$1" insert.sql "$2" PGOPTIONS="-c synchronous_commit=$3"
}

run_deferred_idle() { # KEY CLIENTS WAL_SYNC [SCRIPT]
    worker_idle "$3"
    reset_state
    pgbench_run "$1" "${4:-deferred_insert.sql}" "$2"
    check_queue "$1"
}

declare -A BACKLOG
# deferred_insert with the worker flushing every 100 ms; pending sampled
# every second while pgbench runs
run_deferred_flushing() { # KEY CLIENTS
    local key=$1 clients=$2 samples before after
    worker_idle batch
    reset_state
    set_conf "batch_window_ms=100" "batch_max_size=0" "wal_sync=batch"
    samples="$DIR/out/$key.$((${TPS_N[$key]:-0} + 1)).pending"
    before=$(stats "enqueued, applied")
    (
        while :; do
            q -c "SELECT extract(epoch FROM clock_timestamp()), pending, pending_bytes FROM deferred_stats" \
                >>"$samples" 2>/dev/null || true
            sleep 1
        done
    ) &
    SAMPLER_PID=$!
    pgbench_run "$key" deferred_insert.sql "$clients"
    after=$(stats "enqueued, applied, pending")
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=
    # pending right after the run, as a sample too
    echo "$(date +%s)|${after##*|}|0" >>"$samples"
    local max_pending enq applied
    max_pending=$(awk -F'|' 'BEGIN{m=0} $2+0>m{m=$2+0} END{print m}' "$samples")
    enq=$(( $(cut -d'|' -f1 <<<"$after") - $(cut -d'|' -f1 <<<"$before") ))
    applied=$(( $(cut -d'|' -f2 <<<"$after") - $(cut -d'|' -f2 <<<"$before") ))
    BACKLOG[max]=$(( ${BACKLOG[max]:-0} > max_pending ? ${BACKLOG[max]:-0} : max_pending ))
    BACKLOG[end]=${after##*|}
    BACKLOG[enqueued]=$(( ${BACKLOG[enqueued]:-0} + enq ))
    BACKLOG[applied]=$(( ${BACKLOG[applied]:-0} + applied ))
    BACKLOG[samples]=$(( ${BACKLOG[samples]:-0} + $(wc -l <"$samples") ))
    log "  backlog: max $max_pending pending, ${after##*|} at the end; $applied of $enq entries applied during the run"
    worker_idle batch
}

# pair A B ROUND: A then B on odd rounds, B then A on even ones
pair() {
    if [ $(($3 % 2)) -eq 1 ]; then $1; $2; else $2; $1; fi
}

# ---------------------------------------------------------------- flush row
declare -A FLUSH
prepare_flush_rows() {
    q <<SQL
CREATE TABLE bench_src AS
    SELECT g, jsonb_build_object('id', 1 + floor(random() * 1000000000)::bigint,
                                 'payload', '$PAYLOAD_TEXT') AS j
    FROM generate_series(1, $FLUSH_ROWS) AS g;
COPY (SELECT (j->>'id')::bigint, j->>'payload' FROM bench_src ORDER BY g) TO '$DIR/rows.tsv';
SQL
    FLUSH[payload_bytes]=$(q -c 'SELECT sum(length(j::text)) FROM bench_src')
}

# time_sql SQL: milliseconds the statement took (psql \timing)
time_sql() {
    q -c '\timing on' -c "$1" | awk '/^Time: /{print $2}'
}

flush_deferred() {
    local s0 s1 ms n
    worker_idle batch
    reset_state
    s0=$(stats "pending, pending_bytes")
    ms=$(time_sql "SELECT count(deferred_insert('bench_t', j)) FROM bench_src")
    FLUSH[queue_ms]=$(awk -v a="${FLUSH[queue_ms]:-0}" -v b="$ms" 'BEGIN{print a+b}')
    s1=$(stats "pending, pending_bytes")
    FLUSH[entries]=$(( ${s1%|*} - ${s0%|*} ))
    FLUSH[entry_bytes]=$(( ${s1#*|} - ${s0#*|} ))
    q -c 'CHECKPOINT' >/dev/null
    ms=$(time_sql "SELECT deferred_flush($FLUSH_TIMEOUT_MS)")
    n=$(q -c 'SELECT count(*) FROM bench_t')
    if [ "$n" -ne "$FLUSH_ROWS" ]; then
        NOTES+=("deferred_flush() left $n rows in bench_t, expected $FLUSH_ROWS")
    fi
    FLUSH[flush_ms]=$(awk -v a="${FLUSH[flush_ms]:-0}" -v b="$ms" 'BEGIN{print a+b}')
    FLUSH[flush_runs]="${FLUSH[flush_runs]:-} $ms"
    log "  deferred_flush() of ${FLUSH[entries]} entries: $ms ms"
}

flush_copy() {
    local ms n
    reset_state
    ms=$(time_sql "COPY bench_copy FROM '$DIR/rows.tsv'")
    n=$(q -c 'SELECT count(*) FROM bench_copy')
    if [ "$n" -ne "$FLUSH_ROWS" ]; then
        NOTES+=("COPY loaded $n rows, expected $FLUSH_ROWS")
    fi
    FLUSH[copy_ms]=$(awk -v a="${FLUSH[copy_ms]:-0}" -v b="$ms" 'BEGIN{print a+b}')
    FLUSH[copy_runs]="${FLUSH[copy_runs]:-} $ms"
    log "  COPY of $FLUSH_ROWS rows: $ms ms"
}

# ---------------------------------------------------------------- main
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
T_START=$(date +%s)
n_pairs=0
for row in idle always worker; do if runs "$row"; then n_pairs=$((n_pairs + 1)); fi; done
if runs idle; then n_pairs=$((n_pairs + 1)); fi     # the row built in SQL
if runs scaling; then
    for c in $SCALING; do
        if [ "$c" != "$CLIENTS" ] || ! runs idle; then n_pairs=$((n_pairs + 1)); fi
    done
fi
log "rows: ${!RUN_ROW[*]}; about $((n_pairs * 2 * ROUNDS * SECONDS_PER_RUN)) s of pgbench runs ($ROUNDS round(s), $SECONDS_PER_RUN s each), plus flushes"

for r in $(seq 1 "$ROUNDS"); do
    log "round $r of $ROUNDS"
    if runs idle; then
        log "deferred_insert (wal_sync = batch, worker idle) vs SELECT 1, $CLIENTS clients"
        pair "run_deferred_idle d_batch_c$CLIENTS $CLIENTS batch" "run_select1 select1_c$CLIENTS $CLIENTS" "$r"
        log "for comparison: the row built in SQL, with and without deferred_insert"
        run_deferred_idle "d_built_c$CLIENTS" "$CLIENTS" batch deferred_insert_built.sql
        run_select1_script "built_c$CLIENTS" "$CLIENTS" jsonb_build_object.sql
    fi
    if runs always; then
        log "deferred_insert (wal_sync = always, worker idle) vs INSERT, synchronous_commit = on"
        pair "run_deferred_idle d_always_c$CLIENTS $CLIENTS always" "run_insert insert_on_c$CLIENTS $CLIENTS on" "$r"
    fi
    if runs worker; then
        log "deferred_insert (wal_sync = batch, worker flushing every 100 ms) vs INSERT, synchronous_commit = off"
        pair "run_deferred_flushing d_flushing_c$CLIENTS $CLIENTS" "run_insert insert_off_c$CLIENTS $CLIENTS off" "$r"
    fi
    if runs scaling; then
        for c in $SCALING; do
            if [ "$c" = "$CLIENTS" ] && runs idle; then continue; fi   # measured above
            log "scaling: deferred_insert (batch, worker idle) vs SELECT 1, $c clients"
            pair "run_deferred_idle d_batch_c$c $c batch" "run_select1 select1_c$c $c" "$r"
        done
    fi
    if runs flush || runs shmem; then
        if [ "$r" -eq 1 ]; then prepare_flush_rows; fi
    fi
    if runs flush; then
        log "deferred_flush() of $FLUSH_ROWS queued single-row entries vs COPY"
        pair flush_deferred flush_copy "$r"
    elif runs shmem; then
        log "shared memory of $FLUSH_ROWS queued single-row entries"
        flush_deferred
    fi
done

PERF_TOP=
PERF_FREQ=999

# perf_split FUNC US: the samples taken inside FUNC (its innermost call on
# the stack), as microseconds per committed transaction (US a sample), in
# all and split by the function FUNC called (or "(self)")
perf_split() {
    awk -v f="$1" -v us="$2" '
        function sample(   i) {
            for (i = 1; i <= n; i++)
                if (sym[i] == f) {
                    per[i > 1 ? sym[i - 1] : "(self)"]++
                    total++
                    break
                }
            n = 0
        }
        /^[^ \t]/ || /^[ \t]*$/ { if (n) sample(); next }
        { s = $2; sub(/\+0x[0-9a-f]+$/, "", s); sym[++n] = s }
        END {
            if (n) sample()
            printf "%.2f\t%s\n", total * us, f
            for (c in per) printf "%.2f\t    %s\n", per[c] * us, c
        }' "$DIR/perf.txt" | sort -t$'\t' -k1,1nr | head -7
}

if [ "$PERF" = 1 ]; then
    if command -v perf >/dev/null 2>&1; then
        log "profiling a deferred_insert run (wal_sync = batch, worker idle) with perf"
        worker_idle batch
        reset_state
        perf_secs=$((SECONDS_PER_RUN > 4 ? SECONDS_PER_RUN - 2 : 2))
        # once pgbench has connected: the postmaster and all its children
        # (backends, the worker), not the rest of a possibly shared machine
        (
            sleep 1
            pm=$(head -n1 "$DIR/data/postmaster.pid")
            pids=$({ echo "$pm"; ps -o pid= --ppid "$pm"; } | tr -d ' ' | paste -sd, -)
            exec perf record -g -F "$PERF_FREQ" -p "$pids" -o "$DIR/perf.data" -- sleep "$perf_secs"
        ) >"$DIR/perf.log" 2>&1 &
        PERF_PID=$!
        pgbench_run perf_d_batch deferred_insert.sql "$CLIENTS"
        wait "$PERF_PID" || true
        PERF_PID=
        if [ -s "$DIR/perf.data" ]; then
            perf script -i "$DIR/perf.data" >"$DIR/perf.txt" 2>/dev/null || true
            # microseconds of CPU per committed transaction that one sample stands for
            perf_us=$(awk -v f="$PERF_FREQ" -v tps="$(tps_of perf_d_batch)" -v s="$perf_secs" \
                'BEGIN{printf "%.6f", (tps > 0 ? 1e6 / f / (tps * s) : 0)}')
            PERF_TOP=$(
                echo "CPU of the server's processes per committed call, in us, split by what each function calls"
                echo "(samples of $perf_secs s at $PERF_FREQ Hz, $(tps_of perf_d_batch) tps; a rough split, sampling error a few %):"
                awk -v us="$perf_us" '/^[^ \t]/ {n++} END {printf "%.1f\tall\n", n * us}' "$DIR/perf.txt"
                for f in deferred_insert enqueue_xact_callback wal_append jsonb_in; do
                    perf_split "$f" "$perf_us"
                done
                echo
                echo "by shared object:"
                perf report -i "$DIR/perf.data" --stdio --no-children -g none --sort dso 2>/dev/null |
                    grep -vE '^#|^$' | head -8 || true
                echo
                echo "by symbol:"
                perf report -i "$DIR/perf.data" --stdio --no-children -g none --sort dso,sym 2>/dev/null |
                    grep -vE '^#|^$' | head -40 || true
            )
            if grep -q '(deleted)' <<<"$PERF_TOP"; then
                NOTES+=("the extension's library was replaced on disk during the run (a make install elsewhere): perf cannot name its symbols")
            fi
        else
            NOTES+=("perf record produced nothing: $(tail -n1 "$DIR/perf.log")")
        fi
    else
        NOTES+=("BENCH_PERF=1 but perf is not installed")
    fi
fi
T_END=$(date +%s)
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- report
# latency KEY: "p50 p99" in ms, from the pooled per-transaction logs
latency() {
    cat "$DIR/logs/$1"/r* 2>/dev/null | awk '$3 ~ /^[0-9]+$/ {print $3}' | sort -n |
        awk '{v[NR]=$1} END {
                if (NR == 0) { print "- -"; exit }
                i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++
                i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++
                printf "%.3f %.3f\n", v[i50] / 1000, v[i99] / 1000 }'
}

# per_round A B: the ratio of each round's runs, "0.61, 0.58"
per_round() {
    awk -v a="${TPS_RUNS[$1]:-}" -v b="${TPS_RUNS[$2]:-}" 'BEGIN{
        n = split(a, x, " "); split(b, y, " "); out = ""
        for (i = 1; i <= n; i++) out = out (i > 1 ? ", " : "") (y[i] > 0 ? sprintf("%.2f", x[i] / y[i]) : "n/a")
        print out }'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
met() { awk -v r="$1" -v t="$2" 'BEGIN{ if (r == "n/a") print "n/a"; else print ((r + 0 >= t) ? "yes" : "**no**") }'; }

C=$CLIENTS
tps_d_batch=$(tps_of "d_batch_c$C");     tps_sel=$(tps_of "select1_c$C")
tps_d_always=$(tps_of "d_always_c$C");   tps_ins_on=$(tps_of "insert_on_c$C")
tps_d_flush=$(tps_of "d_flushing_c$C");  tps_ins_off=$(tps_of "insert_off_c$C")
r1=$(ratio "$tps_d_batch" "$tps_sel")
r2=$(ratio "$tps_d_always" "$tps_ins_on")
r3=$(ratio "$tps_d_flush" "$tps_ins_off")
m1=$(met "$r1" 0.70); m2=$(met "$r2" 1.0); m3=$(met "$r3" 1.3)
backlog_ok=$(awk -v m="${BACKLOG[max]:-0}" -v t="$tps_d_flush" 'BEGIN{print (m < t) ? "yes" : "no"}')
if [ "$backlog_ok" != yes ] && [ "$m3" = yes ]; then m3="**no** (backlog)"; fi
backlog_secs=$(awk -v m="${BACKLOG[max]:-0}" -v t="$tps_d_flush" 'BEGIN{ if (t > 0) printf "%.2f", m / t; else print "n/a" }')

# rows/s from the summed milliseconds of the rounds; 0 when not run
rows_per_s() { awk -v n="$FLUSH_ROWS" -v ms="${1:-0}" -v r="$ROUNDS" 'BEGIN{ if (ms > 0) printf "%.0f", n / (ms / r / 1000); else print 0 }'; }
flush_rps=$(rows_per_s "${FLUSH[flush_ms]:-}")
copy_rps=$(rows_per_s "${FLUSH[copy_ms]:-}")
r4=$(ratio "$flush_rps" "$copy_rps"); m4=$(met "$r4" 0.8)
# rows/s ratio of each round = COPY time / flush time
pr4=$(awk -v a="${FLUSH[copy_runs]:-}" -v b="${FLUSH[flush_runs]:-}" 'BEGIN{
    n = split(a, x, " "); split(b, y, " "); out = ""
    for (i = 1; i <= n; i++) out = out (i > 1 ? ", " : "") (y[i] > 0 ? sprintf("%.3f", x[i] / y[i]) : "n/a")
    print out }')

per_entry=$(awk -v b="${FLUSH[entry_bytes]:-0}" -v n="${FLUSH[entries]:-0}" 'BEGIN{ if (n > 0) printf "%.1f", b / n; else print "n/a" }')
per_payload=$(awk -v b="${FLUSH[payload_bytes]:-0}" -v n="$FLUSH_ROWS" 'BEGIN{printf "%.1f", b / n}')
overhead=$(awk -v a="$per_entry" -v b="$per_payload" 'BEGIN{ if (a == "n/a") print "n/a"; else printf "%.1f", a - b }')
m5=$(awk -v o="$overhead" 'BEGIN{ if (o == "n/a") print "n/a"; else print (o + 0 <= 64) ? "yes" : "**no**" }')

if awk -v l="${LOAD_BEFORE%% *}" -v c="$(nproc)" 'BEGIN{exit !(l + 0 > c / 2)}'; then
    NOTES+=("the machine was busy: load average ${LOAD_BEFORE%% *} before the runs on $(nproc) CPUs; other work competed with both sides of every pair (compare the per-round ratios)")
fi
server_log_counts=$(grep -cE '(ERROR|FATAL|PANIC|WARNING):' "$DIR/server.log" || true)
if [ "${server_log_counts:-0}" -gt 0 ]; then
    NOTES+=("server log: $server_log_counts ERROR/FATAL/PANIC/WARNING lines, e.g.: $(grep -E '(ERROR|FATAL|PANIC|WARNING):' "$DIR/server.log" | sed -E 's/^[^]]*] //' | sort | uniq -c | sort -rn | head -3 | tr -s ' ' | tr '\n' ';')")
fi
final=$(stats "dead_lettered, failed_attempts, torn_records, corrupt_records")
if [ "$final" != "0|0|0|0" ]; then
    NOTES+=("deferred_stats at the end: dead_lettered|failed_attempts|torn_records|corrupt_records = $final")
fi

cpu_model=$(awk -F': *' '/^model name/{print $2; exit}' /proc/cpuinfo)
fs_type=$(df -T "$DIR" | awk 'NR==2{print $2 " (" $1 ")"}')
git_rev=$(git -C "$REPO_ROOT" describe --always --dirty 2>/dev/null || echo unknown)

report() {
    echo "# athena_deferred benchmark"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) CPUs ($cpu_model); Linux $(uname -r);"
    echo "PostgreSQL $PG_VERSION; tree $git_rev; data directory on $fs_type."
    echo "pgbench -M prepared -c $C -j $JOBS -T $SECONDS_PER_RUN, $ROUNDS round(s) per pair (A B, then B A);"
    echo "load average $LOAD_BEFORE before, $LOAD_AFTER after; $((T_END - T_START)) s in all."
    echo
    echo "| what | measured | reference | ratio | per round | target | met? |"
    echo "| --- | ---: | ---: | ---: | ---: | --- | --- |"
    # (BENCH_ONLY: only the rows that ran)
    if runs idle; then echo "| \`SELECT deferred_insert(...)\`, wal_sync = batch, worker idle | $tps_d_batch tps | \`SELECT 1\`: $tps_sel tps | ${r1}x | $(per_round "d_batch_c$C" "select1_c$C") | >= 0.70x | $m1 |"; fi
    if runs always; then echo "| \`deferred_insert\`, wal_sync = always | $tps_d_always tps | \`INSERT\`, synchronous_commit = on: $tps_ins_on tps | ${r2}x | $(per_round "d_always_c$C" "insert_on_c$C") | >= 1.0x | $m2 |"; fi
    if runs worker; then echo "| \`deferred_insert\`, wal_sync = batch, worker flushing every 100 ms; backlog at most ${BACKLOG[max]:-?} entries = ${backlog_secs} s of traffic | $tps_d_flush tps | \`INSERT\`, synchronous_commit = off: $tps_ins_off tps | ${r3}x | $(per_round "d_flushing_c$C" "insert_off_c$C") | >= 1.3x, backlog < 1 s | $m3 |"; fi
    if runs flush; then echo "| \`deferred_flush()\` of $FLUSH_ROWS queued single-row inserts | $flush_rps rows/s | \`COPY\` of the same rows: $copy_rps rows/s | ${r4}x | $pr4 | >= 0.8x | $m4 |"; fi
    if runs shmem; then echo "| shared memory per pending entry (pending_bytes / pending) | $per_entry bytes | payload JSON text: $per_payload bytes | +$overhead bytes | | <= payload + 64 | $m5 |"; fi
    local k label l c a b l2
    if runs idle || runs always || runs worker; then
    echo
    echo "## Latency of the call (per-transaction pgbench logs, $C clients)"
    echo
    echo "| run | tps | p50 ms | p99 ms |"
    echo "| --- | ---: | ---: | ---: |"
    for k in "d_batch_c$C|deferred_insert, wal_sync = batch, worker idle" \
             "select1_c$C|SELECT 1" \
             "d_always_c$C|deferred_insert, wal_sync = always, worker idle" \
             "insert_on_c$C|INSERT, synchronous_commit = on" \
             "d_flushing_c$C|deferred_insert, wal_sync = batch, worker flushing every 100 ms" \
             "insert_off_c$C|INSERT, synchronous_commit = off"; do
        label=${k#*|}; k=${k%%|*}
        if [ -z "${TPS_N[$k]:-}" ]; then continue; fi   # not run (BENCH_ONLY)
        l=$(latency "$k")
        echo "| $label | $(tps_of "$k") | ${l% *} | ${l#* } |"
    done
    echo
    echo "Latency is measured by pgbench from the client, queueing on the $(nproc) CPUs included."
    echo "pgbench reads its clock lazily, once per pass over a client: a reply already there when it"
    echo "looks is stamped with the time the transaction began, so with several clients per thread"
    echo "latencies below about 0.1 ms are not resolved (a p50 of 0 for \`SELECT 1\`); the"
    echo "1-client rows of the scaling table are closer to the truth."
    fi
    if runs scaling; then
    echo
    echo "## Scaling (wal_sync = batch, worker idle; -j $JOBS, or -j 1 for one client)"
    echo
    echo "| clients | deferred_insert tps | SELECT 1 tps | ratio (per round) | deferred_insert p50 / p99 ms | SELECT 1 p50 / p99 ms |"
    echo "| ---: | ---: | ---: | ---: | ---: | ---: |"
    for c in $SCALING; do
        a=$(tps_of "d_batch_c$c"); b=$(tps_of "select1_c$c")
        l=$(latency "d_batch_c$c"); l2=$(latency "select1_c$c")
        echo "| $c | $a | $b | $(ratio "$a" "$b")x ($(per_round "d_batch_c$c" "select1_c$c")) | ${l% *} / ${l#* } | ${l2% *} / ${l2#* } |"
    done
    fi
    echo
    echo "## Details"
    echo
    if runs idle; then
    local tb ts tj
    tb=$(tps_of "d_built_c$C"); ts=$(tps_of "select1_c$C"); tj=$(tps_of "built_c$C")
    echo "- The call form: \`deferred_insert.sql\` sends the row's JSON as one bound parameter, as an"
    echo "  application does. Built in SQL instead (\`jsonb_build_object('id', :id, 'payload', ...)\`,"
    echo "  \`deferred_insert_built.sql\`): $tb tps = $(ratio "$tb" "$ts")x \`SELECT 1\`; the same"
    echo "  \`jsonb_build_object\` without deferred_insert: $tj tps = $(ratio "$tj" "$ts")x \`SELECT 1\`."
    fi
    if runs worker; then
    echo "- Backlog with the worker flushing (batch_window_ms = 100, batch_max_size = 0):"
    echo "  \`pending\` sampled every second (${BACKLOG[samples]:-0} samples): at most ${BACKLOG[max]:-?},"
    echo "  ${BACKLOG[end]:-?} right after the last run, against one second of traffic = $tps_d_flush entries;"
    echo "  the worker applied ${BACKLOG[applied]:-?} of the ${BACKLOG[enqueued]:-?} entries queued during the run(s)."
    fi
    if runs flush || runs shmem; then
    echo "- Flush row: ${FLUSH[entries]} entries queued by one \`SELECT count(deferred_insert(...))\`"
    printf '%s\n' "  (one transaction, $(awk -v ms="${FLUSH[queue_ms]}" -v r="$ROUNDS" 'BEGIN{printf "%.0f", ms / r}') ms), then \`SELECT deferred_flush()\` timed with psql \`\\timing\`:"
    if runs flush; then
    echo "  $(awk -v ms="${FLUSH[flush_ms]}" -v r="$ROUNDS" 'BEGIN{printf "%.0f", ms / r}') ms; server-side \`COPY bench_copy FROM\` a file of the same rows:"
    echo "  $(awk -v ms="${FLUSH[copy_ms]}" -v r="$ROUNDS" 'BEGIN{printf "%.0f", ms / r}') ms. Tables without indexes; CHECKPOINT before each."
    else
    echo "  $(awk -v ms="${FLUSH[flush_ms]}" -v r="$ROUNDS" 'BEGIN{printf "%.0f", ms / r}') ms (COPY not run: BENCH_ONLY has no flush)."
    fi
    echo "- Shared memory: pending_bytes grew by ${FLUSH[entry_bytes]} bytes for ${FLUSH[entries]} entries; their"
    echo "  payloads (\`jsonb::text\` of \`{\"id\": <bigint>, \"payload\": \"$PAYLOAD_TEXT\"}\`) total ${FLUSH[payload_bytes]} bytes."
    fi
    echo "- Settings: shared_buffers = 256MB, autovacuum = off, max_wal_size = 8GB,"
    echo "  athena_deferred.queue_size = $QUEUE_SIZE; \"worker idle\" = batch_window_ms = 0 and batch_max_size = 0."
    echo "  Between runs the queue is emptied with deferred_flush(), the tables truncated, and a CHECKPOINT taken."
    if [ "${#NOTES[@]}" -gt 0 ]; then
        echo
        echo "## Odd things seen"
        echo
        local n
        for n in "${NOTES[@]}"; do echo "- $n"; done
    fi
    if [ -n "$PERF_TOP" ]; then
        echo
        echo "## Where the time goes (perf record of the server's processes during a deferred_insert run, wal_sync = batch, worker idle, $C clients)"
        echo
        echo '```'
        echo "$PERF_TOP"
        echo '```'
    fi
}

report >"$DIR/report.md"
echo
cat "$DIR/report.md"
if [ -n "$OUT" ]; then
    mkdir -p "$(dirname "$OUT")"
    cp "$DIR/report.md" "$OUT"
    echo
    echo "(written to $OUT)"
fi
