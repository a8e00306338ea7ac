# A flush held up by a user's lock or a statement that hangs: the entry
# fails with lock_timeout / statement_timeout, is retried, and entries behind
# it are not held up; the worker survives.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('timeouts');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.batch_window_ms = 100
athena_deferred.lock_timeout_ms = 200
athena_deferred.statement_timeout_ms = 500
athena_deferred.max_flush_attempts = 1000
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION athena_deferred;
CREATE TABLE locked (id int);
CREATE TABLE free (id int);
CREATE TABLE slow (id int);
CREATE FUNCTION sleepy() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(5); RETURN NEW; END $$;
CREATE TRIGGER slow_insert BEFORE INSERT ON slow FOR EACH ROW EXECUTE FUNCTION sleepy();
});

# a user holds a lock the worker's insert needs (callers can still queue)
my $locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN');
$locker->query_safe('LOCK TABLE locked IN SHARE MODE');
$node->safe_psql('postgres', q{SELECT deferred_insert('locked', '{"id": 1}')});
$node->safe_psql('postgres', q{SELECT deferred_insert('free', '{"id": 1}')});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'athena_deferred' AND query LIKE 'flushing % entries into public.locked'}),
	'pg_stat_activity shows what the worker is flushing');
ok($node->poll_query_until('postgres', 'SELECT count(*) = 1 FROM free'), 'the entry behind the blocked one is applied');
ok($node->wait_for_log(qr/entry \d+ failed \(attempt \d+ of 1000\), will retry: canceling statement due to lock timeout/),
	'the blocked entry failed on lock_timeout and will be retried');
$locker->query_safe('COMMIT');
$locker->quit;
ok($node->poll_query_until('postgres', 'SELECT count(*) = 1 FROM locked'), 'applied once the lock is gone');

# a statement that hangs is cancelled by statement_timeout
$node->safe_psql('postgres', q{ALTER SYSTEM SET athena_deferred.max_flush_attempts = 2});
$node->reload;
$node->safe_psql('postgres', q{SELECT deferred_insert('slow', '{"id": 1}')});
$node->safe_psql('postgres', q{SELECT deferred_insert('free', '{"id": 2}')});
ok($node->poll_query_until('postgres', q{SELECT count(*) = 1 FROM deferred_dead_letters WHERE target = 'public.slow'}),
	'the hanging entry was dead-lettered');
is($node->safe_psql('postgres', q{SELECT sqlstate FROM deferred_dead_letters WHERE target = 'public.slow'}), '57014',
	'with the statement_timeout error');
ok($node->log_contains(qr/LOG:  athena_deferred: entry \d+ \(insert on slow\) dead-lettered after 2 attempts: canceling statement due to statement timeout/),
	'a LOG line names the table and the error');
ok(!$node->log_contains(qr/(LOG|WARNING):  athena_deferred.*"id": 1/), 'and no payload is logged');
is($node->safe_psql('postgres', 'SELECT count(*) FROM free'), '2', 'the entry queued after it was applied');
ok(!$node->log_contains(qr/background worker "athena_deferred worker.*(exited with exit code [^0]|terminated by signal)/),
	'no worker failed or crashed through all of it');
$node->stop;
done_testing();
