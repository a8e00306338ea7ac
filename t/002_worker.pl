# The launcher and the workers: the launcher runs from server start, a
# worker runs in a database while it has entries (visible in
# pg_stat_activity), flushes on its timer and when batch_max_size entries
# are pending, reloads settings on SIGHUP, is started again when it dies
# without losing or repeating entries, and exits when its database is idle.
# athena_deferred.database, when set, restricts queuing to one database.
# Without shared_preload_libraries the extension refuses to install and
# says what to do.
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
		q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'athena_deferred launcher' AND datname IS NULL}),
	'the launcher shows in pg_stat_activity, connected to no database');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'athena_deferred'}),
	'0', 'no worker while nothing is queued');

# the timer flushes without anyone asking
$node->safe_psql('postgres', q{SELECT deferred_insert('t', '{"id": 1}')});
ok($node->poll_query_until('postgres', 'SELECT count(*) = 1 FROM t'), 'timer flush applied the entry');
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'athena_deferred'}),
	'the worker exits once its database is idle');
$node->safe_psql('postgres', q{SELECT deferred_insert('t', '{"id": 2}')});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'athena_deferred' AND datname = 'postgres'}),
	'a new entry starts a worker in its database');
ok($node->poll_query_until('postgres', 'SELECT count(*) = 2 FROM t'), 'which applies it');

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

# a terminated worker is started again and applies what was pending, once
$node->safe_psql('postgres', q{SELECT deferred_insert('t', '{"id": 20}')});
$node->poll_query_until('postgres', q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'athena_deferred'})
  or die 'no worker';
my $pid = $node->safe_psql('postgres', q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'athena_deferred'});
$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
ok($node->poll_query_until('postgres',
		qq{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'athena_deferred' AND pid <> $pid}),
	'worker restarted after being terminated');
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is($node->safe_psql('postgres', 'SELECT count(*) FROM t WHERE id = 20'), '1', 'pending entry applied by the new worker');
is($node->safe_psql('postgres', 'SELECT count(*) FROM deferred_dead_letters'), '0',
	'not applied twice (a second insert would have been dead-lettered)');
is($node->safe_psql('postgres', 'SELECT applied FROM deferred_stats()'), '8', 'stats count each entry once');

# every database works, with its own worker
$node->safe_psql('postgres', 'CREATE DATABASE elsewhere');
$node->safe_psql('elsewhere', q{CREATE EXTENSION athena_deferred; CREATE TABLE t (id int)});
$node->safe_psql('elsewhere', q{SELECT deferred_insert('t', '{"id": 1}')});
$node->safe_psql('elsewhere', 'SELECT deferred_flush()');
is($node->safe_psql('elsewhere', 'SELECT count(*) FROM t'), '1', 'another database: applied there');

# athena_deferred.database restricts queuing to one database
$node->append_conf('postgresql.conf', q{athena_deferred.database = 'postgres'});
$node->restart;
my ($ret, $stdout, $stderr) = $node->psql('elsewhere', q{SELECT deferred_insert('t', '{"id": 2}')});
isnt($ret, 0, 'with athena_deferred.database set, queuing elsewhere fails');
like($stderr, qr/deferred mutations can only be queued in database "postgres"/, 'error names the allowed database');
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
