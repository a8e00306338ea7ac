-- Batches of inserts (consecutive entries for one table, by one role, with
-- the same columns) are applied by COPY fed from the queue, unless COPY
-- cannot give what INSERT gives; then by INSERT ... SELECT FROM
-- json_populate_recordset(), as single entries always are.  Either way the
-- rows, errors, triggers and privileges are the same.

-- Which path applied a batch: a statement trigger sees whether a COPY is in
-- progress in its backend, and who it runs as.
CREATE TABLE path_log (n serial, tab text, via_copy boolean, who name);
GRANT INSERT ON path_log TO PUBLIC;
GRANT USAGE ON SEQUENCE path_log_n_seq TO PUBLIC;
CREATE FUNCTION log_path() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO path_log (tab, via_copy, who)
    VALUES (TG_TABLE_NAME,
            EXISTS (SELECT FROM pg_stat_progress_copy WHERE pid = pg_backend_pid()),
            current_user);
    RETURN NULL;
END $$;

-- Every kind of JSON value into every common kind of column.  The reference
-- table gets the same rows one entry at a time in immediate mode, through
-- the statement path.
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE DOMAIN jdoc AS jsonb;
CREATE DOMAIN jtext AS json;
CREATE TABLE typed (
    id       int PRIMARY KEY,
    i8       bigint,
    num      numeric(20,5),
    f8       float8,
    t        text,
    vc       varchar(5),
    ch       char(3),
    j        json,
    jb       jsonb,
    dj       jdoc,
    djt      jtext,
    b        boolean,
    ts       timestamptz,
    d        date,
    iv       interval,
    u        uuid,
    ba       bytea,
    m        mood,
    p        posint,
    r        int4range,
    "Odd Col; x" text,
    added_by text DEFAULT current_user,
    g        int GENERATED ALWAYS AS (id * 2) STORED
);
CREATE TABLE typed_ref (LIKE typed INCLUDING ALL);
CREATE TRIGGER typed_path AFTER INSERT ON typed FOR EACH STATEMENT EXECUTE FUNCTION log_path();
CREATE TRIGGER typed_path AFTER INSERT ON typed_ref FOR EACH STATEMENT EXECUTE FUNCTION log_path();

-- every row names every column: the entries form one batch.  (Entries
-- whose JSON text has no backslash are converted by a scanner of the
-- extension's own, the others with PostgreSQL's JSON lexer: rows 3, 7 and
-- 8 take the first way.)
CREATE TABLE samples (k int, r jsonb);
INSERT INTO samples VALUES
 (1, '{"id": 1, "i8": 9007199254740993, "num": 12345.678901, "f8": 1.5e300,
       "t": "tab\there, new\nline, cr\rret, back\\slash, \\N, quote\"d",
       "vc": "abcde", "ch": "ab",
       "j": {"a": [1, 2, {"b": "x\ty"}], "c": null},
       "jb": {"a": [1, 2, {"b": "x\ty"}], "c": null},
       "dj": "a \"quoted\" \\ string", "djt": "a \"quoted\" \\ string",
       "b": true, "ts": "2026-01-02T03:04:05Z", "d": "2026-02-28",
       "iv": "1 day 2 hours", "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
       "ba": "\\x01ff", "m": "happy", "p": 5, "r": "[1,5)", "Odd Col; x": "odd"}'),
 (2, '{"id": 2, "i8": -1, "num": 1e3, "f8": "NaN",
       "t": "\\N", "vc": "", "ch": "", "j": "just a string", "jb": "just a string",
       "dj": 42, "djt": true, "b": "yes", "ts": "2026-06-01 12:00:00+02", "d": "infinity",
       "iv": "P1DT2H", "u": "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
       "ba": "abc\\\\def", "m": "sad", "p": 1, "r": "empty", "Odd Col; x": ""}'),
 (3, '{"id": 3, "i8": null, "num": null, "f8": null, "t": null, "vc": null, "ch": null,
       "j": null, "jb": null, "dj": null, "djt": null, "b": null, "ts": null, "d": null,
       "iv": null, "u": null, "ba": null, "m": null, "p": null, "r": null, "Odd Col; x": null}'),
 (4, '{"id": 4, "i8": 0, "num": -0.5, "f8": -0, "t": {"x": [1, "a\tb"]},
       "vc": "\u00e9\u00e9", "ch": "\ud83d\ude00", "j": [], "jb": [1.50, "two", false],
       "dj": [], "djt": {}, "b": false, "ts": "infinity", "d": "2000-01-01",
       "iv": "-1 second", "u": "00000000-0000-0000-0000-000000000000",
       "ba": "", "m": "ok", "p": 2147483647, "r": "(,)", "Odd Col; x": [true]}'),
 (5, '{"id": 5, "i8": 1, "num": 0, "f8": "-Infinity", "t": 42, "vc": "x", "ch": "abc",
       "j": 1.50, "jb": 1.50, "dj": true, "djt": "\u00e9", "b": 1, "ts": "2026-01-02T03:04:05.123456+05:30",
       "d": "1999-12-31", "iv": "0", "u": "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
       "ba": "\\\\", "m": "ok", "p": 3, "r": "[3,3]", "Odd Col; x": "  spaced  "}'),
 (6, '{"id": 6, "i8": 7, "num": 1.000001, "f8": 0.1, "t": "", "vc": " ", "ch": " ",
       "j": "\\u0041 not an escape", "jb": "line\nbreak", "dj": "\t", "djt": "\r\n",
       "b": "off", "ts": "epoch", "d": "epoch", "iv": "1 mon", "u": "a0eebc999c0b4ef8bb6d6bb9bd380a11",
       "ba": "\\x", "m": "happy", "p": 10, "r": "[-5,5]", "Odd Col; x": "\\"}'),
 (7, '{"id": 7, "i8": 123, "num": 3.14159, "f8": 2.5e-3,
       "t": {"nested": {"deep": [1, "x y", null, true, {}], "e": []}},
       "vc": "éàü", "ch": "€", "j": {"k": "v", "n": [1.0, 2, -3e5]}, "jb": "plain",
       "dj": "plain", "djt": [1, {"a": "b"}], "b": "true", "ts": "2026-03-04 05:06:07+00",
       "d": "2026-03-04", "iv": "3 days", "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
       "ba": "raw", "m": "ok", "p": 7, "r": "[7,8)", "Odd Col; x": "{[not json"}'),
 (8, '{"id": 8, "i8": -9223372036854775808, "num": -1.5E+2, "f8": 1e-300, "t": false,
       "vc": "😀😀", "ch": null, "j": true, "jb": null, "dj": {"a": {"b": {}}},
       "djt": "", "b": "f", "ts": "2026-12-31T23:59:59.999999-12:00", "d": "0001-01-01",
       "iv": "1 year 2 mons", "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "ba": "bytes",
       "m": "sad", "p": 8, "r": "[,8]", "Odd Col; x": "}"}');

SELECT count(*) FROM (SELECT deferred_insert('typed', r) FROM samples ORDER BY k) AS queued;
SELECT deferred_flush();
SET athena_deferred.enabled = off;
SELECT count(*) FROM (SELECT deferred_insert('typed_ref', r) FROM samples ORDER BY k) AS applied;
RESET athena_deferred.enabled;

-- one COPY for the batch, eight statements for the reference
SELECT tab, via_copy, count(*) FROM path_log GROUP BY tab, via_copy ORDER BY tab;
-- identical rows, compared as text (json keeps its text)
SELECT id, typed::text AS only_in_copy FROM typed
EXCEPT SELECT id, typed_ref::text FROM typed_ref ORDER BY id;
SELECT id, typed_ref::text AS only_in_statements FROM typed_ref
EXCEPT SELECT id, typed::text FROM typed ORDER BY id;
\x on
SELECT * FROM typed ORDER BY id;
\x off

-- a column name with a double quote in it (a backslash in the JSON text)
CREATE TABLE quoted (id int, "Say ""hi""" text);
CREATE TRIGGER quoted_path AFTER INSERT ON quoted FOR EACH STATEMENT EXECUTE FUNCTION log_path();
TRUNCATE path_log;
SELECT count(*) FROM (SELECT deferred_insert('quoted', jsonb_build_object('id', g, 'Say "hi"', 'hi ' || g)) FROM generate_series(1, 2) AS g) AS queued;
SELECT deferred_flush();
SELECT * FROM quoted ORDER BY id;
SELECT tab, via_copy FROM path_log;

-- a value a column cannot take fails its entry alone, with the error
-- INSERT gives (the batch is split down to the entry, which runs alone)
TRUNCATE path_log;
SELECT count(*) FROM (
    SELECT deferred_insert('typed', jsonb_build_object('id', 10 + g, 'vc', CASE WHEN g = 3 THEN 'toolong' ELSE 'ok' END))
    FROM generate_series(1, 4) AS g ORDER BY g) AS queued;
SELECT deferred_flush();
SELECT id, vc FROM typed WHERE id > 10 ORDER BY id;
SELECT op, attempts, sqlstate, last_error FROM deferred_dead_letters WHERE target = 'public.typed';

-- Arrays and composites are built from JSON arrays and objects element by
-- element: such batches take the statement path.
CREATE TYPE pair AS (a int, b text);
CREATE TABLE arrays (id int, tags text[], grid int[], pr pair);
CREATE TABLE arrays_ref (LIKE arrays);
CREATE TRIGGER arrays_path AFTER INSERT ON arrays FOR EACH STATEMENT EXECUTE FUNCTION log_path();
TRUNCATE path_log;
TRUNCATE samples;
INSERT INTO samples VALUES
 (1, '{"id": 1, "tags": ["a", "b,c", "d\"e", null], "grid": [[1, 2], [3, 4]], "pr": {"a": 1, "b": "x"}}'),
 (2, '{"id": 2, "tags": "{x,y}", "grid": [], "pr": "(2,y)"}'),
 (3, '{"id": 3, "tags": null, "grid": null, "pr": null}');
SELECT count(*) FROM (SELECT deferred_insert('arrays', r) FROM samples ORDER BY k) AS queued;
SELECT deferred_flush();
SET athena_deferred.enabled = off;
SELECT count(*) FROM (SELECT deferred_insert('arrays_ref', r) FROM samples ORDER BY k) AS applied;
RESET athena_deferred.enabled;
SELECT tab, via_copy, count(*) FROM path_log GROUP BY tab, via_copy;
SELECT arrays::text FROM arrays EXCEPT SELECT arrays_ref::text FROM arrays_ref;
SELECT * FROM arrays ORDER BY id;

-- Triggers see the queuing role, as with INSERT; defaults too.
CREATE ROLE athena_copier;
CREATE TABLE owned (id int, who name, added_by text DEFAULT current_user);
CREATE FUNCTION stamp_who() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.who := current_user;
    RETURN NEW;
END $$;
CREATE TRIGGER owned_who BEFORE INSERT ON owned FOR EACH ROW EXECUTE FUNCTION stamp_who();
CREATE TRIGGER owned_path AFTER INSERT ON owned FOR EACH STATEMENT EXECUTE FUNCTION log_path();
GRANT INSERT ON owned TO athena_copier;
TRUNCATE path_log;
SET ROLE athena_copier;
SELECT count(*) FROM (SELECT deferred_insert('owned', jsonb_build_object('id', g)) FROM generate_series(1, 3) AS g) AS queued;
RESET ROLE;
SELECT deferred_flush();
SELECT * FROM owned ORDER BY id;
SELECT tab, via_copy, who FROM path_log;

-- COPY checks INSERT privileges on the columns as INSERT does: a column
-- privilege revoked before the flush fails each entry
CREATE TABLE colpriv (id int, secret text);
GRANT INSERT (id) ON colpriv TO athena_copier;
GRANT INSERT (secret) ON colpriv TO athena_copier;
SET ROLE athena_copier;
SELECT count(*) FROM (SELECT deferred_insert('colpriv', jsonb_build_object('id', g, 'secret', 's')) FROM generate_series(1, 2) AS g) AS queued;
RESET ROLE;
REVOKE INSERT (secret) ON colpriv FROM athena_copier;
SELECT deferred_flush();
SELECT count(*) FROM colpriv;
SELECT op, role, sqlstate, last_error FROM deferred_dead_letters WHERE target = 'public.colpriv';

-- so does the schema: without USAGE on it INSERT cannot name the table
CREATE SCHEMA hidden;
CREATE TABLE hidden.t (id int);
GRANT USAGE ON SCHEMA hidden TO athena_copier;
GRANT INSERT ON hidden.t TO athena_copier;
SET ROLE athena_copier;
SELECT count(*) FROM (SELECT deferred_insert('hidden.t', jsonb_build_object('id', g)) FROM generate_series(1, 2) AS g) AS queued;
RESET ROLE;
REVOKE USAGE ON SCHEMA hidden FROM athena_copier;
SELECT deferred_flush();
SELECT count(*) FROM hidden.t;
SELECT op, sqlstate, last_error FROM deferred_dead_letters WHERE target = 'hidden.t';

-- Row-level security: COPY refuses it, the statement path applies the
-- policy.  The forged row fails alone; the others are applied.
CREATE TABLE guarded (id int, owner name DEFAULT current_user);
GRANT SELECT, INSERT ON guarded TO athena_copier;
ALTER TABLE guarded ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON guarded USING (owner = current_user) WITH CHECK (owner = current_user);
CREATE TRIGGER guarded_path AFTER INSERT ON guarded FOR EACH STATEMENT EXECUTE FUNCTION log_path();
TRUNCATE path_log;
SET ROLE athena_copier;
SELECT deferred_insert('guarded', '{"id": 1, "owner": "athena_copier"}') > 0;
SELECT deferred_insert('guarded', '{"id": 2, "owner": "postgres"}') > 0;
SELECT deferred_insert('guarded', '{"id": 3, "owner": "athena_copier"}') > 0;
RESET ROLE;
SELECT deferred_flush();
SELECT * FROM guarded ORDER BY id;
SELECT bool_or(via_copy) AS any_copy, count(*) > 0 AS statements FROM path_log;
SELECT payload, sqlstate, last_error FROM deferred_dead_letters WHERE target = 'public.guarded';

-- COPY would write a GENERATED ALWAYS identity column; INSERT refuses to
CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY, v int);
SELECT count(*) FROM (SELECT deferred_insert('ident', jsonb_build_object('id', g, 'v', g)) FROM generate_series(1, 2) AS g) AS queued;
SELECT deferred_flush();
SELECT count(*) FROM ident;
SELECT count(*), min(sqlstate), min(last_error) FROM deferred_dead_letters WHERE target = 'public.ident';

-- COPY ignores rules; INSERT applies them
CREATE TABLE ruled (id int);
CREATE TABLE rule_log (id int);
CREATE RULE ruled_log AS ON INSERT TO ruled DO ALSO INSERT INTO rule_log VALUES (NEW.id);
SELECT count(*) FROM (SELECT deferred_insert('ruled', jsonb_build_object('id', g)) FROM generate_series(1, 3) AS g) AS queued;
SELECT deferred_flush();
SELECT (SELECT count(*) FROM ruled) AS rows, (SELECT count(*) FROM rule_log) AS logged;

-- json_populate_recordset(NULL::table, ...) gives a column the rows do not
-- name a NULL and checks its domain: INSERT fails on a NOT NULL domain
-- column left out even when it has a default; COPY would take the default.
-- The batch keeps INSERT's behaviour.
CREATE DOMAIN required_int AS int NOT NULL;
CREATE TABLE dom_default (id int, x required_int DEFAULT 5);
SELECT count(*) FROM (SELECT deferred_insert('dom_default', jsonb_build_object('id', g)) FROM generate_series(1, 2) AS g) AS queued;
SELECT deferred_flush();
SELECT count(*) FROM dom_default;
SELECT count(*), min(sqlstate), min(last_error) FROM deferred_dead_letters WHERE target = 'public.dom_default';

-- One bad row in a batch of 1000: only its entry fails (three attempts, then
-- a dead letter); the other 999 are applied by COPY, in order.
CREATE TABLE big (n bigserial, id int PRIMARY KEY, v int CHECK (v >= 0));
CREATE TRIGGER big_path AFTER INSERT ON big FOR EACH STATEMENT EXECUTE FUNCTION log_path();
TRUNCATE path_log;
SELECT failed_attempts AS failed_before FROM deferred_stats \gset
SELECT count(*) FROM (
    SELECT deferred_insert('big', jsonb_build_object('id', g, 'v', CASE WHEN g = 500 THEN -1 ELSE g END))
    FROM generate_series(1, 1000) AS g ORDER BY g) AS queued;
SELECT deferred_flush();
SELECT count(*), min(id), max(id), count(*) FILTER (WHERE id = 500) AS bad FROM big;
SELECT count(*) AS out_of_order
FROM (SELECT row_number() OVER (ORDER BY n) AS by_arrival, row_number() OVER (ORDER BY id) AS by_entry FROM big) AS o
WHERE by_arrival <> by_entry;
SELECT failed_attempts - :failed_before AS failed_attempts FROM deferred_stats;
SELECT payload, attempts, sqlstate FROM deferred_dead_letters WHERE target = 'public.big';
-- the successful halves went through COPY
SELECT bool_and(via_copy) AS all_copy FROM path_log WHERE tab = 'big';

-- Rows whose values hold no backslash are converted straight into COPY's
-- buffer, each key checked to be the expected column's name as the row
-- writes it: column names that JSON escapes (a tab, a backslash, a quote)
-- or that are not ASCII, entries of several rows, each plain kind of value,
-- json columns given strings; the same rows as the statements give.
CREATE TABLE plain_keys (id int, "tab	col" text, "back\slash" text, "qu""ote" jsonb,
                         "é" numeric, j json, b boolean, n bigint);
CREATE TABLE plain_keys_ref (LIKE plain_keys);
CREATE TRIGGER plain_keys_path AFTER INSERT ON plain_keys FOR EACH STATEMENT EXECUTE FUNCTION log_path();
TRUNCATE path_log;
TRUNCATE samples;
INSERT INTO samples VALUES
 (1, jsonb_build_object('id', 1, E'tab\tcol', 'plain', 'back\slash', 'x y', 'qu"ote', 'str',
                        'é', 0, 'j', '{"a": [1, "b", null], "e": {}}'::jsonb, 'b', true, 'n', -0)),
 (2, jsonb_build_array(
       jsonb_build_object('id', 2, E'tab\tcol', '', 'back\slash', ' ', 'qu"ote', 'null',
                          'é', 1.50, 'j', 'a string', 'b', false, 'n', 9007199254740993),
       jsonb_build_object('id', 3, E'tab\tcol', 'é€😀', 'back\slash', 'a,b}', 'qu"ote', '[]'::jsonb,
                          'é', '-3e5'::numeric, 'j', '[[], [{}], "x y"]'::jsonb, 'b', null, 'n', -1),
       jsonb_build_object('id', 4, E'tab\tcol', null, 'back\slash', null, 'qu"ote', null,
                          'é', null, 'j', null, 'b', null, 'n', null))),
 (3, jsonb_build_object('id', 5, E'tab\tcol', '{[', 'back\slash', 'true', 'qu"ote', 12.5,
                        'é', 123456789012345678901234567890.000001, 'j', 'é', 'b', 'true'::jsonb, 'n', 0)),
 (4, jsonb_build_object('id', 6, E'tab\tcol', 'one\ttab', 'back\slash', 'x\y', 'qu"ote', '"',
                        'é', '1e-3'::numeric, 'j', '{"k": "a\nb"}'::jsonb, 'b', false, 'n', 7));
SELECT count(*) FROM (SELECT deferred_insert('plain_keys', r) FROM samples ORDER BY k) AS queued;
SELECT deferred_flush();
SET athena_deferred.enabled = off;
SELECT count(*) FROM (SELECT deferred_insert('plain_keys_ref', r) FROM samples ORDER BY k) AS applied;
RESET athena_deferred.enabled;
SELECT tab, via_copy, count(*) FROM path_log GROUP BY tab, via_copy;
SELECT plain_keys::text AS only_in_copy FROM plain_keys
EXCEPT SELECT plain_keys_ref::text FROM plain_keys_ref;
SELECT plain_keys_ref::text AS only_in_statements FROM plain_keys_ref
EXCEPT SELECT plain_keys::text FROM plain_keys;
SELECT * FROM plain_keys ORDER BY id;

-- Where batches end: at another set of columns, another table, another
-- role, an entry of several parts (applied alone, a statement per part).
-- The statement triggers fire once per batch, in order.  (The COPY feed
-- finds where a batch ends as it goes.)
CREATE TABLE ends_a (n serial, id int, v int);
CREATE TABLE ends_b (id int);
GRANT INSERT ON ends_a TO athena_copier;
GRANT USAGE ON SEQUENCE ends_a_n_seq TO athena_copier;
CREATE TRIGGER ends_a_path AFTER INSERT ON ends_a FOR EACH STATEMENT EXECUTE FUNCTION log_path();
CREATE TRIGGER ends_b_path AFTER INSERT ON ends_b FOR EACH STATEMENT EXECUTE FUNCTION log_path();
TRUNCATE path_log;
SELECT count(*) FROM (
    SELECT deferred_insert('ends_a', jsonb_build_object('id', g, 'v', g)) FROM generate_series(1, 3) AS g
    UNION ALL SELECT deferred_insert('ends_a', jsonb_build_object('id', g)) FROM generate_series(4, 5) AS g
    UNION ALL SELECT deferred_insert('ends_b', jsonb_build_object('id', g)) FROM generate_series(6, 7) AS g
    UNION ALL SELECT deferred_insert('ends_a', jsonb_build_object('id', g, 'v', g)) FROM generate_series(8, 10) AS g
    UNION ALL SELECT deferred_insert('ends_a', '[{"id": 11, "v": 11}, {"id": 12}]')
    UNION ALL SELECT deferred_insert('ends_a', jsonb_build_object('id', g, 'v', g)) FROM generate_series(13, 14) AS g) AS queued;
SET ROLE athena_copier;
SELECT count(*) FROM (SELECT deferred_insert('ends_a', jsonb_build_object('id', g, 'v', g)) FROM generate_series(15, 16) AS g) AS queued;
RESET ROLE;
SELECT count(*) FROM (SELECT deferred_insert('ends_a', jsonb_build_object('id', g, 'v', g)) FROM generate_series(17, 19) AS g) AS queued;
SELECT deferred_flush();
SELECT n, id, v FROM ends_a ORDER BY n;
SELECT * FROM ends_b ORDER BY id;
SELECT tab, who FROM path_log ORDER BY n;

-- A column whose name holds quotes, as the keys of the next entry would
-- read if they were lined up against the name without its escapes: the
-- entries have different columns and are batched apart.
CREATE TABLE lookalike (a int, b int, "a"": 1, ""b" int);
SELECT count(*) FROM (
    SELECT deferred_insert('lookalike', '{"a\": 1, \"b": 5}')
    UNION ALL SELECT deferred_insert('lookalike', '{"a": 1, "b": 2}')) AS queued;
SELECT deferred_flush();
SELECT * FROM lookalike ORDER BY 3 NULLS LAST;

DROP TABLE typed, typed_ref, samples, quoted, arrays, arrays_ref, owned, colpriv, hidden.t, guarded,
    ident, ruled, rule_log, dom_default, big, plain_keys, plain_keys_ref, ends_a, ends_b, path_log,
    lookalike;
DROP SCHEMA hidden;
DROP FUNCTION log_path(), stamp_who();
DROP TYPE mood, pair;
DROP DOMAIN posint, jdoc, jtext, required_int;
DROP ROLE athena_copier;
