-- Queuing is transactional, like NOTIFY: entries reach the queue only when
-- their transaction commits; ROLLBACK discards them, and ROLLBACK TO
-- SAVEPOINT discards what was queued since the savepoint.
CREATE TABLE tx (id int PRIMARY KEY);
SELECT enqueued AS enqueued_before FROM deferred_stats() \gset

BEGIN;
SELECT deferred_insert('tx', '{"id": 1}') > 0;
ROLLBACK;

BEGIN;
SELECT deferred_insert('tx', '{"id": 2}') > 0;
SAVEPOINT s1;
SELECT deferred_insert('tx', '{"id": 3}') > 0;
SAVEPOINT s2;
SELECT deferred_insert('tx', '{"id": 4}') > 0;
RELEASE SAVEPOINT s2;
ROLLBACK TO SAVEPOINT s1;
SELECT deferred_insert('tx', '{"id": 5}') > 0;
SAVEPOINT s3;
SELECT deferred_insert('tx', '{"id": 6}') > 0;
RELEASE SAVEPOINT s3;
COMMIT;

-- an error inside a transaction discards its entries with it
BEGIN;
SELECT deferred_insert('tx', '{"id": 7}') > 0;
SELECT 1 / 0;
COMMIT;

-- only the committed, not rolled-back entries were queued: 2, 5 and 6
SELECT enqueued - :enqueued_before AS enqueued FROM deferred_stats();
SELECT deferred_flush();
SELECT id FROM tx ORDER BY id;

-- a transaction with queued entries cannot be prepared for two-phase commit
BEGIN;
SELECT deferred_insert('tx', '{"id": 8}') > 0;
PREPARE TRANSACTION 'athena';
SELECT count(*) FROM pg_prepared_xacts;

-- nor queue from a read-only transaction
BEGIN READ ONLY;
SELECT deferred_insert('tx', '{"id": 9}');
ROLLBACK;

SELECT deferred_flush();
SELECT id FROM tx ORDER BY id;
