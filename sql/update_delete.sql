-- deferred_update and deferred_delete: match is an object of column/value
-- pairs, ANDed; a JSON null in match means IS NULL.
CREATE TABLE stock (
    sku   text,
    shelf int,
    qty   int,
    note  text
);
INSERT INTO stock VALUES
    ('a', 1, 10, NULL), ('a', 2, 20, NULL), ('b', 1, 30, 'x'), ('c', NULL, 40, NULL);

-- several columns in match are ANDed
SELECT deferred_update('stock', '{"sku": "a", "shelf": 2}', '{"qty": 21, "note": "moved"}') > 0;
-- a null in match is IS NULL, not = NULL
SELECT deferred_update('stock', '{"shelf": null}', '{"shelf": 9}') > 0;
-- a null in changes stores NULL
SELECT deferred_update('stock', '{"sku": "b"}', '{"note": null}') > 0;
SELECT deferred_flush();
SELECT * FROM stock ORDER BY sku, shelf;

SELECT deferred_delete('stock', '{"sku": "a", "shelf": 1}') > 0;
SELECT deferred_delete('stock', '{"note": null, "sku": "b"}') > 0;
-- matching nothing is not an error
SELECT deferred_delete('stock', '{"sku": "zzz"}') > 0;
SELECT deferred_flush();
SELECT * FROM stock ORDER BY sku, shelf;
SELECT count(*) AS dead_letters FROM deferred_dead_letters WHERE target = 'public.stock';

-- entries apply in call order within a transaction and commit order across
BEGIN;
SELECT deferred_insert('stock', '{"sku": "d", "qty": 1}') > 0;
SELECT deferred_update('stock', '{"sku": "d"}', '{"qty": 2}') > 0;
SELECT deferred_delete('stock', '{"sku": "c"}') > 0;
COMMIT;
SELECT deferred_flush();
SELECT * FROM stock ORDER BY sku, shelf;
