-- one row queued with athena_deferred, sent as the application would: its
-- JSON as one bound parameter (pgbench -D row=...; see bench/run.sh).  The
-- same row as insert.sql, apart from the id, which pgbench cannot vary
-- inside a string.
SELECT deferred_insert('bench_t', :row);
