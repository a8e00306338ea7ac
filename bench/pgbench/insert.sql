-- the same row, inserted directly into an identical plain table
\set id random(1, 1000000000)
INSERT INTO bench_plain (id, payload) VALUES (:id, 'the quick brown fox jumps over');
