# Every fault point: the process dies there (SIGKILL, as a crash), the
# server reinitializes, and afterwards every acknowledged entry is applied
# exactly once, nothing unacknowledged that was not yet logged is applied,
# and a transaction that also wrote and died before committing applies
# nothing.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use lib 't';
use AthenaDeferredTest;

my $node = PostgreSQL::Test::Cluster->new('faults');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.batch_window_ms = 0
athena_deferred.batch_max_size = 0
athena_deferred.wal_segment_size = '64kB'
max_prepared_transactions = 2
restart_after_crash = on
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION athena_deferred;
CREATE TABLE t (id int, point text);
CREATE TABLE plain (id int);
CREATE TABLE t3 (id int, point text);
});

sub wait_for_launcher
{
	$node->poll_query_until('postgres',
		q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'athena_deferred launcher'})
	  or die 'launcher did not come back';
}

# arm a worker fault point through the configuration file
sub arm_worker
{
	my ($point) = @_;
	$node->safe_psql('postgres', "ALTER SYSTEM SET athena_deferred.fault_point = '$point'");
	$node->reload;
}

sub disarm
{
	$node->safe_psql('postgres', 'ALTER SYSTEM RESET athena_deferred.fault_point');
	$node->reload;
}

sub queue
{
	my ($point, $from, $to) = @_;
	$node->safe_psql('postgres',
		"SELECT count(deferred_insert('t', jsonb_build_object('id', g, 'point', '$point'))) FROM generate_series($from, $to) g");
}

# count and distinct count of applied rows for a point
sub applied
{
	my ($point) = @_;
	return $node->safe_psql('postgres', "SELECT count(*) || '|' || count(DISTINCT id) FROM t WHERE point = '$point'");
}

# --- backend points -------------------------------------------------------

# killed at pre-commit before its WAL write: not acknowledged, not applied
queue('before_wal_write', 1, 50);
my ($ret, $out, $err) = $node->psql('postgres', q{
SET athena_deferred.fault_point = 'before_wal_write';
SELECT deferred_insert('t', '{"id": 1000, "point": "before_wal_write"}');
});
isnt($ret, 0, 'before_wal_write: the call was not acknowledged');
wait_for_launcher();
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is(applied('before_wal_write'), '50|50', 'before_wal_write: acknowledged entries once, the dead one not at all');

# killed after its WAL write, before commit returned, in a transaction that
# also wrote a row (so it has an xid): neither the row nor the entry
queue('after_wal_write_xid', 1, 50);
($ret, $out, $err) = $node->psql('postgres', q{
SET athena_deferred.fault_point = 'after_wal_write';
BEGIN;
INSERT INTO plain VALUES (1);
SELECT deferred_insert('t', '{"id": 1000, "point": "after_wal_write_xid"}');
COMMIT;
});
isnt($ret, 0, 'after_wal_write: the commit was not acknowledged');
wait_for_launcher();
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is(applied('after_wal_write_xid'), '50|50', 'after_wal_write: the in-progress transaction\'s entry is not applied');
is($node->safe_psql('postgres', 'SELECT count(*) FROM plain'), '0', 'after_wal_write: nor its row');
unlink($node->data_dir . '/pg_athena_deferred/fault.after_wal_write');

# the same without an xid: the WAL record was durable, which is this
# transaction's commit point; it was in doubt for the client and is applied
# once.  (The id sequence assigns an xid when it WAL-logs, at most every 32
# values and first after a checkpoint: one call beforehand makes the next
# one xid-free.)
$node->safe_psql('postgres', q{SELECT deferred_insert('t', '{"id": 999, "point": "warm-up"}')});
($ret, $out, $err) = $node->psql('postgres', q{
SET athena_deferred.fault_point = 'after_wal_write';
SELECT deferred_insert('t', '{"id": 1000, "point": "after_wal_write"}');
});
isnt($ret, 0, 'after_wal_write without xid: outcome unknown to the client');
wait_for_launcher();
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is(applied('after_wal_write'), '1|1', 'after_wal_write without xid: applied once');

# killed half-way through writing its record, as a kill -9 can cut a
# pwrite() short (wal_sync = always) or a copy into the mapped segment
# (batch; a device error there ends the backend with SIGBUS): not
# acknowledged, and recovery takes the half record for a torn tail
for my $mode ('always', 'batch')
{
	my $tag = "mid_wal_write_$mode";
	set_wal_sync($node, $mode);
	queue($tag, 1, 50);
	my $log_offset = -s $node->logfile;
	($ret, $out, $err) = $node->psql('postgres', qq{
SET athena_deferred.fault_point = 'mid_wal_write';
SELECT deferred_insert('t', '{"id": 1000, "point": "$tag"}');
});
	isnt($ret, 0, "$tag: the call was not acknowledged");
	wait_for_launcher();
	# calls wait for recovery: after this one, its messages are logged
	$node->safe_psql('postgres', 'SELECT deferred_flush()');
	ok($node->log_contains(qr/LOG:  athena_deferred: torn record at the end of WAL segment/, $log_offset),
		"$tag: recovery reported the half-written record as a torn tail");
	is($node->safe_psql('postgres', 'SELECT torn_records, corrupt_records FROM deferred_stats()'), '1|0',
		"$tag: one torn record, no corruption");
	is(applied($tag), '50|50', "$tag: acknowledged entries once, the torn one not at all");
	unlink($node->data_dir . '/pg_athena_deferred/fault.mid_wal_write');
}
set_wal_sync($node, undef);

# the same in a transaction without an xid that queued three entries (into
# t3): its first record is whole in the log, but its write is not, so none
# of the three is applied, neither then nor at the next recovery, when a
# newer record follows the whole one.  A prepared transaction locks t, so
# that the 50 entries queued before stay pending across both crashes and
# keep the segment of the cut write in place.  (Queuing can give the
# transaction an xid, when the id sequence logs itself; then the write is
# tried again in a new one.)
sub applied_t3
{
	my ($point) = @_;
	return $node->safe_psql('postgres', "SELECT count(*) || '|' || count(DISTINCT id) FROM t3 WHERE point = '$point'");
}
queue('mid_wal_write_three', 1, 50);
$node->safe_psql('postgres', "BEGIN; LOCK TABLE t; PREPARE TRANSACTION 'hold_t'");
my $log_offset = -s $node->logfile;
($ret, $out, $err) = $node->psql('postgres', q{
BEGIN;
SELECT count(deferred_insert('t3', jsonb_build_object('id', g, 'point', 'three'))) FROM generate_series(1, 3) g;
SELECT txid_current_if_assigned() IS NULL AS noxid \gset
\if :noxid
\else
ROLLBACK;
BEGIN;
SELECT count(deferred_insert('t3', jsonb_build_object('id', g, 'point', 'three'))) FROM generate_series(1, 3) g;
\endif
SELECT 'noxid:' || (txid_current_if_assigned() IS NULL);
SET LOCAL athena_deferred.fault_point = 'mid_wal_write';
COMMIT;
});
like($out, qr/^noxid:true$/m, 'mid_wal_write, three entries: the transaction had no xid');
isnt($ret, 0, 'mid_wal_write, three entries: the commit was not acknowledged');
unlink($node->data_dir . '/pg_athena_deferred/fault.mid_wal_write');
wait_for_launcher();
# a call waits for recovery; its entry is the newer record
$node->safe_psql('postgres', q{SELECT deferred_insert('t3', '{"id": 1, "point": "after"}')});
ok($node->log_contains(qr/LOG:  athena_deferred: the last records of a transaction's write are missing at the end of the WAL \(segment \S+\): none of the 1 of its entries read is applied/, $log_offset),
	'mid_wal_write, three entries: recovery found the first whole and the write cut short');
$node->stop('immediate');
$node->start;
wait_for_launcher();
$node->safe_psql('postgres', "ROLLBACK PREPARED 'hold_t'");
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is(applied_t3('three'), '0|0', 'mid_wal_write, three entries: none applied, also after another crash');
is(applied_t3('after'), '1|1', 'mid_wal_write, three entries: the entry queued after them applied once');
is(applied('mid_wal_write_three'), '50|50', 'mid_wal_write, three entries: the entries acknowledged before, once');

# --- worker points ----------------------------------------------------------

for my $point ('before_flush_commit', 'after_flush_commit')
{
	queue($point, 1, 100);
	arm_worker($point);
	$node->psql('postgres', 'SELECT deferred_flush(5000)');
	ok($node->wait_for_log(qr/fault point "$point" reached/), "$point: worker died there");
	wait_for_launcher();
	disarm();
	$node->safe_psql('postgres', 'SELECT deferred_flush()');
	is(applied($point), '100|100', "$point: every entry applied exactly once");
}

# segment removal: enough entries for several 64kB segments
queue('segment_removal', 1, 2000);
my $segments_before = $node->safe_psql('postgres', 'SELECT wal_segments FROM deferred_stats()');
cmp_ok($segments_before, '>', 3, "several segments in use ($segments_before)");
arm_worker('segment_removal');
$node->psql('postgres', 'SELECT deferred_flush(5000)');
ok($node->wait_for_log(qr/fault point "segment_removal" reached/), 'segment_removal: worker died there');
wait_for_launcher();
disarm();
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is(applied('segment_removal'), '2000|2000', 'segment_removal: every entry applied exactly once');
# removal follows the flush's commit, so deferred_flush() may return first
ok($node->poll_query_until('postgres', 'SELECT wal_segments <= 3 FROM deferred_stats()'),
	'settled segments were removed after all');

# mid-recovery: the worker dies while replaying, then replays again
queue('mid_recovery', 1, 2000);
arm_worker('mid_recovery');
$node->stop('immediate');
$node->start;
ok($node->wait_for_log(qr/fault point "mid_recovery" reached/), 'mid_recovery: worker died while replaying');
wait_for_launcher();
disarm();
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is(applied('mid_recovery'), '2000|2000', 'mid_recovery: every entry applied exactly once');

is($node->safe_psql('postgres', 'SELECT count(*) FROM deferred_dead_letters'), '0', 'nothing dead-lettered');
$node->stop;
done_testing();
