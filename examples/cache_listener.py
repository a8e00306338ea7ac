#!/usr/bin/python3
"""A read-through cache of rows, kept honest by athena_deferred.

It caches rows by (schema, table, key). It LISTENs on athena_deferred's
channel and drops a table's rows when a flush touched that table. After a
reconnect it asks deferred_invalidations(since) what it missed; if the
server no longer knows (SQLSTATE AD100: the ring overflowed or the server
restarted), it drops everything.

The order of operations is what keeps it correct:
  - LISTEN before catching up, so that no flush falls between the two;
  - a row read from the database is cached only if no invalidation of its
    table arrived while it was being read (per-table generation counters).

Uses psycopg 3 (Debian: python3-psycopg).

    cache = CacheListener("host=/tmp dbname=postgres")
    row = cache.get("public", "items", "id", 1)
    cache.poll()          # process notifications that arrived
"""

import json
import select
import sys

import psycopg
from psycopg import sql

MISSED_TOO_MUCH = "AD100"


class CacheListener:
    def __init__(self, conninfo, channel="athena_deferred", log=None):
        self.conninfo = conninfo
        self.channel = channel
        self.log = log or (lambda message: None)
        self.rows = {}          # (schema, table) -> {key: row}
        self.generation = {}    # (schema, table) -> invalidations seen
        self.since = None       # number of the latest flush accounted for
        self.conn = None
        self.reconnects = 0
        self.full_drops = 0

    # -- connection -----------------------------------------------------

    def connect(self):
        """(Re)connect, LISTEN, then account for the flushes missed."""
        self.conn = psycopg.connect(self.conninfo, autocommit=True)
        self.conn.add_notify_handler(self._on_notify)
        self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        if self.since is None:
            # nothing cached yet: start from the latest flush
            self.since = self._latest_flush()
            return
        self.reconnects += 1
        try:
            missed = self.conn.execute(
                "SELECT flush, schema_name, table_name FROM deferred_invalidations(%s)",
                (self.since,)).fetchall()
        except psycopg.Error as e:
            if e.sqlstate != MISSED_TOO_MUCH:
                raise
            self.log("missed too much (%s): dropping the whole cache" % e.sqlstate)
            self.drop_all()
            self.since = self._latest_flush()
            return
        for flush, schema, table in missed:
            self.invalidate(schema, table, flush)
        self.log("caught up: %d invalidations since the reconnect" % len(missed))

    def _latest_flush(self):
        return self.conn.execute("SELECT latest_flush FROM deferred_stats").fetchone()[0]

    def _ensure_connected(self):
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.connect()

    # -- invalidation ---------------------------------------------------

    def invalidate(self, schema, table, flush):
        key = (schema, table)
        self.rows.pop(key, None)
        self.generation[key] = self.generation.get(key, 0) + 1
        self.since = max(self.since or 0, flush)
        self.log("invalidated %s.%s (flush %d)" % (schema, table, flush))

    def drop_all(self):
        for key in list(self.generation) + list(self.rows):
            self.generation[key] = self.generation.get(key, 0) + 1
        self.rows.clear()
        self.full_drops += 1

    def _on_notify(self, notify):
        payload = json.loads(notify.payload)
        self.invalidate(payload["schema"], payload["table"], payload["flush"])

    def poll(self, timeout=0.0):
        """Process the notifications that arrived (waiting up to timeout s)."""
        try:
            self._ensure_connected()
            if timeout:
                select.select([self.conn.fileno()], [], [], timeout)
            # psycopg hands notifications to _on_notify as it reads results
            self.conn.execute("SELECT 1")
        except psycopg.OperationalError:
            self.log("connection lost; reconnecting")
            self.conn = None
            self._ensure_connected()

    # -- reading --------------------------------------------------------

    def get(self, schema, table, key_column, key):
        """A row as a dict, from the cache or else from the database."""
        self.poll()
        cached = self.rows.get((schema, table), {})
        if key in cached:
            return cached[key]
        generation = self.generation.get((schema, table), 0)
        query = sql.SQL("SELECT row_to_json(t) FROM {}.{} AS t WHERE {} = %s").format(
            sql.Identifier(schema), sql.Identifier(table), sql.Identifier(key_column))
        row = self.conn.execute(query, (key,)).fetchone()
        row = row[0] if row else None
        # cache it only if no invalidation of the table arrived meanwhile
        self.poll()
        if self.generation.get((schema, table), 0) == generation:
            self.rows.setdefault((schema, table), {})[key] = row
        return row

    def close(self):
        if self.conn is not None:
            self.conn.close()


if __name__ == "__main__":
    # watch mode: print each invalidation as it arrives
    conninfo = sys.argv[1] if len(sys.argv) > 1 else ""
    cache = CacheListener(conninfo, log=lambda m: print(m, flush=True))
    cache.connect()
    print("listening on %s from flush %d" % (cache.channel, cache.since), flush=True)
    while True:
        cache.poll(timeout=1.0)
