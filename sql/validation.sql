-- Bad input gets a clear ERROR at the call, with the right SQLSTATE, and
-- nothing is queued.  Each case runs through try(), which returns the
-- SQLSTATE and message of the error (or 'queued').
CREATE TABLE v (id int PRIMARY KEY, name text, total int GENERATED ALWAYS AS (id * 2) STORED);
CREATE VIEW v_view AS SELECT * FROM v;
CREATE SEQUENCE v_seq;
CREATE TEMP TABLE v_temp (id int);
CREATE ROLE athena_nobody;
GRANT SELECT ON v TO athena_nobody;

CREATE FUNCTION try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN 'queued';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;

SELECT enqueued AS enqueued_before FROM deferred_stats() \gset

SELECT label, try(stmt) AS error FROM (VALUES
    ('null target',           $$SELECT deferred_insert(NULL, '{"id": 1}')$$),
    ('null rows',             $$SELECT deferred_insert('v', NULL)$$),
    ('null match',            $$SELECT deferred_update('v', NULL, '{"name": "x"}')$$),
    ('null changes',          $$SELECT deferred_update('v', '{"id": 1}', NULL)$$),
    ('null delete match',     $$SELECT deferred_delete('v', NULL)$$),
    ('rows is a number',      $$SELECT deferred_insert('v', '1')$$),
    ('rows is a string',      $$SELECT deferred_insert('v', '"id"')$$),
    ('rows is null json',     $$SELECT deferred_insert('v', 'null')$$),
    ('rows is an empty array', $$SELECT deferred_insert('v', '[]')$$),
    ('array of numbers',      $$SELECT deferred_insert('v', '[{"id": 1}, 2]')$$),
    ('array of arrays',       $$SELECT deferred_insert('v', '[[{"id": 1}]]')$$),
    ('array with null',       $$SELECT deferred_insert('v', '[{"id": 1}, null]')$$),
    ('empty row',             $$SELECT deferred_insert('v', '{}')$$),
    ('unknown column',        $$SELECT deferred_insert('v', '{"id": 1, "nope": 2}')$$),
    ('unknown in later row',  $$SELECT deferred_insert('v', '[{"id": 1}, {"id": 2, "Name": "x"}]')$$),
    ('system column',         $$SELECT deferred_insert('v', '{"id": 1, "ctid": "(0,1)"}')$$),
    ('generated column',      $$SELECT deferred_insert('v', '{"id": 1, "total": 5}')$$),
    ('match is an array',     $$SELECT deferred_update('v', '[{"id": 1}]', '{"name": "x"}')$$),
    ('match is empty',        $$SELECT deferred_update('v', '{}', '{"name": "x"}')$$),
    ('changes is empty',      $$SELECT deferred_update('v', '{"id": 1}', '{}')$$),
    ('changes is a string',   $$SELECT deferred_update('v', '{"id": 1}', '"x"')$$),
    ('unknown match column',  $$SELECT deferred_update('v', '{"nope": 1}', '{"name": "x"}')$$),
    ('unknown change column', $$SELECT deferred_update('v', '{"id": 1}', '{"nope": 1}')$$),
    ('generated change',      $$SELECT deferred_update('v', '{"id": 1}', '{"total": 1}')$$),
    ('delete empty match',    $$SELECT deferred_delete('v', '{}')$$),
    ('delete unknown column', $$SELECT deferred_delete('v', '{"nope": 1}')$$),
    ('missing table',         $$SELECT deferred_insert('no_such_table', '{"id": 1}')$$),
    ('view',                  $$SELECT deferred_insert('v_view', '{"id": 1}')$$),
    ('sequence',              $$SELECT deferred_insert('v_seq', '{"last_value": 1}')$$),
    ('system catalog',        $$SELECT deferred_insert('pg_class', '{"relname": "x"}')$$),
    ('temporary table',       $$SELECT deferred_insert('v_temp', '{"id": 1}')$$),
    ('10000 unknown keys',    $$SELECT deferred_insert('v', (SELECT jsonb_object_agg('k' || g, g) FROM generate_series(1, 10000) g))$$),
    ('deeply nested value',   $$SELECT deferred_insert('v', ('{"name": ' || repeat('[', 100000) || repeat(']', 100000) || '}')::jsonb)$$),
    ('65536 runs of columns', $$SELECT deferred_insert('v', (SELECT jsonb_agg(CASE WHEN g % 2 = 0 THEN jsonb_build_object('id', g)
                                                            ELSE jsonb_build_object('name', 'x') END) FROM generate_series(1, 65537) g))$$)
) AS cases(label, stmt);

-- a role without the privilege gets the usual permission error
SET ROLE athena_nobody;
SELECT label, try(stmt) AS error FROM (VALUES
    ('insert without INSERT', $$SELECT deferred_insert('v', '{"id": 1}')$$),
    ('update without UPDATE', $$SELECT deferred_update('v', '{"id": 1}', '{"name": "x"}')$$),
    ('delete without DELETE', $$SELECT deferred_delete('v', '{"id": 1}')$$)
) AS cases(label, stmt);
RESET ROLE;

-- nothing was queued by any of them
SELECT enqueued - :enqueued_before AS enqueued, pending FROM deferred_stats();
SELECT deferred_flush();
SELECT count(*) FROM v;

DROP FUNCTION try(text);
DROP TABLE v CASCADE;
DROP ROLE athena_nobody;
