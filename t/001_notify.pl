# A listening connection hears one NOTIFY per table after each flush, only
# once the flushed rows are visible; skip_cache_invalidation silences it, and
# the immediate path (enabled = off) notifies at the caller's commit.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('notify');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.batch_window_ms = 0
athena_deferred.batch_max_size = 0
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION athena_deferred;
CREATE TABLE items (id int PRIMARY KEY, name text);
CREATE TABLE other (id int PRIMARY KEY);
});

my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN athena_deferred');

# the listener hears nothing at acknowledgement time
$node->safe_psql('postgres', q{
SELECT deferred_insert('items', '[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]');
SELECT deferred_update('items', '{"id": 1}', '{"name": "A"}');
SELECT deferred_insert('other', '{"id": 1}');
});
my $out = $listener->query_safe('SELECT count(*) FROM items');
is($out, '0', 'nothing applied and nothing heard before the flush');

# one notification per table, with the counts of the flush; when the
# listener reads after hearing it, the rows are there
$node->safe_psql('postgres', 'SELECT deferred_flush()');
$out = $listener->query_safe(q{SELECT string_agg(id || ':' || name, ',' ORDER BY id) FROM items});
like($out, qr/^1:A,2:b$/m, 'rows visible to the listener');
like($out,
	qr/Asynchronous notification "athena_deferred" with payload "\{"flush":(\d+),"schema":"public","table":"items","entries":2,"inserted":2,"updated":1,"deleted":0\}" received/,
	'items notification carries schema, table and counts');
like($out,
	qr/Asynchronous notification "athena_deferred" with payload "\{"flush":(\d+),"schema":"public","table":"other","entries":1,"inserted":1,"updated":0,"deleted":0\}" received/,
	'other table notified separately');
my @notes = ($out =~ /Asynchronous notification/g);
is(scalar @notes, 2, 'exactly one notification per table');
my @flushes = ($out =~ /"flush":(\d+)/g);
is($flushes[0], $flushes[1], 'both tables carry the number of the one flush');

# a flush whose only entry fails to apply touches no table: no notification
$node->safe_psql('postgres', q{SELECT deferred_insert('items', '{"id": 1}')});
$node->safe_psql('postgres', 'SELECT deferred_flush()');
$out = $listener->query_safe('SELECT 1');
unlike($out, qr/Asynchronous notification/, 'failed entries are not announced');

# skip_cache_invalidation = on suppresses them
$node->append_conf('postgresql.conf', 'athena_deferred.skip_cache_invalidation = on');
$node->reload;
$node->poll_query_until('postgres', q{SELECT current_setting('athena_deferred.skip_cache_invalidation') = 'on'})
  or die 'reload not seen';
$node->safe_psql('postgres', q{SELECT deferred_insert('items', '{"id": 3}')});
$node->safe_psql('postgres', 'SELECT deferred_flush()');
$out = $listener->query_safe('SELECT count(*) FROM items');
is($out, '3', 'row applied with invalidation skipped');

$node->append_conf('postgresql.conf', 'athena_deferred.skip_cache_invalidation = off');
$node->reload;
$node->poll_query_until('postgres', q{SELECT current_setting('athena_deferred.skip_cache_invalidation') = 'off'})
  or die 'reload not seen';

# the immediate path notifies when the caller commits, not before
my $writer = $node->background_psql('postgres');
$writer->query_safe('SET athena_deferred.enabled = off');
$writer->query_safe('BEGIN');
$writer->query_safe(q{SELECT deferred_delete('items', '{"id": 3}')});
$out = $listener->query_safe('SELECT 1');
unlike($out, qr/Asynchronous notification/, 'immediate path: nothing heard before commit');
$writer->query_safe('COMMIT');
$out = $listener->query_safe('SELECT count(*) FROM items');
like($out,
	qr/payload "\{"flush":\d+,"schema":"public","table":"items","entries":1,"inserted":0,"updated":0,"deleted":1\}"/,
	'immediate path: heard at commit');
like($out, qr/^2$/m, 'immediate delete visible');

$writer->quit;
$listener->quit;
$node->stop;
done_testing();
