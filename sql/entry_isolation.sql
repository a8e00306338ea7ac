-- Settings that one entry's triggers change (search_path, TimeZone, ...)
-- do not outlive that entry: they cannot reach the entries of other roles
-- or the worker's own statements.
CREATE ROLE athena_mischief;
CREATE ROLE athena_victim;
CREATE TABLE mischief (id int);
CREATE TABLE victim (id int);
CREATE TABLE audit (who text, what int);
GRANT INSERT ON mischief TO athena_mischief;
GRANT INSERT ON victim TO athena_victim;
GRANT INSERT ON audit TO athena_victim;

-- the first entry's trigger points search_path and TimeZone elsewhere
CREATE FUNCTION meddle() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('search_path', 'nowhere', false);
    PERFORM set_config('TimeZone', 'Pacific/Kiritimati', false);
    RETURN NEW;
END $$;
CREATE TRIGGER meddle BEFORE INSERT ON mischief FOR EACH ROW EXECUTE FUNCTION meddle();

-- the next entry's trigger names a table without its schema
CREATE FUNCTION record_it() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit VALUES (current_user, NEW.id);
    RETURN NEW;
END $$;
CREATE TRIGGER record_it AFTER INSERT ON victim FOR EACH ROW EXECUTE FUNCTION record_it();

SET ROLE athena_mischief;
SELECT deferred_insert('mischief', '{"id": 1}') > 0;
RESET ROLE;
SET ROLE athena_victim;
SELECT deferred_insert('victim', '{"id": 2}') > 0;
RESET ROLE;
SELECT deferred_flush();

SELECT * FROM mischief;
SELECT * FROM victim;
SELECT * FROM audit;
SELECT count(*) AS dead_letters FROM deferred_dead_letters WHERE target IN ('public.mischief', 'public.victim');

DROP TABLE mischief, victim, audit;
DROP FUNCTION meddle(), record_it();
DROP ROLE athena_mischief;
DROP ROLE athena_victim;
