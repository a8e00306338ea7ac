/* athena_deferred--0.1.0--0.2.0.sql: read-your-writes, a view into the queue,
 * listener catch-up, dead-letter handling, more statistics */

\echo Use "ALTER EXTENSION athena_deferred UPDATE TO '0.2.0'" to load this file. \quit

-- Entry ids are handed out in blocks of the sequence's increment, so that
-- a call rarely runs nextval (which takes an xid and a WAL flush when it
-- logs).  Ids stay unique and increasing.
ALTER SEQUENCE deferred_entry_id_seq INCREMENT BY 1024;

-- deferred_stats() grows; a view over it for scrapers
DROP FUNCTION deferred_stats();
CREATE FUNCTION deferred_stats(
    OUT enqueued bigint,
    OUT applied bigint,
    OUT failed_attempts bigint,
    OUT dead_lettered bigint,
    OUT pending bigint,
    OUT pending_bytes bigint,
    OUT capacity_bytes bigint,
    OUT flushes bigint,
    OUT last_flush_at timestamptz,
    OUT recovered_entries bigint,
    OUT torn_records bigint,
    OUT corrupt_records bigint,
    OUT wal_bytes bigint,
    OUT wal_segments bigint,
    OUT oldest_pending_seconds double precision,
    OUT last_flush_ms double precision,
    OUT last_flush_entries bigint,
    OUT flush_ms_p50 double precision,
    OUT flush_ms_p99 double precision,
    OUT notifications bigint,
    OUT latest_flush bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'deferred_stats'
LANGUAGE C VOLATILE PARALLEL SAFE;

CREATE VIEW deferred_stats AS SELECT * FROM deferred_stats();

-- Entries waiting in the queue, oldest first; ordinary users see their own.
CREATE FUNCTION deferred_pending(
    OUT id bigint,
    OUT target regclass,
    OUT op text,
    OUT payload jsonb,
    OUT role text,
    OUT enqueued_at timestamptz,
    OUT attempts integer,
    OUT last_error text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'deferred_pending'
LANGUAGE C VOLATILE PARALLEL SAFE;

-- The flushes after since and the tables each touched; SQLSTATE AD100 when
-- some of them are no longer known (drop the whole cache).
CREATE FUNCTION deferred_invalidations(
    since bigint,
    OUT flush bigint,
    OUT schema_name text,
    OUT table_name text,
    OUT flushed_at timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'deferred_invalidations'
LANGUAGE C VOLATILE PARALLEL SAFE;

-- Read-your-writes: wait until an entry is settled.
CREATE FUNCTION deferred_wait(id bigint, timeout_ms integer DEFAULT 30000)
RETURNS text
AS 'MODULE_PATHNAME', 'deferred_wait'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

-- Dead letters: queue again (as the role that queued them) or discard.
-- Both need the caller to be allowed to read and delete dead letters.
CREATE FUNCTION deferred_requeue(dead_letter_id bigint)
RETURNS bigint
AS 'MODULE_PATHNAME', 'deferred_requeue'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;

CREATE FUNCTION deferred_discard(dead_letter_id bigint)
RETURNS void
AS 'MODULE_PATHNAME', 'deferred_discard'
LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
