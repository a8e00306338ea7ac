-- Entries applied one at a time (updates, deletes, single inserts) run
-- through prepared statements the worker keeps across flushes.  A kept
-- statement must never act on the wrong table or with a stale shape.
CREATE TABLE cp (id int PRIMARY KEY, v int, note text);
INSERT INTO cp SELECT g, 0, 'n' || g FROM generate_series(1, 20) AS g;

-- many entries of one shape: one statement, prepared once, reused
SELECT count(*) FROM (
    SELECT deferred_update('cp', jsonb_build_object('id', g), jsonb_build_object('v', g * 10))
    FROM generate_series(1, 10) AS g) AS queued;
SELECT count(*) FROM (SELECT deferred_delete('cp', jsonb_build_object('id', g)) FROM generate_series(15, 20) AS g) AS queued;
SELECT deferred_flush();
SELECT id, v FROM cp WHERE v > 0 OR id > 12 ORDER BY id;

-- renamed, and a new table takes the old name: the entries follow the OID
SELECT deferred_update('cp', '{"id": 1}', '{"v": -1}') > 0;
SELECT deferred_delete('cp', '{"id": 2}') > 0;
ALTER TABLE cp RENAME TO cp_renamed;
CREATE TABLE cp (id int PRIMARY KEY, v int, note text);
INSERT INTO cp VALUES (1, 0, 'new'), (2, 0, 'new');
SELECT deferred_flush();
SELECT id, v FROM cp_renamed WHERE id <= 2 ORDER BY id;
SELECT id, v FROM cp ORDER BY id;
-- and entries for the new table reach the new table, not the renamed one
SELECT deferred_update('cp', '{"id": 1}', '{"v": 100}') > 0;
SELECT deferred_flush();
SELECT (SELECT v FROM cp WHERE id = 1) AS new_table, (SELECT v FROM cp_renamed WHERE id = 1) AS renamed;

-- a column retyped between flushes: the kept statement follows
SELECT deferred_update('cp_renamed', '{"id": 3}', '{"note": "x"}') > 0;
SELECT deferred_flush();
ALTER TABLE cp_renamed ALTER COLUMN note TYPE int USING NULL;
SELECT deferred_update('cp_renamed', '{"id": 3}', '{"note": 33}') > 0;
SELECT deferred_flush();
SELECT id, note FROM cp_renamed WHERE id = 3;
-- a column dropped: the entry fails with PostgreSQL's error
SELECT deferred_update('cp_renamed', '{"id": 3}', '{"note": 34}') AS e_dropped \gset
ALTER TABLE cp_renamed DROP COLUMN note;
SELECT deferred_flush();
SELECT op, sqlstate, last_error FROM deferred_dead_letters WHERE id = :e_dropped;

-- statements are kept per role: row-level security applies to each
CREATE ROLE cp_alice;
CREATE ROLE cp_bob;
CREATE TABLE shared (id int, owner name, v int);
INSERT INTO shared VALUES (1, 'cp_alice', 0), (2, 'cp_bob', 0);
GRANT SELECT, UPDATE ON shared TO cp_alice, cp_bob;
ALTER TABLE shared ENABLE ROW LEVEL SECURITY;
CREATE POLICY mine ON shared USING (owner = current_user);
SET ROLE cp_alice;
SELECT deferred_update('shared', '{"v": 0}', '{"v": 1}') > 0;
SET ROLE cp_bob;
SELECT deferred_update('shared', '{"v": 0}', '{"v": 2}') > 0;
RESET ROLE;
SELECT deferred_flush();
SELECT * FROM shared ORDER BY id;

-- more statements than the worker keeps (64): the least recently used are
-- let go and prepared again when needed; every entry applies
DO $$
BEGIN
    FOR i IN 1..70 LOOP
        EXECUTE format('CREATE TABLE w%s (id int, v int)', i);
        EXECUTE format('INSERT INTO w%s VALUES (1, 0), (2, 0)', i);
    END LOOP;
END $$;
CREATE FUNCTION w_sum() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    total bigint := 0;
    part bigint;
BEGIN
    FOR i IN 1..70 LOOP
        EXECUTE format('SELECT coalesce(sum(v), 0) + 1000 * count(*) FROM w%s', i) INTO part;
        total := total + part;
    END LOOP;
    RETURN total;
END $$;
SELECT count(*) FROM (
    SELECT deferred_update(('w' || g)::regclass, '{"id": 1}', jsonb_build_object('v', g))
    FROM generate_series(1, 70) AS g ORDER BY g) AS queued;
SELECT deferred_flush();
SELECT w_sum();
SELECT count(*) FROM (
    SELECT deferred_update(('w' || g)::regclass, '{"id": 2}', jsonb_build_object('v', g)),
           deferred_delete(('w' || (71 - g))::regclass, '{"id": 1}')
    FROM generate_series(1, 70) AS g ORDER BY g) AS queued;
SELECT deferred_flush();
SELECT w_sum();
DO $$
BEGIN
    FOR i IN 1..70 LOOP
        EXECUTE format('DROP TABLE w%s', i);
    END LOOP;
END $$;
DROP FUNCTION w_sum();

DROP TABLE cp, cp_renamed, shared;
DROP ROLE cp_alice, cp_bob;
