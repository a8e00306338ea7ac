# The progress record never goes back: a flush that only retries an old
# failing entry must not mark as unapplied what earlier flushes applied, or
# the next restart would apply it again.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('progress');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.batch_window_ms = 0
athena_deferred.batch_max_size = 0
athena_deferred.max_flush_attempts = 1000
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION athena_deferred;
CREATE TABLE t (id int PRIMARY KEY);
INSERT INTO t VALUES (1);
CREATE TABLE c (x int);
});

# an entry that keeps failing, and two that are applied by later flushes
$node->safe_psql('postgres', q{SELECT deferred_insert('t', '{"id": 1}')});
$node->safe_psql('postgres', q{SELECT deferred_insert('c', '{"x": 1}')});
$node->psql('postgres', 'SELECT deferred_flush(300)');
$node->safe_psql('postgres', q{SELECT deferred_insert('c', '{"x": 2}')});
$node->psql('postgres', 'SELECT deferred_flush(300)');
is($node->safe_psql('postgres', 'SELECT count(*) FROM c'), '2', 'both applied');
my $upto = $node->safe_psql('postgres', 'SELECT applied_upto FROM deferred_progress');

# restarts: each time the first flush retries only the failing entry
for my $round (1 .. 2)
{
	$node->restart;
	$node->psql('postgres', 'SELECT deferred_flush(300)');
	cmp_ok($node->safe_psql('postgres', 'SELECT applied_upto FROM deferred_progress'), '>=', $upto,
		"restart $round: the progress record did not go back");
	is($node->safe_psql('postgres', 'SELECT count(*) FROM c'), '2', "restart $round: nothing applied twice");
}
is($node->safe_psql('postgres', 'SELECT pending FROM deferred_stats'), '1', 'the failing entry is still there');
$node->stop;
done_testing();
