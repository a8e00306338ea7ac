# Damaged WAL: a torn tail is ignored with a LOG line and everything before
# it recovered; a flipped byte in the middle is reported loudly and the
# records around it recovered; a committed transaction whose write is
# missing its end has the rest applied; empty segments and a missing WAL
# directory are harmless.  Nothing is skipped without a message.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use File::Path qw(rmtree);

my $node = PostgreSQL::Test::Cluster->new('damage');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.batch_window_ms = 0
athena_deferred.batch_max_size = 0
athena_deferred.wal_segment_size = '1MB'
max_prepared_transactions = 2
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION athena_deferred;
CREATE TABLE t (id int, tag text);
CREATE TABLE t2 (id int);
});
my $waldir = $node->data_dir . '/pg_athena_deferred';

sub queue
{
	my ($tag, $n) = @_;
	$node->safe_psql('postgres', 'SELECT deferred_flush()');
	$node->safe_psql('postgres',
		"SELECT count(deferred_insert('t', jsonb_build_object('id', g, 'tag', '$tag'))) FROM generate_series(1, $n) g");
}

# the segment file holding data, and the offset just past its last record
sub last_data
{
	for my $file (reverse sort glob("$waldir/????????????????"))
	{
		my $data = slurp_file($file);
		my $end = length($data);
		$end -= 8 while $end >= 8 && substr($data, $end - 8, 8) eq "\0" x 8;
		return ($file, $end, $data) if $end > 0;
	}
	die 'no WAL data found';
}

sub write_at
{
	my ($file, $offset, $bytes) = @_;
	open(my $fh, '+<', $file) or die "open $file: $!";
	binmode $fh;
	seek($fh, $offset, 0);
	print $fh $bytes;
	close $fh;
}

sub count_tag
{
	my ($tag) = @_;
	return $node->safe_psql('postgres', "SELECT count(*) || '|' || count(DISTINCT id) FROM t WHERE tag = '$tag'");
}

# --- torn tail: half a record after the last one -----------------------------
queue('torn', 100);
# a prepared transaction locks the table, so that the entries, recovered
# after each crash, stay pending and their segment stays in place
$node->safe_psql('postgres', "BEGIN; LOCK TABLE t; PREPARE TRANSACTION 'hold_t'");
$node->stop('immediate');
my ($file, $end, $data) = last_data();
# a copy of the first record's header and a few payload bytes: cut short
write_at($file, $end, substr($data, 0, 16) . 'xxxx');
my $log_offset = -s $node->logfile;
$node->start;
# a call waits for recovery; its record goes to a newer segment, after
# which a tear left in the old one would count as corruption
$node->safe_psql('postgres', q{SELECT deferred_insert('t2', '{"id": 1}')});
is($node->safe_psql('postgres', 'SELECT torn_records, corrupt_records FROM deferred_stats()'), '1|0',
	'torn tail counted');
ok($node->log_contains(qr/LOG:  athena_deferred: torn record at the end of WAL segment/, $log_offset),
	'torn tail reported with a LOG line');
is(substr(slurp_file($file), $end, 20), "\0" x 20, 'torn tail erased by the recovery that found it');
$node->stop('immediate');
$node->start;
$node->safe_psql('postgres', q{SELECT deferred_insert('t2', '{"id": 2}')});
is($node->safe_psql('postgres', 'SELECT torn_records, corrupt_records FROM deferred_stats()'), '0|0',
	'no damage found at the next recovery');
$node->safe_psql('postgres', "ROLLBACK PREPARED 'hold_t'");
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is(count_tag('torn'), '100|100', 'torn tail: every complete record recovered, once, across both crashes');

# --- a flipped byte in the middle ---------------------------------------------
queue('flipped', 100);
$node->stop('immediate');
($file, $end, $data) = last_data();
# flip a byte in the payload of the 50th record of this batch
my $offset = 0;
for (1 .. 49)
{
	my $len = unpack('V', substr($data, $offset + 4, 4));
	$offset += (16 + $len + 7) & ~7;
}
my $target = $offset + 20;
write_at($file, $target, chr(ord(substr($data, $target, 1)) ^ 0x55));
$log_offset = -s $node->logfile;
$node->start;
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is(count_tag('flipped'), '99|99', 'flipped byte: the damaged record lost, the 99 around it recovered once');
is($node->safe_psql('postgres', 'SELECT corrupt_records FROM deferred_stats()'), '1', 'corruption counted');
ok($node->log_contains(qr/WARNING:  athena_deferred: corrupt data in WAL segment .* skipped/, $log_offset),
	'corruption reported with a WARNING');

# --- the end of a committed transaction's write never written --------------
# An OS crash can leave the last pages of a write unwritten (zeros, where
# nothing is reported as damage).  A transaction that queued 100 entries
# has an xid (the id sequence logs itself every 32 values), and the commit
# log says it committed: the 80 records that reached the disk are applied,
# as records lost to damage cost only their own entries.  (Without an xid
# the write is dropped whole: t/011_fault_points.pl.)
queue('unfinished', 100);
$node->stop('immediate');
($file, $end, $data) = last_data();
my $from = 0;
for (1 .. 80)
{
	my $len = unpack('V', substr($data, $from + 4, 4));
	$from += (16 + $len + 7) & ~7;
}
write_at($file, $from, "\0" x ($end - $from));
$log_offset = -s $node->logfile;
$node->start;
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is(count_tag('unfinished'), '80|80', 'records 81-100 of a committed transaction never written: the other 80 applied once');
ok($node->log_contains(qr/WARNING:  athena_deferred: the last 20 records of a transaction's write are missing at the end of the WAL/, $log_offset),
	'the missing records reported with a WARNING');

# --- an empty segment in the directory ----------------------------------------
queue('empty', 50);
$node->stop('immediate');
open(my $fh, '>', "$waldir/00000000000000FF") or die;
print $fh "\0" x (1024 * 1024);
close $fh;
$node->start;
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is(count_tag('empty'), '50|50', 'an empty segment is harmless');
is($node->safe_psql('postgres', 'SELECT torn_records + corrupt_records FROM deferred_stats()'), '0',
	'and not reported as damage');

# --- the WAL directory missing ------------------------------------------------
$node->safe_psql('postgres', 'SELECT deferred_flush()');
$node->stop;
rmtree($waldir);
$node->start;
queue('nodir', 10);
$node->restart;
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is(count_tag('nodir'), '10|10', 'a missing WAL directory is recreated and used');

is($node->safe_psql('postgres', 'SELECT count(*) FROM deferred_dead_letters'), '0', 'nothing dead-lettered');
$node->stop;
done_testing();
