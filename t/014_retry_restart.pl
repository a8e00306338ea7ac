# A failing entry keeps its attempt count across a crash: after the restart
# its next attempt is the second, and it is dead-lettered after
# max_flush_attempts in all.  Dead letters survive the restart.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('retry');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.batch_window_ms = 0
athena_deferred.batch_max_size = 1
athena_deferred.max_flush_attempts = 3
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION athena_deferred;
CREATE TABLE t (id int PRIMARY KEY);
INSERT INTO t VALUES (1);
});

# an older dead letter, to see that dead letters survive
$node->safe_psql('postgres', q{SELECT deferred_insert('t', '{"id": 1}')});
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is($node->safe_psql('postgres', 'SELECT count(*) FROM deferred_dead_letters'), '1', 'first entry dead-lettered');

# reaching batch_max_size wakes the worker once: one failed attempt
my $id = $node->safe_psql('postgres', q{SELECT deferred_insert('t', '{"id": 1}')});
ok($node->wait_for_log(qr/entry $id failed \(attempt 1 of 3\)/), 'first attempt failed');
is($node->safe_psql('postgres', 'SELECT array_length(retry, 1), retry_attempts FROM deferred_progress'),
	'1|{1}', 'the retry and its attempt count are recorded');

$node->stop('immediate');
my $log_offset = -s $node->logfile;
$node->start;
$node->safe_psql('postgres', 'SELECT deferred_flush()');
ok($node->log_contains(qr/entry $id failed \(attempt 2 of 3\)/, $log_offset),
	'after the restart the next attempt is the second');
ok(!$node->log_contains(qr/entry $id failed \(attempt 1 of 3\)/, $log_offset), 'not the first again');
is($node->safe_psql('postgres', "SELECT attempts FROM deferred_dead_letters WHERE id = $id"), '3',
	'dead-lettered after three attempts in all');
is($node->safe_psql('postgres', 'SELECT count(*) FROM deferred_dead_letters'), '2', 'earlier dead letter still there');
$node->stop;
done_testing();
