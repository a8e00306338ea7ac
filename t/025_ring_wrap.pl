# The worker reads entries where they lie in the ring: through many laps of
# a small ring, with entries of every size (so that some wrap around the
# ring's end, header or body), failing entries retried across flushes and
# dead-lettered while the entries after them are applied, every
# acknowledged entry is applied exactly once with its exact values, and
# deferred_pending() (which copies entries) lists what is queued.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('wrap');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.queue_size = '64kB'
athena_deferred.batch_window_ms = 0
athena_deferred.batch_max_size = 0
athena_deferred.max_flush_attempts = 2
athena_deferred.enqueue_timeout_ms = 10000
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION athena_deferred;
CREATE TABLE t (id int PRIMARY KEY CHECK (id > 0), pad text NOT NULL);
CREATE TABLE expected (id int PRIMARY KEY, pad text NOT NULL);
});

my $rounds = 60;
my $per_round = 90;
my $bytes = 0;
my $bad = 0;
my $capacity = $node->safe_psql('postgres', 'SELECT capacity_bytes FROM deferred_stats()');
for my $r (0 .. $rounds - 1)
{
	my $from = $r * $per_round + 1;
	my $to = $from + $per_round - 1;

	# pads of 0 to 400 bytes, a different mix each round; some with
	# characters that need escaping (the lexer's path rather than the plain one)
	my $pad = qq{CASE WHEN g % 17 = 0 THEN E'tab\\there "quoted" \\\\ ' ELSE '' END
		|| repeat(chr(65 + g % 26), (g * 37 + $r * 11) % 401)};
	$node->safe_psql('postgres', qq{
INSERT INTO expected SELECT g, $pad FROM generate_series($from, $to) g;
SELECT count(deferred_insert('t', jsonb_build_object('id', g, 'pad', $pad)))
FROM generate_series($from, $to) g;
});

	# every third round, an entry that fails in the middle of the batch: its
	# batch is split down to it, it is retried by the next flushes and
	# dead-lettered at its second attempt, holding the ring behind it
	if ($r % 3 == 1)
	{
		$node->safe_psql('postgres', qq{
SELECT deferred_insert('t', jsonb_build_object('id', -$r, 'pad', 'bad'));
SELECT count(deferred_insert('t', jsonb_build_object('id', g, 'pad', 'after')))
FROM generate_series($to + 1 + 100000, $to + 5 + 100000) g;
INSERT INTO expected SELECT g, 'after' FROM generate_series($to + 1 + 100000, $to + 5 + 100000) g;
});
		$bad++;
	}

	my ($pending, $pending_bytes) = split /\|/,
	  $node->safe_psql('postgres', 'SELECT pending, pending_bytes FROM deferred_stats()');
	$bytes += $pending_bytes;
	if ($r % 10 == 0)
	{
		is($node->safe_psql('postgres', 'SELECT count(*) FROM deferred_pending()'),
			$pending, "round $r: deferred_pending() lists the $pending pending entries");
	}
	$node->safe_psql('postgres', 'SELECT deferred_flush()');
}
# the last bad entry may still be waiting for its second attempt
$node->poll_query_until('postgres', 'SELECT pending = 0 FROM deferred_stats()')
  or die 'entries left pending';

cmp_ok($bytes, '>', 20 * $capacity, "the ring went round many times ($bytes bytes through $capacity)");
is($node->safe_psql('postgres', q{
SELECT count(*) FROM expected e FULL JOIN t USING (id)
WHERE t.pad IS DISTINCT FROM e.pad}), '0', 'every entry applied once, with its exact values');
is($node->safe_psql('postgres', 'SELECT count(*) FROM t'),
	$node->safe_psql('postgres', 'SELECT count(*) FROM expected'), 'no row twice, none lost');
is($node->safe_psql('postgres',
		q{SELECT count(*) || '|' || min(attempts) || '|' || max(attempts) FROM deferred_dead_letters}),
	"$bad|2|2", 'each failing entry dead-lettered after its two attempts');
is($node->safe_psql('postgres',
		'SELECT pending || \'|\' || pending_bytes || \'|\' || dead_lettered FROM deferred_stats()'),
	"0|0|$bad", 'nothing left in the queue');

$node->stop;
done_testing();
