/* athena_deferred--0.2.0--0.3.0.sql */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION athena_deferred UPDATE TO '0.3.0'" to load this file. \quit

-- deferred_stats() counts the entries of dropped databases that were
-- discarded (0.3.0 runs a worker in every database)
DROP VIEW deferred_stats;
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
    OUT latest_flush bigint,
    OUT discarded bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'deferred_stats'
LANGUAGE C VOLATILE PARALLEL SAFE;

CREATE VIEW deferred_stats AS SELECT * FROM deferred_stats();
