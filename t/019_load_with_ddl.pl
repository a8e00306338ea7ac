# Load: 32 clients queue for 60 seconds while the worker flushes and another
# session runs DDL on the target (columns added and dropped, indexes built
# and dropped, VACUUM).  No crash; every acknowledged entry applied once or
# dead-lettered, none twice; the worker's private memory stays flat.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;

my $seconds = $ENV{ATHENA_LOAD_SECONDS} // 60;

my $node = PostgreSQL::Test::Cluster->new('load_ddl');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.batch_window_ms = 50
athena_deferred.batch_max_size = 500
athena_deferred.queue_size = '64MB'
athena_deferred.lock_timeout_ms = 1000
max_connections = 50
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION athena_deferred;
CREATE TABLE t (id bigint, client int, note text);
CREATE SEQUENCE ids;
});

my $script = $node->basedir . '/queue.sql';
open(my $fh, '>', $script) or die;
print $fh q{SELECT deferred_insert('t', jsonb_build_object('id', nextval('ids'), 'client', :client_id, 'note', 'load'));
};
close $fh;

# the worker's pid, and its private (anonymous) memory in kB
sub worker_pid
{
	return $node->safe_psql('postgres', q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'athena_deferred'});
}

sub worker_rss_anon
{
	my ($pid) = @_;
	open(my $st, '<', "/proc/$pid/status") or die "no /proc/$pid/status";
	while (<$st>)
	{
		return $1 if /^RssAnon:\s+(\d+) kB/;
	}
	die 'no RssAnon';
}

my ($out, $err) = ('', '');
my $load = IPC::Run::start(
	[
		'pgbench', '-n', '-c', '32', '-j', '2', '-T', $seconds, '-f', $script,
		'-h', $node->host, '-p', $node->port, 'postgres'
	],
	'>', \$out, '2>', \$err);

# DDL while the load runs
my $start = time();
my ($rss_early, $worker_early, $rounds) = (undef, undef, 0);
while (time() - $start < $seconds - 2)
{
	$rounds++;
	$node->safe_psql('postgres', "ALTER TABLE t ADD COLUMN extra_$rounds int");
	$node->safe_psql('postgres', 'CREATE INDEX t_client ON t (client)');
	$node->safe_psql('postgres', 'VACUUM t');
	$node->safe_psql('postgres', "ALTER TABLE t DROP COLUMN extra_$rounds");
	$node->safe_psql('postgres', 'DROP INDEX t_client');
	if (!defined $rss_early && time() - $start >= 10)
	{
		$worker_early = worker_pid();
		$rss_early = worker_rss_anon($worker_early);
	}
	sleep(1);
}
$load->finish;
# the worker still has the backlog of the last window to apply
my $rss_late = worker_rss_anon($worker_early);
$out =~ /number of transactions actually processed: (\d+)/ or die "no pgbench summary: $out $err";
my $acked = $1;

$node->safe_psql('postgres', 'SELECT deferred_flush(120000)');
my ($rows, $distinct) = split /\|/, $node->safe_psql('postgres', 'SELECT count(*), count(DISTINCT id) FROM t');
my $dead = $node->safe_psql('postgres', 'SELECT count(*) FROM deferred_dead_letters');

cmp_ok($acked, '>', 1000, "clients were acknowledged ($acked in $seconds s, $rounds rounds of DDL)");
is($distinct, $rows, 'no entry applied twice');
is($rows + $dead, $acked, "every acknowledged entry applied ($rows) or dead-lettered ($dead)");
is($node->safe_psql('postgres', 'SELECT pending FROM deferred_stats'), '0', 'nothing left pending');
cmp_ok($rss_late - ($rss_early // $rss_late), '<', 20 * 1024,
	"worker private memory flat ($rss_early kB after 10 s, $rss_late kB at the end, same worker $worker_early)");
ok(!$node->log_contains(qr/terminated by signal|PANIC/), 'no crash');
$node->stop;
done_testing();
