-- deferred_insert: one row or an array of rows, acknowledged at once with an
-- increasing id, applied by the worker; absent keys take their defaults and
-- an explicit JSON null stores NULL.
CREATE TABLE items (
    id    int PRIMARY KEY,
    name  text,
    qty   int DEFAULT 7,
    added_by text DEFAULT current_user
);

-- ids are positive and increase in call order
SELECT deferred_insert('items', '{"id": 1, "name": "apple"}') AS first \gset
SELECT deferred_insert('items', '{"id": 2, "name": null, "qty": 3}') AS second \gset
SELECT :first > 0 AS positive, :second > :first AS increasing;

-- nothing is applied before the worker flushes
SELECT count(*) FROM items;
SELECT pending FROM deferred_stats();

-- deferred_flush() returns how many entries were applied
SELECT deferred_flush();
SELECT * FROM items ORDER BY id;
SELECT pending FROM deferred_stats();

-- an array of rows is one entry; rows may name different columns
SELECT deferred_insert('items', '[{"id": 3, "name": "pear"},
                                  {"id": 4, "name": "plum", "qty": 1},
                                  {"id": 5, "name": "fig", "qty": 2},
                                  {"id": 6}]') > :second AS one_entry;
SELECT deferred_flush();
SELECT * FROM items WHERE id >= 3 ORDER BY id;

-- an entry is applied together: one bad row keeps its whole entry out
SELECT deferred_insert('items', '[{"id": 7}, {"id": 1}]') AS bad_entry \gset
SELECT deferred_insert('items', '{"id": 8}') > :bad_entry AS later;
SELECT deferred_flush();
SELECT id FROM items WHERE id >= 7 ORDER BY id;
SELECT id = :bad_entry AS dead_lettered, op, payload, attempts
FROM deferred_dead_letters;
