# A full queue makes the call wait up to enqueue_timeout_ms for room, then
# fail with SQLSTATE 53000 and a hint naming queue_size; nothing acknowledged
# is dropped, and a call that waited succeeds once the worker makes room.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('full');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.queue_size = '64kB'
athena_deferred.batch_window_ms = 0
athena_deferred.batch_max_size = 0
athena_deferred.enqueue_timeout_ms = 500
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION athena_deferred;
CREATE TABLE t (id int PRIMARY KEY, pad text);
});

# a session holding a SHARE lock keeps the worker from inserting (but not
# callers from queuing), so the queue fills up: each entry carries about 1 kB
my $locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN');
$locker->query_safe('LOCK TABLE t IN SHARE MODE');
$node->safe_psql('postgres', q{SELECT deferred_insert('t', '{"id": -1}')});
# wake the worker (this flush times out: the worker is stuck on the lock)
$node->psql('postgres', 'SELECT deferred_flush(100)');
$node->poll_query_until('postgres',
	q{SELECT count(*) > 0 FROM pg_stat_activity WHERE backend_type = 'athena_deferred' AND wait_event_type = 'Lock'})
  or die 'worker never blocked';
my $acked = 1;
for my $i (1 .. 200)
{
	my ($ret, $out, $err) = $node->psql('postgres',
		qq{SELECT deferred_insert('t', jsonb_build_object('id', $i, 'pad', repeat('x', 1000)))});
	if ($ret != 0)
	{
		like($err, qr/deferred queue is full/, 'full queue: clear error');
		like($err, qr/HINT:  Increase athena_deferred.queue_size/, 'hint names queue_size');
		last;
	}
	$acked++;
}
cmp_ok($acked, '>', 10, "some entries fit ($acked)");
cmp_ok($acked, '<', 200, 'the queue filled up');

my ($ret, $out, $err) = $node->psql('postgres',
	q{SELECT deferred_insert('t', jsonb_build_object('id', 0, 'pad', repeat('x', 1000)))},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/ERROR:  53000/, 'SQLSTATE 53000 (insufficient_resources)');

# an entry larger than the whole queue fails at once, with its own error
($ret, $out, $err) = $node->psql('postgres',
	q{SELECT deferred_insert('t', jsonb_build_object('id', 0, 'pad', repeat('x', 100000)))},
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/ERROR:  54000: deferred entry of \d+ bytes does not fit in the queue/, 'oversized entry: 54000');

# a caller waiting for room gets it as soon as the worker can flush again
my $waiter = $node->background_psql('postgres');
$waiter->query_safe('SET athena_deferred.enqueue_timeout_ms = 60000');
$waiter->query_until(qr/waiting/, q{\echo waiting
SELECT deferred_insert('t', jsonb_build_object('id', 1000, 'pad', 'late' || repeat('x', 1000))) > 0 AS queued;
});
$node->poll_query_until('postgres',
	q{SELECT count(*) > 0 FROM pg_stat_activity WHERE wait_event = 'Extension' AND query LIKE '%late%'})
  or die 'caller never waited';
$locker->query_safe('COMMIT');
$locker->quit;
$node->poll_query_until('postgres', 'SELECT count(*) > 0 FROM t WHERE id = 1000 OR (SELECT pending FROM deferred_stats()) > 0')
  or die 'waiting call never queued';
$waiter->quit;		# returns once the waiting call has committed
$node->safe_psql('postgres', 'SELECT deferred_flush()');

is($node->safe_psql('postgres', 'SELECT count(*) FROM t'), $acked + 1,
	'every acknowledged entry applied, including the one that waited');
is($node->safe_psql('postgres', 'SELECT count(*) FROM t WHERE id = 1000'), '1', 'the waiting entry applied once');
$node->stop;
done_testing();
