-- the row of deferred_insert_built.sql built and returned, nothing queued
\set id random(1, 1000000000)
SELECT jsonb_build_object('id', :id::bigint, 'payload', 'the quick brown fox jumps over');
