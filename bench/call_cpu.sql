-- bench/call_cpu.sql: the backend CPU time of one deferred_insert() call,
-- committed, without a client round trip: a procedure commits N calls in
-- a loop, and the same loop without the call is subtracted.  CPU time
-- (utime + stime of this backend, from /proc/self/stat, in 10 ms ticks) is
-- steadier than throughput on a shared machine; compare two builds by
-- running this against each in turn.  Needs a superuser (pg_read_file),
-- Linux, the extension, and a table bench_t (id bigint, payload text);
-- entries are left queued.  Set athena_deferred.wal_sync = batch and
-- batch_window_ms = 0 first: with wal_sync = always each call also waits
-- for its fsync (counted as system time), and a flushing worker competes.
--
--     psql -v n=100000 -f bench/call_cpu.sql
\if :{?n}
\else
\set n 100000
\endif
CREATE FUNCTION pg_temp.cpu_ticks() RETURNS bigint LANGUAGE sql AS $$
    SELECT split_part(s, ' ', 12)::bigint + split_part(s, ' ', 13)::bigint
    FROM (SELECT split_part(pg_read_file('/proc/self/stat'), ') ', 2) AS s) AS stat $$;
CREATE PROCEDURE pg_temp.calls(n int) LANGUAGE plpgsql AS $$
DECLARE r jsonb := '{"id": 123456789, "payload": "the quick brown fox jumps over"}';
BEGIN
    FOR i IN 1..n LOOP PERFORM deferred_insert('bench_t', r); COMMIT; END LOOP;
END $$;
CREATE PROCEDURE pg_temp.loop_only(n int) LANGUAGE plpgsql AS $$
DECLARE r jsonb := '{"id": 123456789, "payload": "the quick brown fox jumps over"}';
BEGIN
    FOR i IN 1..n LOOP PERFORM r; COMMIT; END LOOP;
END $$;
SELECT pg_temp.cpu_ticks() AS t0 \gset
CALL pg_temp.loop_only(:n);
SELECT pg_temp.cpu_ticks() AS t1 \gset
CALL pg_temp.calls(:n);
SELECT pg_temp.cpu_ticks() AS t2 \gset
SELECT round((:t1 - :t0) * 10000.0 / :n, 2) AS loop_us,
       round(((:t2 - :t1) - (:t1 - :t0)) * 10000.0 / :n, 2) AS call_us;
