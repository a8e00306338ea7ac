/* athena_deferred--0.1.0.sql */

\echo Use "CREATE EXTENSION athena_deferred" to load this file. \quit

-- Entry ids: unique and increasing in the order entries are queued,
-- across restarts.
CREATE SEQUENCE deferred_entry_id_seq;
REVOKE ALL ON deferred_entry_id_seq FROM PUBLIC;

-- How far the worker has applied the queue, written by each flush in the
-- same transaction as its mutations: every entry with a commit-order
-- sequence number below applied_upto is applied or dead-lettered, except
-- those in retry (with their failed attempts so far).  Recovery replays
-- from the WAL only what this says is not yet applied.
CREATE TABLE deferred_progress (
    applied_upto   bigint NOT NULL,
    retry          bigint[] NOT NULL,
    retry_attempts integer[] NOT NULL
);
INSERT INTO deferred_progress VALUES (0, '{}', '{}');
REVOKE ALL ON deferred_progress FROM PUBLIC;

-- Entries that failed max_flush_attempts times, with what is needed to
-- retry them.  Payloads can be private: readable by superusers only unless
-- granted.
CREATE TABLE deferred_dead_letters (
    id          bigint PRIMARY KEY,
    target      text NOT NULL,
    op          text NOT NULL CHECK (op IN ('insert', 'update', 'delete')),
    payload     jsonb NOT NULL,
    role        text NOT NULL,
    enqueued_at timestamptz NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    attempts    integer NOT NULL,
    last_error  text NOT NULL,
    sqlstate    text NOT NULL
);
REVOKE ALL ON deferred_dead_letters FROM PUBLIC;

-- The calls are not STRICT: a NULL argument is an error, not a silent NULL.
CREATE FUNCTION deferred_insert(target regclass, rows jsonb)
RETURNS bigint
AS 'MODULE_PATHNAME', 'deferred_insert'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

CREATE FUNCTION deferred_update(target regclass, match jsonb, changes jsonb)
RETURNS bigint
AS 'MODULE_PATHNAME', 'deferred_update'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

CREATE FUNCTION deferred_delete(target regclass, match jsonb)
RETURNS bigint
AS 'MODULE_PATHNAME', 'deferred_delete'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

CREATE FUNCTION deferred_flush(timeout_ms integer DEFAULT 30000)
RETURNS bigint
AS 'MODULE_PATHNAME', 'deferred_flush'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

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
    OUT wal_segments bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'deferred_stats'
LANGUAGE C VOLATILE STRICT PARALLEL SAFE;
