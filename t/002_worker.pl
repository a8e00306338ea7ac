# The background worker: visible in pg_stat_activity, flushes on its timer
# and when batch_max_size entries are pending, reloads settings on SIGHUP,
# is restarted when it dies without losing or repeating entries, and serves
# only athena_deferred.database.  Without shared_preload_libraries the
# extension refuses to install and says what to do.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('worker');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.batch_window_ms = 200
athena_deferred.batch_max_size = 0
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION athena_deferred;
CREATE TABLE t (id int PRIMARY KEY);
});

ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'athena_deferred' AND datname = 'postgres'}),
	'worker shows in pg_stat_activity with backend_type athena_deferred');

# the timer flushes without anyone asking
$node->safe_psql('postgres', q{SELECT deferred_insert('t', '{"id": 1}')});
ok($node->poll_query_until('postgres', 'SELECT count(*) = 1 FROM t'), 'timer flush applied the entry');

# with the timer off, batch_max_size pending entries wake the worker
$node->append_conf('postgresql.conf', q{
athena_deferred.batch_window_ms = 0
athena_deferred.batch_max_size = 5
});
$node->reload;
$node->poll_query_until('postgres', q{SELECT current_setting('athena_deferred.batch_max_size') = '5'})
  or die 'reload not seen';
# make sure the worker has processed the reload before relying on it
$node->safe_psql('postgres', 'SELECT deferred_flush()');
$node->safe_psql('postgres', q{SELECT deferred_insert('t', jsonb_build_object('id', g)) FROM generate_series(10, 13) g});
sleep(1);
is($node->safe_psql('postgres', 'SELECT count(*) FROM t WHERE id >= 10'), '0',
	'below batch_max_size and no timer: nothing flushed');
$node->safe_psql('postgres', q{SELECT deferred_insert('t', '{"id": 14}')});
ok($node->poll_query_until('postgres', 'SELECT count(*) = 5 FROM t WHERE id >= 10'),
	'reaching batch_max_size woke the worker');

# a terminated worker is restarted and applies what was pending, once
$node->safe_psql('postgres', q{SELECT deferred_insert('t', '{"id": 20}')});
my $pid = $node->safe_psql('postgres', q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'athena_deferred'});
$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
ok($node->poll_query_until('postgres',
		qq{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'athena_deferred' AND pid <> $pid}),
	'worker restarted after being terminated');
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is($node->safe_psql('postgres', 'SELECT count(*) FROM t WHERE id = 20'), '1', 'pending entry applied by the new worker');
is($node->safe_psql('postgres', 'SELECT count(*) FROM deferred_dead_letters'), '0',
	'not applied twice (a second insert would have been dead-lettered)');
is($node->safe_psql('postgres', 'SELECT applied FROM deferred_stats()'), '7', 'stats count each entry once');

# other databases are refused with a clear error
$node->safe_psql('postgres', 'CREATE DATABASE elsewhere');
$node->safe_psql('elsewhere', q{CREATE EXTENSION athena_deferred; CREATE TABLE t (id int)});
my ($ret, $stdout, $stderr) = $node->psql('elsewhere', q{SELECT deferred_insert('t', '{"id": 1}')});
isnt($ret, 0, 'queuing in another database fails');
like($stderr, qr/deferred mutations can only be queued in database "postgres"/, 'error names the served database');
$node->stop;

# without shared_preload_libraries, CREATE EXTENSION fails with a hint
my $bare = PostgreSQL::Test::Cluster->new('bare');
$bare->init;
$bare->start;
($ret, $stdout, $stderr) = $bare->psql('postgres', 'CREATE EXTENSION athena_deferred');
isnt($ret, 0, 'CREATE EXTENSION without preloading fails');
like($stderr, qr/must be loaded via shared_preload_libraries/, 'error says why');
like($stderr, qr/HINT:  Add athena_deferred to shared_preload_libraries in postgresql.conf/, 'hint says what to add');
$bare->stop;

done_testing();
