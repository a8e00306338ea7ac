# The example cache client (examples/cache_listener.py, psycopg 3) against a
# real server: it never serves a row it has been told is stale, through a
# flush, a forced disconnect and catch-up, and a miss too large to catch up.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('cache');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.batch_window_ms = 0
athena_deferred.batch_max_size = 0
athena_deferred.invalidation_ring_size = 16
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION athena_deferred');

my $script = "$ENV{TESTDIR}/examples/test_cache_listener.py";
my $conninfo = 'host=' . $node->host . ' port=' . $node->port . ' dbname=postgres';
my ($stdout, $stderr) = ('', '');
my $ok = IPC::Run::run([ '/usr/bin/python3', $script, $conninfo ], '>', \$stdout, '2>', \$stderr);
note($stderr) if $stderr;

# relay the client's own checks
for my $line (split /\n/, $stdout)
{
	if ($line =~ /^(not ok|ok) \d+ - (.*)$/)
	{
		ok($1 eq 'ok', "cache client: $2");
	}
}
ok($ok, 'cache client exited cleanly');
like($stdout, qr/^1\.\.12$/m, 'cache client ran all its checks');
$node->stop;
done_testing();
