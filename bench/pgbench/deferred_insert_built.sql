-- the same call with the row built in SQL, for comparison: jsonb_build_object
-- alone costs about a third of SELECT 1's throughput (bench/run.sh reports it)
\set id random(1, 1000000000)
SELECT deferred_insert('bench_t', jsonb_build_object('id', :id::bigint, 'payload', 'the quick brown fox jumps over'));
