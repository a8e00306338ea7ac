# Extension versioning: 0.1.0 installs and works with the current library,
# ALTER EXTENSION ... UPDATE brings it to the default version, and the result
# has exactly the objects of a fresh install.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('upgrade');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.batch_window_ms = 0
athena_deferred.batch_max_size = 0
});
$node->start;

# the objects of the extension, with their signatures
my $objects = q{
SELECT string_agg(pg_describe_object(classid, objid, 0) || ' ' ||
                  coalesce(pg_get_function_identity_arguments(p.oid) || ' -> ' || pg_get_function_result(p.oid), ''),
                  E'\n' ORDER BY 1)
FROM pg_depend d LEFT JOIN pg_proc p ON d.classid = 'pg_proc'::regclass AND p.oid = d.objid
WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'athena_deferred') AND d.deptype = 'e'};

$node->safe_psql('postgres', q{
CREATE EXTENSION athena_deferred VERSION '0.1.0';
CREATE TABLE t (id int);
});
is($node->safe_psql('postgres', q{SELECT extversion FROM pg_extension WHERE extname = 'athena_deferred'}),
	'0.1.0', 'version 0.1.0 installed');

# 0.1.0 works with the current library, its 14-column deferred_stats() too
$node->safe_psql('postgres', q{SELECT deferred_insert('t', '{"id": 1}')});
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is($node->safe_psql('postgres', 'SELECT count(*) FROM t'), '1', '0.1.0: queue and flush');
is($node->safe_psql('postgres', 'SELECT applied, wal_segments >= 0 FROM deferred_stats()'), '1|t',
	'0.1.0: deferred_stats() with its own columns');

$node->safe_psql('postgres', 'ALTER EXTENSION athena_deferred UPDATE');
is($node->safe_psql('postgres', q{SELECT extversion FROM pg_extension WHERE extname = 'athena_deferred'}),
	'0.3.0', 'updated to 0.3.0 (through 0.2.0)');
$node->safe_psql('postgres', q{SELECT deferred_insert('t', '{"id": 2}')});
is($node->safe_psql('postgres', 'SELECT deferred_flush()'), '1', 'queue and flush after the update');
is($node->safe_psql('postgres', 'SELECT applied, discarded FROM deferred_stats'), '2|0',
	'the new stats view counts across the update, with the 0.3.0 column');
is($node->safe_psql('postgres', 'SELECT count(*) FROM t'), '2', 'rows from before and after the update');

$node->safe_psql('postgres', 'CREATE DATABASE fresh');
$node->safe_psql('fresh', 'CREATE EXTENSION athena_deferred');
my $updated = $node->safe_psql('postgres', $objects);
is($node->safe_psql('fresh', $objects), $updated, 'an updated install has the objects of a fresh one');
like($updated, qr/function deferred_wait\(bigint,integer\) id bigint, timeout_ms integer -> text/,
	'including the 0.2.0 functions');
$node->stop;
done_testing();
