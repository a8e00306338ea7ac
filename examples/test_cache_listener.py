#!/usr/bin/python3
"""Drives examples/cache_listener.py against a real server (t/020_cache_listener.pl).

Checks, as TAP lines, that the cache never serves a row it has been told is
stale: after a flush, after a forced disconnect (the notification sent
meanwhile is lost; deferred_invalidations() catches up), and after missing
more than the server remembers (the whole cache is dropped).
"""
import sys
import time

import psycopg

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from cache_listener import CacheListener  # noqa: E402

conninfo = sys.argv[1]
count = 0
failed = 0


def check(ok, name):
    global count, failed
    count += 1
    if not ok:
        failed += 1
    print("%s %d - %s" % ("ok" if ok else "not ok", count, name), flush=True)


writer = psycopg.connect(conninfo, autocommit=True)


def write(sql, *args):
    writer.execute(sql, args)


def flush():
    writer.execute("SELECT deferred_flush()")


def wait_told(cache, table, generation, seconds=10):
    """Poll until the cache has processed an invalidation of table."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        cache.poll(timeout=0.2)
        if cache.generation.get(("public", table), 0) > generation:
            return True
    return False


write("CREATE TABLE items (id int PRIMARY KEY, name text)")
write("CREATE TABLE other (id int)")
write("INSERT INTO items VALUES (1, 'a')")

cache = CacheListener(conninfo)
cache.connect()
check(cache.get("public", "items", "id", 1)["name"] == "a", "read-through caches the row")
write("UPDATE items SET name = 'direct' WHERE id = 1")   # not through athena_deferred
check(cache.get("public", "items", "id", 1)["name"] == "a", "served from the cache")

# a deferred update, flushed: the cache is told and serves the new row
gen = cache.generation.get(("public", "items"), 0)
write("""SELECT deferred_update('items', '{"id": 1}', '{"name": "b"}')""")
flush()
check(wait_told(cache, "items", gen), "notification received after the flush")
check(cache.get("public", "items", "id", 1)["name"] == "b", "no stale row after the notification")

# forced disconnect: the notification sent meanwhile is lost to LISTEN,
# deferred_invalidations() makes up for it after the reconnect
pid = cache.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
write("SELECT pg_terminate_backend(%s)", pid)
write("""SELECT deferred_update('items', '{"id": 1}', '{"name": "c"}')""")
flush()
gen = cache.generation.get(("public", "items"), 0)
row = cache.get("public", "items", "id", 1)
check(cache.reconnects == 1, "reconnected after pg_terminate_backend")
check(cache.generation.get(("public", "items"), 0) > gen, "caught up with deferred_invalidations()")
check(row["name"] == "c", "no stale row after the catch-up")
check(cache.full_drops == 0, "the catch-up did not need to drop everything")

# missing more than the server remembers (the ring holds 16 here)
pid = cache.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
write("SELECT pg_terminate_backend(%s)", pid)
write("""SELECT deferred_update('items', '{"id": 1}', '{"name": "d"}')""")
flush()
for i in range(20):
    write("SELECT deferred_insert('other', jsonb_build_object('id', %s))", i)
    flush()
row = cache.get("public", "items", "id", 1)
check(cache.full_drops == 1, "told it missed too much: dropped the whole cache")
check(row["name"] == "d", "no stale row after the drop")

# and it keeps working
gen = cache.generation.get(("public", "items"), 0)
write("""SELECT deferred_delete('items', '{"id": 1}')""")
flush()
check(wait_told(cache, "items", gen), "notifications still arrive")
check(cache.get("public", "items", "id", 1) is None, "the deleted row is gone from the cache")

cache.close()
writer.close()
print("1..%d" % count)
sys.exit(1 if failed else 0)
