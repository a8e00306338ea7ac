# Eight clients queue as fast as they can while the worker flushes; the
# postmaster is killed with SIGKILL, and in a second round one backend is.
# Every acknowledged entry (counted by the client, pgbench) is applied, none
# twice, and at most one unacknowledged entry per client (its commit was in
# flight) is applied.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use FindBin;
use lib $FindBin::Bin;
use AthenaDeferredTest;

my $node = PostgreSQL::Test::Cluster->new('load');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.batch_window_ms = 20
athena_deferred.batch_max_size = 200
athena_deferred.wal_segment_size = '1MB'
restart_after_crash = on
max_connections = 30
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION athena_deferred;
CREATE TABLE t (id bigint, round int, client int);
CREATE SEQUENCE ids;
});

my $script = $node->basedir . '/queue.sql';
open(my $fh, '>', $script) or die;
print $fh q{SELECT deferred_insert('t', jsonb_build_object('id', nextval('ids'), 'round', :round, 'client', :client_id));
};
close $fh;

# run pgbench in the background; returns the harness and its output
sub start_load
{
	my ($round) = @_;
	my ($out, $err) = ('', '');
	my $h = IPC::Run::start(
		[
			'pgbench', '-n', '-c', '8', '-j', '2', '-T', '60', '-D', "round=$round",
			'-f', $script, '-h', $node->host, '-p', $node->port, 'postgres'
		],
		'>', \$out, '2>', \$err);
	return ($h, \$out, \$err);
}

# transactions pgbench saw acknowledged
sub acked
{
	my ($out) = @_;
	$$out =~ /number of transactions actually processed: (\d+)/
	  or die "no pgbench summary in: $$out";
	return $1;
}

sub wait_until_applied
{
	my ($round, $min) = @_;
	$node->poll_query_until('postgres', "SELECT count(*) >= $min FROM t WHERE round = $round")
	  or die "round $round never got going";
}

sub check_round
{
	my ($round, $acked, $what) = @_;
	$node->safe_psql('postgres', 'SELECT deferred_flush()');
	my ($rows, $distinct) = split /\|/,
	  $node->safe_psql('postgres', "SELECT count(*), count(DISTINCT id) FROM t WHERE round = $round");
	cmp_ok($acked, '>', 100, "$what: clients were acknowledged ($acked)");
	is($distinct, $rows, "$what: no entry applied twice");
	cmp_ok($rows, '>=', $acked, "$what: every acknowledged entry applied ($rows rows)");
	cmp_ok($rows, '<=', $acked + 8, "$what: at most one in-flight commit per client besides");
}

# round 1: SIGKILL the postmaster while the worker flushes
my ($h, $out, $err) = start_load(1);
wait_until_applied(1, 500);
$node->kill9;
$h->finish;
ok(start_after_kill9($node), 'server restarted after kill -9');
check_round(1, acked($out), 'postmaster killed');

# round 2: SIGKILL one client backend; the postmaster resets everything
($h, $out, $err) = start_load(2);
wait_until_applied(2, 500);
my $victim = $node->safe_psql('postgres',
	q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' AND query LIKE '%deferred_insert%' LIMIT 1});
kill 'KILL', $victim;
$h->finish;
$node->poll_query_until('postgres', q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'athena_deferred launcher'})
  or die 'server did not come back';
check_round(2, acked($out), 'backend killed');

is($node->safe_psql('postgres', 'SELECT count(*) FROM deferred_dead_letters'), '0', 'nothing dead-lettered');
$node->stop;
done_testing();
