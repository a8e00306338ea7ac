-- With athena_deferred.enabled = off the calls apply the mutation at once in
-- the caller's transaction and return NULL; errors surface in the caller.
CREATE TABLE imm (id int PRIMARY KEY, name text);
SELECT enqueued AS enqueued_before FROM deferred_stats() \gset
SET athena_deferred.enabled = off;

SELECT deferred_insert('imm', '[{"id": 1, "name": "a"}, {"id": 2}]') IS NULL AS returns_null;
SELECT * FROM imm ORDER BY id;
SELECT deferred_update('imm', '{"id": 2}', '{"name": "b"}');
SELECT deferred_delete('imm', '{"id": 1}');
SELECT * FROM imm ORDER BY id;

-- a constraint violation is the caller's error now
SELECT deferred_insert('imm', '{"id": 2}');

-- and it is as transactional as the statement it stands for
BEGIN;
SELECT deferred_insert('imm', '{"id": 3}');
ROLLBACK;
SELECT * FROM imm ORDER BY id;

-- validation is the same as for deferred calls
SELECT deferred_insert('imm', '{"nope": 1}');

RESET athena_deferred.enabled;
SELECT enqueued - :enqueued_before AS enqueued FROM deferred_stats();
