# Entries acknowledged and not yet flushed survive an immediate shutdown, a
# postmaster SIGKILL and a backend crash, and are applied exactly once:
# whatever the wal_sync mode, since each writes before the commit returns.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib $FindBin::Bin;
use AthenaDeferredTest;

my $node = PostgreSQL::Test::Cluster->new('crash');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.batch_window_ms = 0
athena_deferred.batch_max_size = 0
athena_deferred.wal_sync = 'always'
restart_after_crash = on
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION athena_deferred;
CREATE TABLE t (id int, mode text);
});

# rows with this id, and ids applied more than once
sub rows_for
{
	my ($mode) = @_;
	return $node->safe_psql('postgres', "SELECT count(*), count(DISTINCT id) FROM t WHERE mode = '$mode'");
}

my $n = 200;
for my $mode ('always', 'batch', 'off')
{
	$node->adjust_conf('postgresql.conf', 'athena_deferred.wal_sync', "'$mode'");
	$node->reload;
	$node->poll_query_until('postgres', "SELECT current_setting('athena_deferred.wal_sync') = '$mode'")
	  or die 'reload not seen';
	# after a start, deferred_flush() returns once recovery and its flush are done
	$node->safe_psql('postgres', 'SELECT deferred_flush()');
	$node->safe_psql('postgres',
		"SELECT count(deferred_insert('t', jsonb_build_object('id', g, 'mode', '$mode'))) FROM generate_series(1, $n) g");
	# one more transaction with several calls, and one that rolled back
	$node->safe_psql('postgres', qq{
BEGIN;
SELECT deferred_insert('t', jsonb_build_object('id', $n + 1, 'mode', '$mode'));
SELECT deferred_insert('t', jsonb_build_object('id', $n + 2, 'mode', '$mode'));
COMMIT;
BEGIN;
SELECT deferred_insert('t', jsonb_build_object('id', -1, 'mode', '$mode'));
ROLLBACK;
});
	is($node->safe_psql('postgres', 'SELECT pending FROM deferred_stats()'), $n + 2, "$mode: entries pending");

	$node->stop('immediate');
	$node->start;
	is($node->safe_psql('postgres', 'SELECT deferred_flush() >= 0'), 't', "$mode: flushed after restart");
	is(rows_for($mode), ($n + 2) . '|' . ($n + 2), "$mode: every entry applied exactly once after stop -m immediate");
	is($node->safe_psql('postgres', "SELECT count(*) FROM t WHERE mode = '$mode' AND id = -1"), '0',
		"$mode: rolled-back entry not applied");
}
is($node->safe_psql('postgres', 'SELECT recovered_entries FROM deferred_stats()'), $n + 2,
	'recovery counted in deferred_stats()');

# SIGKILL of the postmaster
$node->safe_psql('postgres',
	"SELECT count(deferred_insert('t', jsonb_build_object('id', g, 'mode', 'kill9'))) FROM generate_series(1, $n) g");
$node->kill9;
ok(start_after_kill9($node), 'restarted after kill -9');
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is(rows_for('kill9'), "$n|$n", 'every entry applied exactly once after kill -9 of the postmaster');

# a backend crash makes the postmaster reinitialize shared memory
$node->safe_psql('postgres',
	"SELECT count(deferred_insert('t', jsonb_build_object('id', g, 'mode', 'segv'))) FROM generate_series(1, $n) g");
my $victim = $node->background_psql('postgres');
my $pid = $victim->query_safe('SELECT pg_backend_pid()');
kill 'KILL', $pid;
$victim->{run}->finish;
$node->poll_query_until('postgres', q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'athena_deferred launcher'})
  or die 'server did not come back';
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is(rows_for('segv'), "$n|$n", 'every entry applied exactly once after a backend was killed');
ok($node->log_contains('terminated by signal 9'), 'the backend crash reset the server');

# a clean restart keeps them too
$node->safe_psql('postgres',
	"SELECT count(deferred_insert('t', jsonb_build_object('id', g, 'mode', 'clean'))) FROM generate_series(1, $n) g");
$node->restart;
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is(rows_for('clean'), "$n|$n", 'every entry applied exactly once after a clean restart');
is($node->safe_psql('postgres', 'SELECT count(*) FROM deferred_dead_letters'), '0', 'nothing dead-lettered');

$node->stop;
done_testing();
