-- What operators and applications can ask: deferred_pending(),
-- deferred_wait(), deferred_invalidations(), dead-letter requeue and
-- discard, and the deferred_stats view.
CREATE TABLE op (id int PRIMARY KEY, v text);
-- errors as SQLSTATE and message, with entry ids masked: they depend on
-- the tests before
CREATE FUNCTION try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, '\d+', 'N', 'g');
END $$;
CREATE ROLE athena_reader;
GRANT SELECT, INSERT ON op TO athena_reader;

-- deferred_pending() lists queued entries in queue order, with their payload
SELECT deferred_insert('op', '{"id": 1, "v": "a"}') AS e1 \gset
SELECT deferred_delete('op', '{"id": 1}') AS e2 \gset
SELECT id = :e1 AS first, target, op, payload, role, attempts, last_error
FROM deferred_pending() ORDER BY id;

-- ordinary users see only their own entries
SET ROLE athena_reader;
SELECT deferred_insert('op', '{"id": 2, "v": "mine"}') AS e3 \gset
SELECT id = :e3 AS own, op, payload FROM deferred_pending();
RESET ROLE;

-- deferred_wait(): an entry of the current transaction cannot be waited for
BEGIN;
SELECT deferred_insert('op', '{"id": 3}') AS e4 \gset
SELECT try('SELECT deferred_wait(' || :e4 || ')');
ROLLBACK;
-- a rolled-back entry will never be applied
SELECT try('SELECT deferred_wait(' || :e4 || ')');

-- an entry still pending when the timeout passes is an error
SELECT try('SELECT deferred_wait(' || :e1 || ', 0)');

-- it waits until the entry is settled (applied or dead-lettered)
SELECT deferred_wait(:e1, 10000), deferred_wait(:e3, 10000);
SELECT * FROM op ORDER BY id;
-- and answers at once for a settled entry
SELECT deferred_wait(:e2, 0);

-- a failing entry: deferred_pending() shows its attempts and last error
-- until it is dead-lettered, then deferred_wait() says so
SELECT deferred_insert('op', '{"id": 2, "v": "duplicate"}') AS bad \gset
SELECT deferred_wait(:bad, 10000);
SELECT op, payload, attempts, last_error FROM deferred_dead_letters WHERE id = :bad;

-- requeue: the entry goes back in the queue as the role that queued it
UPDATE op SET id = 20 WHERE id = 2;
SELECT deferred_requeue(:bad) AS requeued \gset
SELECT :requeued > :bad AS new_id, role, attempts FROM deferred_pending();
SELECT count(*) AS still_dead FROM deferred_dead_letters WHERE id = :bad;
SELECT deferred_wait(:requeued, 10000);
SELECT * FROM op ORDER BY id;

-- discard: delete a dead letter on purpose
SELECT deferred_insert('op', '{"id": 20}') AS bad2 \gset
SELECT deferred_wait(:bad2, 10000);
SELECT deferred_discard(:bad2);
SELECT count(*) FROM deferred_dead_letters WHERE id = :bad2;
SELECT try('SELECT deferred_discard(' || :bad2 || ')');
SELECT try('SELECT deferred_requeue(' || :bad2 || ')');

-- dead letters can only be handled by roles allowed to read them
SELECT deferred_insert('op', '{"id": 20}') AS bad3 \gset
SELECT deferred_wait(:bad3, 10000);
SET ROLE athena_reader;
SELECT deferred_requeue(:bad3);
SELECT deferred_discard(:bad3);
RESET ROLE;

-- deferred_invalidations(since): the tables each flush touched, after since;
-- a new listener starts from deferred_stats.latest_flush
SELECT latest_flush AS before FROM deferred_stats \gset
SELECT deferred_update('op', '{"id": 1}', '{"v": "b"}') > 0;
SELECT deferred_flush();
SELECT flush > :before AS newer, schema_name, table_name FROM deferred_invalidations(:before);
-- nothing after the latest
SELECT max(flush) AS latest FROM deferred_invalidations(:before) \gset
SELECT count(*) FROM deferred_invalidations(:latest);
-- the ring holds 16 table invalidations here: after 20 more flushes, a
-- listener that last heard :latest missed some and must drop its cache
DO $$
BEGIN
    FOR i IN 1..20 LOOP
        PERFORM deferred_update('op', '{"id": 20}', jsonb_build_object('v', i));
        COMMIT;
        PERFORM deferred_flush();
    END LOOP;
END $$;
\set VERBOSITY sqlstate
SELECT * FROM deferred_invalidations(:latest);
SELECT * FROM deferred_invalidations(:latest + 1000000000);
\set VERBOSITY default

-- the deferred_stats view, for scrapers
SELECT enqueued > 0 AS enqueued, pending, dead_lettered > 0 AS dead, flush_ms_p99 >= flush_ms_p50 AS ordered,
       notifications > 0 AS notified, oldest_pending_seconds, latest_flush > :latest AS latest
FROM deferred_stats;

DROP TABLE op;
DROP ROLE athena_reader;
DROP FUNCTION try(text);
