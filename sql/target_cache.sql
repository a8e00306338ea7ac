-- Each backend caches what a call needs to know about its target table
-- (its columns, which are generated); every change to the table reaches
-- the cache before the next call.  Each case calls once to fill the cache,
-- changes the table, and calls again in the same session.  Entries are
-- flushed before each change, so that what is shown is what the calls
-- accepted.
CREATE FUNCTION tc_try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'queued';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;

-- dropped and recreated with the same name, other columns: the call
-- follows the new table (a new OID), old columns are refused
CREATE TABLE tc (id int, old_col text);
SELECT tc_try($$SELECT deferred_insert('tc', '{"id": 1, "old_col": "a"}')$$);
SELECT deferred_flush();
DROP TABLE tc;
CREATE TABLE tc (id int, new_col text);
SELECT tc_try($$SELECT deferred_insert('tc', '{"id": 2, "old_col": "b"}')$$);
SELECT tc_try($$SELECT deferred_insert('tc', '{"id": 3, "new_col": "c"}')$$);
SELECT deferred_flush();
SELECT * FROM tc ORDER BY id;

-- the same through a prepared statement, whose regclass constant was
-- resolved when it was planned: the plan follows the new table
PREPARE ins(jsonb) AS SELECT deferred_insert('tc', $1) > 0 AS queued;
EXECUTE ins('{"id": 4, "new_col": "d"}');
SELECT deferred_flush();
DROP TABLE tc;
CREATE TABLE tc (id int, newer_col text);
EXECUTE ins('{"id": 5, "newer_col": "e"}');
SELECT tc_try($$EXECUTE ins('{"id": 6, "new_col": "f"}')$$);
SELECT deferred_flush();
SELECT * FROM tc ORDER BY id;
DEALLOCATE ins;

-- a table dropped under a cached description, called by OID: refused
SELECT 'tc'::regclass::oid AS tc_oid \gset
DROP TABLE tc;
SELECT tc_try(format($$SELECT deferred_insert(%s, '{"id": 7}')$$, :tc_oid))
    ~ '^42P01: relation with OID \d+ does not exist$' AS refused;

-- search_path: the name resolves in the caller's path, at each call
CREATE SCHEMA tc_a;
CREATE SCHEMA tc_b;
CREATE TABLE tc_a.t (id int, a_only text);
CREATE TABLE tc_b.t (id int, b_only text);
SET search_path = tc_a, public;
SELECT tc_try($$SELECT deferred_insert('t', '{"id": 1, "a_only": "x"}')$$);
SET search_path = tc_b, public;
SELECT tc_try($$SELECT deferred_insert('t', '{"id": 2, "a_only": "y"}')$$);
SELECT tc_try($$SELECT deferred_insert('t', '{"id": 3, "b_only": "z"}')$$);
-- and a prepared statement is planned again for the new path
PREPARE ins_t(jsonb) AS SELECT deferred_insert('t', $1) > 0 AS queued;
EXECUTE ins_t('{"id": 4, "b_only": "w"}');
SET search_path = tc_a, public;
EXECUTE ins_t('{"id": 5, "a_only": "v"}');
DEALLOCATE ins_t;
RESET search_path;
SELECT deferred_flush();
SELECT 'a' AS s, id, a_only AS val FROM tc_a.t
UNION ALL SELECT 'b', id, b_only FROM tc_b.t ORDER BY 1, 2;
DROP SCHEMA tc_a, tc_b CASCADE;

-- columns added, renamed, dropped, made generated
CREATE TABLE tc2 (id int, x int);
SELECT tc_try($$SELECT deferred_insert('tc2', '{"id": 1, "x": 1}')$$);
SELECT tc_try($$SELECT deferred_insert('tc2', '{"id": 2, "y": 2}')$$);
SELECT deferred_flush();
ALTER TABLE tc2 ADD COLUMN y int;
SELECT tc_try($$SELECT deferred_insert('tc2', '{"id": 3, "y": 3}')$$);
SELECT deferred_flush();
ALTER TABLE tc2 RENAME COLUMN x TO x2;
SELECT tc_try($$SELECT deferred_insert('tc2', '{"id": 4, "x": 4}')$$);
SELECT tc_try($$SELECT deferred_update('tc2', '{"x": 1}', '{"y": 4}')$$);
SELECT tc_try($$SELECT deferred_insert('tc2', '{"id": 5, "x2": 5}')$$);
SELECT deferred_flush();
ALTER TABLE tc2 DROP COLUMN y;
SELECT tc_try($$SELECT deferred_insert('tc2', '{"id": 6, "y": 6}')$$);
SELECT tc_try($$SELECT deferred_delete('tc2', '{"y": 3}')$$);
SELECT deferred_flush();
ALTER TABLE tc2 ADD COLUMN g int GENERATED ALWAYS AS (id * 10) STORED;
SELECT tc_try($$SELECT deferred_insert('tc2', '{"id": 7, "g": 7}')$$);
SELECT tc_try($$SELECT deferred_update('tc2', '{"g": 10}', '{"x2": 11}')$$);
SELECT deferred_flush();
SELECT * FROM tc2 ORDER BY id;

-- DDL in the calling transaction is seen by its next call; rolled back,
-- it is forgotten
BEGIN;
ALTER TABLE tc2 ADD COLUMN z int;
SELECT tc_try($$SELECT deferred_insert('tc2', '{"id": 8, "z": 8}')$$);
ROLLBACK;
SELECT tc_try($$SELECT deferred_insert('tc2', '{"id": 9, "z": 9}')$$);
BEGIN;
SELECT tc_try($$SELECT deferred_insert('tc2', '{"id": 10, "x2": 10}')$$);
ALTER TABLE tc2 DROP COLUMN x2;
SELECT tc_try($$SELECT deferred_insert('tc2', '{"id": 11, "x2": 11}')$$);
ROLLBACK;
SELECT tc_try($$SELECT deferred_insert('tc2', '{"id": 12, "x2": 12}')$$);
SELECT deferred_flush();
SELECT * FROM tc2 ORDER BY id;

-- privileges are checked at each call: revoked, granted on columns only,
-- and through membership in a role that is revoked and granted again
CREATE ROLE athena_tc_user;
CREATE ROLE athena_tc_group;
GRANT athena_tc_group TO athena_tc_user;
GRANT INSERT, DELETE ON tc2 TO athena_tc_user;
GRANT UPDATE ON tc2 TO athena_tc_group;
GRANT SELECT (id) ON tc2 TO athena_tc_user;
SET ROLE athena_tc_user;
SELECT tc_try($$SELECT deferred_insert('tc2', '{"id": 20, "x2": 20}')$$);
SELECT tc_try($$SELECT deferred_update('tc2', '{"id": 20}', '{"x2": 21}')$$);
SELECT tc_try($$SELECT deferred_delete('tc2', '{"id": 1}')$$);
RESET ROLE;
SELECT deferred_flush();
REVOKE INSERT, DELETE ON tc2 FROM athena_tc_user;
REVOKE UPDATE ON tc2 FROM athena_tc_group;
SET ROLE athena_tc_user;
SELECT tc_try($$SELECT deferred_insert('tc2', '{"id": 21, "x2": 21}')$$);
SELECT tc_try($$SELECT deferred_update('tc2', '{"id": 20}', '{"x2": 22}')$$);
SELECT tc_try($$SELECT deferred_delete('tc2', '{"id": 20}')$$);
RESET ROLE;
GRANT INSERT (id) ON tc2 TO athena_tc_user;
SET ROLE athena_tc_user;
SELECT tc_try($$SELECT deferred_insert('tc2', '{"id": 22}')$$);
SELECT tc_try($$SELECT deferred_insert('tc2', '{"id": 23, "x2": 23}')$$);
RESET ROLE;
REVOKE athena_tc_group FROM athena_tc_user;
GRANT UPDATE ON tc2 TO athena_tc_group;
SET ROLE athena_tc_user;
SELECT tc_try($$SELECT deferred_update('tc2', '{"id": 22}', '{"x2": 24}')$$);
RESET ROLE;
GRANT athena_tc_group TO athena_tc_user;
SET ROLE athena_tc_user;
SELECT tc_try($$SELECT deferred_update('tc2', '{"id": 22}', '{"x2": 25}')$$);
RESET ROLE;
SELECT deferred_flush();
SELECT * FROM tc2 ORDER BY id;

-- nothing above was accepted at the call and refused at the flush
SELECT count(*) AS dead_letters FROM deferred_dead_letters
WHERE target IN ('public.tc', 'public.tc2', 'tc_a.t', 'tc_b.t');

DROP TABLE tc2;
DROP OWNED BY athena_tc_user, athena_tc_group;
DROP ROLE athena_tc_user, athena_tc_group;
DROP FUNCTION tc_try(text);
