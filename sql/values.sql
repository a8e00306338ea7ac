-- Values travel as JSON parameters and identifiers are quoted: awkward
-- names and values arrive exactly as given.
CREATE SCHEMA "Odd Schema";
CREATE TABLE "Odd Schema"."Weird ""Table""; x" (
    "Id"          int PRIMARY KEY,
    "semi;colon"  text,
    "with space"  numeric,
    doc           jsonb,
    tags          text[],
    at            timestamptz,
    flag          boolean
);

SELECT deferred_insert('"Odd Schema"."Weird ""Table""; x"',
    '{"Id": 1, "semi;colon": "x''); DROP TABLE pg_class; --",
      "with space": 12345678901234567890.123456789012345678901234567890,
      "doc": {"nested": [1, 2, {"deep": true}]},
      "tags": ["a", "b"], "at": "2026-01-02T03:04:05Z", "flag": true}') > 0;
SELECT deferred_update('"Odd Schema"."Weird ""Table""; x"', '{"Id": 1}',
    '{"doc": {"replaced": null}, "flag": false}') > 0;
SELECT deferred_flush();
SELECT * FROM "Odd Schema"."Weird ""Table""; x";

-- a type error can only surface at flush time: it is dead-lettered
SELECT deferred_insert('"Odd Schema"."Weird ""Table""; x"', '{"Id": "not a number"}') > 0;
SELECT deferred_flush();
SELECT target, op, attempts, sqlstate, last_error FROM deferred_dead_letters
WHERE payload @> '{"rows": [{"Id": "not a number"}]}';

DROP SCHEMA "Odd Schema" CASCADE;
