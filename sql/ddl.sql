-- A table dropped, renamed or altered between the call and the flush: the
-- entry goes to the dead letters with the error (or, when the change keeps
-- the statement valid, is applied to the same table): never a crash, never
-- a wrong table.
CREATE TABLE d1 (id int, note text, extra int);
CREATE TABLE d2 (id int);

-- dropped: dead-lettered, and a new table with the same name is not touched
SELECT deferred_insert('d1', '{"id": 1, "note": "x"}') AS e_dropped \gset
DROP TABLE d1;
CREATE TABLE d1 (id int, note text, extra int);
SELECT deferred_flush();
SELECT count(*) AS rows_in_new_d1 FROM d1;
SELECT op, attempts, sqlstate, last_error ~ '^relation with OID \d+ no longer exists$' AS says_gone
FROM deferred_dead_letters WHERE id = :e_dropped;

-- renamed: the entry follows the table, not the name
SELECT deferred_insert('d2', '{"id": 2}') > 0;
ALTER TABLE d2 RENAME TO d2_renamed;
CREATE TABLE d2 (id int);
SELECT deferred_flush();
SELECT (SELECT count(*) FROM d2_renamed) AS renamed, (SELECT count(*) FROM d2) AS new_d2;

-- a column dropped: dead-lettered with PostgreSQL's error
SELECT deferred_insert('d1', '{"id": 3, "extra": 3}') AS e_column \gset
ALTER TABLE d1 DROP COLUMN extra;
SELECT deferred_flush();
SELECT op, sqlstate, last_error FROM deferred_dead_letters WHERE id = :e_column;

-- a column type changed: values convert if they can
SELECT deferred_insert('d1', '{"id": 4, "note": "42"}') > 0;
SELECT deferred_insert('d1', '{"id": 5, "note": "not a number"}') AS e_type \gset
ALTER TABLE d1 ALTER COLUMN note TYPE int USING NULL;
SELECT deferred_flush();
SELECT * FROM d1 ORDER BY id;
SELECT sqlstate, last_error FROM deferred_dead_letters WHERE id = :e_type;

DROP TABLE d1, d2, d2_renamed;
