-- The worker applies each entry as the role that queued it: defaults such
-- as current_user, column privileges and row-level security behave as if
-- that role had run the statement.
CREATE ROLE athena_writer;
CREATE TABLE notes (
    id     int PRIMARY KEY,
    owner  text NOT NULL DEFAULT current_user,
    body   text
);
GRANT SELECT, INSERT, DELETE ON notes TO athena_writer;
GRANT UPDATE (body) ON notes TO athena_writer;

SET ROLE athena_writer;
SELECT deferred_insert('notes', '{"id": 1, "body": "mine"}') > 0;
-- column privilege: body may be updated, owner may not
SELECT deferred_update('notes', '{"id": 1}', '{"body": "edited"}') > 0;
SELECT deferred_update('notes', '{"id": 1}', '{"owner": "someone else"}');
RESET ROLE;
SELECT deferred_flush();
SELECT * FROM notes;

-- row-level security is enforced at flush time for the queuing role
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON notes USING (owner = current_user) WITH CHECK (owner = current_user);
SET ROLE athena_writer;
SELECT deferred_insert('notes', '{"id": 2, "body": "allowed"}') > 0;
SELECT deferred_insert('notes', '{"id": 3, "owner": "postgres", "body": "forged"}') > 0;
-- the policy hides row 10 from athena_writer: its delete matches nothing
RESET ROLE;
INSERT INTO notes VALUES (10, 'postgres', 'not yours');
SET ROLE athena_writer;
SELECT deferred_delete('notes', '{"id": 10}') > 0;
RESET ROLE;
SELECT deferred_flush();
SELECT * FROM notes ORDER BY id;
SELECT op, payload, role, attempts, sqlstate, last_error
FROM deferred_dead_letters WHERE target = 'public.notes';

-- a privilege revoked between the call and the flush fails the entry
SET ROLE athena_writer;
SELECT deferred_insert('notes', '{"id": 4, "body": "too late"}') > 0;
RESET ROLE;
REVOKE INSERT ON notes FROM athena_writer;
SELECT deferred_flush();
SELECT count(*) FROM notes WHERE id = 4;
SELECT op, role, sqlstate, last_error
FROM deferred_dead_letters WHERE target = 'public.notes' AND payload @> '{"rows": [{"id": 4}]}';

-- the dead-letter table is not readable by ordinary roles
SET ROLE athena_writer;
SELECT count(*) FROM deferred_dead_letters;
RESET ROLE;

DROP TABLE notes;
DROP ROLE athena_writer;
