# Hot standby: the calls fail with a clear read-only error; after promotion
# the worker replays the extension's WAL found in the data directory (here,
# copied by the base backup) and applies it.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $primary = PostgreSQL::Test::Cluster->new('primary');
$primary->init(allows_streaming => 1);
$primary->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.batch_window_ms = 0
athena_deferred.batch_max_size = 0
});
$primary->start;
$primary->safe_psql('postgres', q{
CREATE EXTENSION athena_deferred;
CREATE TABLE t (id int);
SELECT deferred_flush();
SELECT count(deferred_insert('t', jsonb_build_object('id', g))) FROM generate_series(1, 50) g;
});

$primary->backup('b1');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'b1', has_streaming => 1);
$standby->start;
$primary->wait_for_catchup($standby);

my ($ret, $out, $err) = $standby->psql('postgres', q{SELECT deferred_insert('t', '{"id": 100}')},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
isnt($ret, 0, 'queuing on a standby fails');
like($err, qr/ERROR:  25006: cannot execute deferred_insert\(\) in a read-only transaction/,
	'with a read-only error (25006)');
is($standby->safe_psql('postgres', q{SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'athena_deferred%'}),
	'0', 'neither launcher nor worker runs on the standby');

$primary->stop('immediate');
$standby->promote;
$standby->safe_psql('postgres', 'SELECT deferred_flush()');
is($standby->safe_psql('postgres', 'SELECT count(*), count(DISTINCT id) FROM t'), '50|50',
	'after promotion the entries found in the data directory are applied once');
$standby->safe_psql('postgres', q{SELECT deferred_insert('t', '{"id": 100}')});
$standby->safe_psql('postgres', 'SELECT deferred_flush()');
is($standby->safe_psql('postgres', 'SELECT count(*) FROM t'), '51', 'and new entries are accepted');
$standby->stop;
done_testing();
