-- one row queued with athena_deferred (same row as insert.sql)
\set id random(1, 1000000000)
SELECT deferred_insert('bench_t', jsonb_build_object('id', :id::bigint, 'payload', 'the quick brown fox jumps over'));
