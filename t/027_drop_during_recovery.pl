# DROP EXTENSION while the launcher is still recovering the queue: until
# the WAL is replayed, the queue does not show what the database has
# pending, so the drop is refused rather than logging the database's
# entries as settled (which would lose the acknowledged ones).  Recovery is
# held up here from another database: it waits for every database found in
# the WAL to report its progress, and a prepared transaction there keeps
# that database's worker from reading its progress table.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('drop_recovery');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.batch_window_ms = 0
athena_deferred.batch_max_size = 0
max_prepared_transactions = 2
});
$node->start;
for my $db ('postgres', 'held')
{
	$node->safe_psql('postgres', "CREATE DATABASE $db") if $db ne 'postgres';
	$node->safe_psql($db, q{
CREATE EXTENSION athena_deferred;
CREATE TABLE t (id int);
});
}

# entries pending in both databases, then a crash, with the progress table
# of 'held' locked by a prepared transaction, which outlives the crash
$node->safe_psql('postgres', q{SELECT deferred_insert('t', '{"id": 1}')});
$node->safe_psql('held', q{SELECT deferred_insert('t', '{"id": 2}')});
$node->safe_psql('held', q{BEGIN; LOCK TABLE deferred_progress; PREPARE TRANSACTION 'hold_progress'});
$node->stop('immediate');
$node->start;

my ($ret, $out, $err) = $node->psql('postgres', 'DROP EXTENSION athena_deferred CASCADE');
isnt($ret, 0, 'DROP EXTENSION during recovery: refused');
like($err, qr/athena_deferred has not finished recovering its queue/, 'DROP EXTENSION during recovery: says why');

# once recovery can finish, the entries are applied, and the drop works
$node->safe_psql('held', q{ROLLBACK PREPARED 'hold_progress'});
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is($node->safe_psql('postgres', 'SELECT count(*) FROM t'), '1', 'the entry of postgres applied');
$node->safe_psql('held', 'SELECT deferred_flush()');
is($node->safe_psql('held', 'SELECT count(*) FROM t'), '1', 'the entry of held applied');
$node->safe_psql('postgres', 'DROP EXTENSION athena_deferred CASCADE');
is($node->safe_psql('postgres', q{SELECT count(*) FROM pg_extension WHERE extname = 'athena_deferred'}),
	'0', 'DROP EXTENSION after recovery, with nothing queued: done');

done_testing();
