# After a crash, the WAL can still hold entries that a committed flush had
# settled: those after an older entry that is being retried.  The worker
# settles them again from the flush's record, each with its outcome: one
# that flush dead-lettered is a dead letter for deferred_wait(), not
# "applied", and nothing is applied twice.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('reconcile');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.batch_window_ms = 0
athena_deferred.batch_max_size = 0
athena_deferred.max_flush_attempts = 1
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION athena_deferred;
CREATE TABLE r (id int CHECK (id > 0));
CREATE TABLE d (id int CHECK (id > 0));
CREATE TABLE ok (id int);
-- the dead letter of an entry for r cannot be written, so that entry
-- stays queued and is retried: it keeps the WAL from that point on
CREATE FUNCTION refuse_r() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.target IN ('r', 'public.r') THEN
        RAISE EXCEPTION 'no dead letter for r';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_r BEFORE INSERT ON deferred_dead_letters
    FOR EACH ROW EXECUTE FUNCTION refuse_r();
});

my $rid = $node->safe_psql('postgres', q{SELECT deferred_insert('r', '{"id": -1}')});
my $did = $node->safe_psql('postgres', q{SELECT deferred_insert('d', '{"id": -2}')});
my $oid = $node->safe_psql('postgres', q{SELECT deferred_insert('ok', '{"id": 1}')});

is($node->safe_psql('postgres', "SELECT deferred_wait($did)"), 'dead_letter', 'before the crash: d\'s entry dead-lettered');
is($node->safe_psql('postgres', "SELECT deferred_wait($oid)"), 'applied', 'before the crash: ok\'s entry applied');
is($node->safe_psql('postgres', 'SELECT array_length(retry, 1) FROM deferred_progress'), '1',
	'r\'s entry is being retried');

$node->stop('immediate');
my $log_offset = -s $node->logfile;
$node->start;

is($node->safe_psql('postgres', "SELECT deferred_wait($did)"), 'dead_letter',
	'after the crash: d\'s entry is still a dead letter, not "applied"');
is($node->safe_psql('postgres', "SELECT deferred_wait($oid)"), 'applied', 'after the crash: ok\'s entry applied');
ok($node->log_contains(qr/1 entries had been applied and 1 dead-lettered by a flush before the restart/, $log_offset),
	'the worker settled both again from the flush\'s record');
is($node->safe_psql('postgres', 'SELECT (SELECT count(*) FROM ok) || \'|\' || (SELECT count(*) FROM deferred_dead_letters WHERE id = ' . $did . ')'),
	'1|1', 'nothing applied or dead-lettered twice');

# once the dead letter can be written, r's entry becomes one
$node->safe_psql('postgres', 'DROP TRIGGER refuse_r ON deferred_dead_letters');
is($node->safe_psql('postgres', "SELECT deferred_wait($rid)"), 'dead_letter', 'r\'s entry dead-lettered at last');
is($node->safe_psql('postgres', 'SELECT count(*) FROM r'), '0', 'nothing of it applied');
$node->stop;
done_testing();
