# A deadlock between the worker and a user's transaction: PostgreSQL's
# deadlock detector picks the worker's statement; the worker survives, the
# entry fails and is retried later, the entries and the user's transaction
# around it go through, and nothing is applied twice.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('deadlock');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.batch_window_ms = 200
athena_deferred.batch_max_size = 0
athena_deferred.lock_timeout_ms = 60000
deadlock_timeout = '1s'
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION athena_deferred;
CREATE TABLE d (id int PRIMARY KEY, v int);
INSERT INTO d VALUES (1, 0), (2, 0);
CREATE TABLE after_it (id int);
});

# the user holds row 2; one flush updates row 1, then waits for row 2
my $user = $node->background_psql('postgres', on_error_stop => 0);
$user->query_safe(q{SET deadlock_timeout = '60s'});    # the worker checks first
$user->query_safe('BEGIN');
$user->query_safe('UPDATE d SET v = 100 WHERE id = 2');
$node->safe_psql('postgres', q{
BEGIN;
SELECT deferred_update('d', '{"id": 1}', '{"v": 1}');
SELECT deferred_update('d', '{"id": 2}', '{"v": 2}');
SELECT deferred_insert('after_it', '{"id": 1}');
COMMIT;
});
$node->poll_query_until('postgres',
	q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'athena_deferred' AND wait_event_type = 'Lock'})
  or die 'the worker never waited for the user';

# now the user waits for row 1, held by the worker's flush: a cycle
$user->query_until(qr/waiting/, q{\echo waiting
UPDATE d SET v = 100 WHERE id = 1;
});
ok($node->wait_for_log(qr/WARNING:  athena_deferred: entry \d+ failed \(attempt 1 of 10\), will retry: deadlock detected/),
	'the deadlock detector cancelled the worker\'s statement; the entry will be retried');
$user->query_safe('COMMIT');
$user->quit;

$node->safe_psql('postgres', 'SELECT deferred_flush(30000)');
is($node->safe_psql('postgres', q{SELECT id || ':' || v FROM d ORDER BY id}), "1:100\n2:2",
	'the user\'s transaction committed after the flush; the retried entry applied after it');
is($node->safe_psql('postgres', 'SELECT count(*) FROM after_it'), '1', 'the entry behind the failed one was applied');
is($node->safe_psql('postgres', 'SELECT count(*) FROM deferred_dead_letters'), '0', 'nothing dead-lettered');
is($node->safe_psql('postgres', 'SELECT applied, failed_attempts FROM deferred_stats()'), '3|1',
	'three entries applied once each, after one failed attempt');
ok(!$node->log_contains(qr/background worker "athena_deferred.*(exited with exit code 1|terminated by signal)/),
	'the worker did not fail or crash');
$node->stop;
done_testing();
