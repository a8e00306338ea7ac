#!/usr/bin/env bash
# scripts/demo.sh: a short, narrated tour of athena_deferred.
#
# Builds and installs the extension (scripts/setup.sh), starts a throwaway
# PostgreSQL 15 server in a temporary directory (Unix socket in that
# directory only, no TCP), then:
#   - queues an INSERT with deferred_insert() and shows the table is still
#     empty right after the call returned;
#   - applies the queue with deferred_flush() and shows the rows;
#   - shows the NOTIFY a listening session received (cache invalidation);
#   - queues an UPDATE and a DELETE, flushes, shows the result;
#   - prints deferred_stats().
# The server is stopped and the directory removed on exit.
#
# Environment: DEMO_PORT (default 54329) - the socket lives in the private
# temporary directory, so it cannot clash with another server's socket.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=setup.sh
source "$SCRIPT_DIR/setup.sh"

PORT=${DEMO_PORT:-54329}
PYTHON=/usr/bin/python3    # the interpreter python3-psycopg belongs to
DEMO_DIR=
LISTENER_PID=

heading() {
    echo
    echo "==== $*"
}

cleanup() {
    local rc=$?
    set +e
    if [ -n "$LISTENER_PID" ]; then
        kill "$LISTENER_PID" 2>/dev/null
        wait "$LISTENER_PID" 2>/dev/null
    fi
    if [ -n "$DEMO_DIR" ] && [ -d "$DEMO_DIR" ]; then
        if [ "$rc" -ne 0 ] && [ -s "$DEMO_DIR/server.log" ]; then
            echo
            echo "==== demo failed; end of the server log:"
            tail -n 30 "$DEMO_DIR/server.log"
        fi
        if [ -f "$DEMO_DIR/data/postmaster.pid" ]; then
            as_test_user pg_ctl -D "$DEMO_DIR/data" -m fast -w stop >/dev/null 2>&1 ||
                as_test_user pg_ctl -D "$DEMO_DIR/data" -m immediate -w stop >/dev/null 2>&1
        fi
        rm -rf "$DEMO_DIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# psql as the superuser "postgres" of the demo server; -e shows each query.
demo_psql() {
    psql -X -q -e -v ON_ERROR_STOP=1 -h "$DEMO_DIR" -p "$PORT" -U postgres -d postgres
}

# wait_for_lines FILE N: wait (up to 10 s) until FILE has at least N lines.
wait_for_lines() {
    local _
    for _ in $(seq 1 100); do
        if [ -f "$1" ] && [ "$(wc -l <"$1")" -ge "$2" ]; then return 0; fi
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------- server
heading "Starting a throwaway PostgreSQL 15 server"
DEMO_DIR=$(mktemp -d "${TMPDIR:-/tmp}/athena_deferred_demo.XXXXXX")
chown "$(test_user_name)" "$DEMO_DIR"
as_test_user initdb -D "$DEMO_DIR/data" -U postgres --auth=trust --no-sync \
    >"$DEMO_DIR/initdb.log" 2>&1 || { cat "$DEMO_DIR/initdb.log"; exit 1; }
cat >>"$DEMO_DIR/data/postgresql.conf" <<EOF

# athena_deferred demo
listen_addresses = ''
unix_socket_directories = '$DEMO_DIR'
port = $PORT
shared_preload_libraries = 'athena_deferred'
athena_deferred.database = 'postgres'
athena_deferred.batch_window_ms = 500
EOF
as_test_user pg_ctl -D "$DEMO_DIR/data" -l "$DEMO_DIR/server.log" -w start >/dev/null
echo "data directory: $DEMO_DIR/data"
echo "socket:         $DEMO_DIR/.s.PGSQL.$PORT (no TCP)"
echo "settings:       shared_preload_libraries = 'athena_deferred'"
echo "                athena_deferred.batch_window_ms = 500  (the worker flushes at least every 500 ms)"

heading "Installing the extension and creating a table"
demo_psql <<'SQL'
CREATE EXTENSION athena_deferred;
CREATE TABLE items(id int PRIMARY KEY, name text, qty int DEFAULT 0);
SQL

# ---------------------------------------------------------------- listener
heading "A cache client LISTENs on channel athena_deferred"
timeout 300 "$PYTHON" -u "$SCRIPT_DIR/../examples/cache_listener.py" \
    "host=$DEMO_DIR port=$PORT user=postgres dbname=postgres" >"$DEMO_DIR/listener.out" 2>&1 &
LISTENER_PID=$!
if ! wait_for_lines "$DEMO_DIR/listener.out" 1 || ! grep -q '^listening' "$DEMO_DIR/listener.out"; then
    echo "the listener did not start:"
    cat "$DEMO_DIR/listener.out"
    exit 1
fi
echo "(examples/cache_listener.py, a read-through cache on python3-psycopg: it drops a"
echo " table's cached rows when a flush touched the table, and prints what it dropped)"
sed -n 1p "$DEMO_DIR/listener.out"

# ---------------------------------------------------------------- insert
heading "Queue two rows with deferred_insert(): the call returns an entry id at once"
echo "The rows are not in the table yet: the background worker applies them later."
demo_psql <<'SQL'
SELECT deferred_insert('items', '[{"id":1,"name":"apple"},{"id":2,"name":"pear","qty":3}]') AS entry_id;
SELECT * FROM items;
SQL

heading "deferred_flush() wakes the worker and waits until the queue is applied"
echo "It returns how many queued entries were applied meanwhile."
demo_psql <<'SQL'
SELECT deferred_flush();
SELECT * FROM items ORDER BY id;
SQL

heading "What the cache client heard (one NOTIFY per table per flush) and invalidated"
wait_for_lines "$DEMO_DIR/listener.out" 2 || echo "  (nothing yet)"
tail -n +2 "$DEMO_DIR/listener.out"
SEEN=$(wc -l <"$DEMO_DIR/listener.out")

# ---------------------------------------------------------------- update/delete
heading "Queue an UPDATE (id 1: qty = 10) and a DELETE (id 2), then flush"
demo_psql <<'SQL'
SELECT deferred_update('items', '{"id":1}', '{"qty":10}') AS entry_id;
SELECT deferred_delete('items', '{"id":2}') AS entry_id;
SELECT deferred_flush();
SELECT * FROM items ORDER BY id;
SQL

heading "New invalidations"
wait_for_lines "$DEMO_DIR/listener.out" $((SEEN + 1)) || echo "  (nothing yet)"
sleep 0.3   # an update and a delete may arrive as one or two notifications
tail -n +$((SEEN + 1)) "$DEMO_DIR/listener.out"

# ---------------------------------------------------------------- catch-up
heading "If the client was disconnected, it asks what it missed"
demo_psql <<'SQL'
SELECT flush, schema_name, table_name FROM deferred_invalidations((SELECT latest_flush - 2 FROM deferred_stats));
SQL

# ---------------------------------------------------------------- stats
heading "deferred_stats(): counters of the queue and the worker"
demo_psql <<'SQL'
\x on
SELECT * FROM deferred_stats;
SQL

heading "Done: stopping the server and removing $DEMO_DIR"
