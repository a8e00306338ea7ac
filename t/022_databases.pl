# Every database: the extension works in each database where it is
# installed, each with its own worker; after a crash each database's
# entries are applied exactly once; one database cannot take the whole
# queue from another, and a database whose worker is stuck does not hold up
# the others; DROP EXTENSION with queued entries is refused; a database
# dropped with queued entries has them discarded and reported; an idle
# worker does not keep DROP DATABASE from working.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use lib 't';
use AthenaDeferredTest;

my $node = PostgreSQL::Test::Cluster->new('dbs');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.batch_window_ms = 0
athena_deferred.batch_max_size = 0
athena_deferred.queue_size = '256kB'
athena_deferred.enqueue_timeout_ms = 300
athena_deferred.lock_timeout_ms = 200
athena_deferred.max_flush_attempts = 100
restart_after_crash = on
});
$node->start;

my @dbs = qw(alpha beta gamma delta);
my $log_offset;
$node->safe_psql('postgres', q{CREATE ROLE app LOGIN});
for my $db (@dbs)
{
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	$node->safe_psql($db, q{
CREATE EXTENSION athena_deferred;
CREATE TABLE t (id int PRIMARY KEY, who text DEFAULT current_user, pad text);
GRANT INSERT, SELECT ON t TO app;
});
}

sub app_psql
{
	my ($db, $sql) = @_;
	return $node->psql($db, "SET ROLE app; $sql");
}

sub queue_rows
{
	my ($db, $from, $to, $pad) = @_;
	$pad //= 0;
	my $acked = 0;
	for my $i ($from .. $to)
	{
		my ($ret) = app_psql($db,
			qq{SELECT deferred_insert('t', jsonb_build_object('id', $i, 'pad', repeat('x', $pad)))});
		last if $ret != 0;
		$acked++;
	}
	return $acked;
}

sub count_rows
{
	my ($db) = @_;
	return $node->safe_psql($db,
		q{SELECT count(*) || '|' || count(DISTINCT id) || '|' || coalesce(string_agg(DISTINCT who, ','), '') FROM t});
}

# --- two databases, each applied by its own worker, as the queuing role -----
queue_rows('alpha', 1, 20);
queue_rows('beta', 1, 10);
$node->safe_psql('alpha', 'SELECT deferred_flush()');
is(count_rows('alpha'), '20|20|app', 'alpha: applied as app');
is(count_rows('beta'), '0|0|', 'beta: not flushed by alpha\'s deferred_flush()');
ok($node->poll_query_until('postgres',
		q{SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_stat_activity WHERE backend_type = 'athena_deferred'},
		'alpha,beta'),
	'one worker in each database with entries');

# --- a crash with entries pending in both: each applied once after restart --
queue_rows('alpha', 21, 30);
$node->kill9;
ok(start_after_kill9($node), 'server restarted after kill -9');
$node->safe_psql('alpha', 'SELECT deferred_flush()');
$node->safe_psql('beta', 'SELECT deferred_flush()');
is(count_rows('alpha'), '30|30|app', 'alpha: the 20 applied before the crash not again, the 10 pending once');
is(count_rows('beta'), '10|10|app', 'beta: its 10 pending entries applied once');
for my $db (qw(alpha beta))
{
	is($node->safe_psql($db, 'SELECT count(*) FROM deferred_dead_letters'), '0', "$db: nothing dead-lettered");
}

# --- one database cannot take the whole queue, nor hold up another ---------
# alpha's worker is stuck on a lock, so alpha's entries stay queued; since
# an open transaction in gamma holds an entry, alpha may fill at most half
# of the 256kB queue
my $locker = $node->background_psql('alpha');
$locker->query_safe('BEGIN');
$locker->query_safe('LOCK TABLE t IN SHARE MODE');
my $gamma_open = $node->background_psql('gamma');
$gamma_open->query_safe(q{BEGIN; SET ROLE app; SELECT deferred_insert('t', '{"id": 1}')});
my $alpha_acked = queue_rows('alpha', 1001, 1400, 1000);
cmp_ok($alpha_acked, '>', 60, "alpha queued entries up to its share ($alpha_acked)");
cmp_ok($alpha_acked, '<', 125, 'but not beyond half of the queue');
my ($ret, $out, $err) = app_psql('alpha',
	q{SELECT deferred_insert('t', jsonb_build_object('id', 0, 'pad', repeat('x', 1000)))});
like($err, qr/deferred queue is full for this database/, 'alpha: a clear error at its share');
is(queue_rows('gamma', 2, 61, 1000), 60, 'gamma still finds room for 60 kB');
$gamma_open->query_safe('COMMIT');
$gamma_open->quit;
$node->safe_psql('gamma', 'SELECT deferred_flush(5000)');
is(count_rows('gamma'), '61|61|app', 'gamma applied while alpha\'s worker is stuck');
is($node->safe_psql('alpha', 'SELECT count(*) FROM t WHERE id > 1000'), '0', 'alpha\'s entries still pending');
$locker->query_safe('COMMIT');
$locker->quit;
$node->safe_psql('alpha', 'SELECT deferred_flush()');
is(count_rows('alpha'), (30 + $alpha_acked) . '|' . (30 + $alpha_acked) . '|app',
	'alpha: all acknowledged entries applied once the lock is gone');

# --- DROP EXTENSION with entries queued is refused --------------------------
queue_rows('delta', 1, 3);
($ret, $out, $err) = $node->psql('delta', 'DROP EXTENSION athena_deferred',
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/ERROR:  55006: cannot drop extension athena_deferred while entries of this database are queued/,
	'DROP EXTENSION refused while entries are queued (55006)');
like($err, qr/Pending entries: 3\./, 'the error says how many');
($ret, $out, $err) = $node->psql('delta', 'DROP SCHEMA public CASCADE');
like($err, qr/cannot drop extension athena_deferred/, 'and through DROP SCHEMA ... CASCADE');
$node->safe_psql('delta', 'SELECT deferred_flush()');
is(count_rows('delta'), '3|3|app', 'the entries were kept and apply');
$node->safe_psql('delta', 'DROP EXTENSION athena_deferred');
pass('DROP EXTENSION works once nothing is queued');

# the entries it applied are still in the WAL: after CREATE EXTENSION again
# (a fresh progress table) and a crash, they are not applied a second time
$node->safe_psql('delta', 'CREATE EXTENSION athena_deferred');
$node->kill9;
ok(start_after_kill9($node), 'server restarted after kill -9');
$node->safe_psql('delta', 'SELECT deferred_flush()');
is(count_rows('delta'), '3|3|app', 'entries applied before DROP EXTENSION are not applied again');
is($node->safe_psql('delta', 'SELECT count(*) FROM deferred_pending()') . '|'
	  . $node->safe_psql('delta', 'SELECT count(*) FROM deferred_dead_letters'), '0|0',
	'nor left pending or dead-lettered');

# --- a database dropped with entries queued --------------------------------
my $pending_before = $node->safe_psql('alpha', 'SELECT pending FROM deferred_stats()');
queue_rows('gamma', 3001, 3005);
$node->poll_query_until('postgres',
	q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'athena_deferred' AND datname = 'gamma'})
  or die 'no worker in gamma';
my $gamma_oid = $node->safe_psql('postgres', q{SELECT oid FROM pg_database WHERE datname = 'gamma'});
$node->safe_psql('postgres', 'DROP DATABASE gamma WITH (FORCE)');
ok($node->wait_for_log(qr/LOG:  athena_deferred: discarded 5 pending entries of database $gamma_oid, which was dropped/),
	'dropped database: its entries are discarded with a LOG line');
ok($node->poll_query_until('alpha', "SELECT pending = $pending_before AND discarded = 5 FROM deferred_stats()"),
	'no longer counted as pending, counted as discarded');
queue_rows('beta', 3001, 3001);
$node->safe_psql('beta', 'SELECT deferred_flush()');
is($node->safe_psql('beta', 'SELECT count(*) FROM t WHERE id = 3001'), '1', 'other databases carry on');

# --- a database dropped with entries queued, found in the WAL at restart ---
# the launcher crashes (fault point) before it can discard them at once
$node->safe_psql('postgres', 'CREATE DATABASE epsilon');
$node->safe_psql('epsilon', q{CREATE EXTENSION athena_deferred; CREATE TABLE t (id int PRIMARY KEY, who text DEFAULT current_user, pad text); GRANT INSERT ON t TO app});
queue_rows('epsilon', 1, 4);
my $epsilon_oid = $node->safe_psql('postgres', q{SELECT oid FROM pg_database WHERE datname = 'epsilon'});
$node->safe_psql('postgres', q{ALTER SYSTEM SET athena_deferred.fault_point = 'before_discard'; SELECT pg_reload_conf()});
sleep(1);    # let the launcher read the setting
$log_offset = -s $node->logfile;
# (the crash may cut the DROP's connection before it hears back: the
# launcher discards only once the drop has committed)
$node->psql('postgres', 'DROP DATABASE epsilon WITH (FORCE)');
ok($node->wait_for_log(qr/fault point "before_discard" reached/, $log_offset), 'the launcher crashed before discarding');
$node->poll_query_until('alpha', 'SELECT true FROM deferred_stats()') or die 'server did not come back';
ok($node->wait_for_log(qr/athena_deferred: entries of database $epsilon_oid in the WAL will be discarded/, $log_offset),
	'after the restart, the dropped database\'s entries are discarded with a LOG line');
# (gamma's entries, discarded before, are still in the WAL and counted again)
cmp_ok($node->safe_psql('alpha', 'SELECT discarded FROM deferred_stats()'), '>=', 4, 'and counted');
is($node->safe_psql('alpha', 'SELECT pending FROM deferred_stats()'), '0', 'not pending');
$node->safe_psql('postgres', q{ALTER SYSTEM RESET athena_deferred.fault_point; SELECT pg_reload_conf()});

# --- an idle worker does not keep DROP DATABASE from working ----------------
$node->safe_psql('beta', 'SELECT deferred_flush()');
($ret, $out, $err) = $node->psql('postgres', 'DROP DATABASE beta');
is($ret, 0, 'DROP DATABASE right after a flush works (the idle worker leaves)') or diag($err);

ok(!$node->log_contains(qr/background worker "athena_deferred.*terminated by signal (?!9:)|PANIC|TRAP/),
	'no launcher or worker crashed, but for the fault point');
$node->stop;
done_testing();
