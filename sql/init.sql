-- Runs first: installs the extension into the test database, and shows what
-- it installs.
CREATE EXTENSION athena_deferred;
SELECT extversion FROM pg_extension WHERE extname = 'athena_deferred';
\x on
SELECT p.proname, pg_get_function_arguments(p.oid) AS arguments, pg_get_function_result(p.oid) AS result
FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid
WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'athena_deferred')
ORDER BY p.proname;
\x off
