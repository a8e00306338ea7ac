# Disk faults under the extension's WAL: a full disk, an unwritable WAL
# directory and a failed fsync.  In each case the committing transaction
# gets an ERROR before it is acknowledged (or, for a failed fsync with
# data_sync_retry = off, the server PANICs as it does for its own WAL), no
# entry that got an ERROR is ever applied, every acknowledged entry is
# applied exactly once, also across crashes, and calls succeed again once
# the fault is gone.
#
# The WAL directory lives on a small filesystem that this test fills:
# ATHENA_TEST_SMALL_FS names it (scripts/test.sh mounts a tmpfs when run as
# root).  Without it the test fails; it never fills a large filesystem.
use strict;
use warnings;
use Errno qw(ENOSPC);
use File::Path qw(rmtree);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use AthenaDeferredTest;

my $fs = $ENV{ATHENA_TEST_SMALL_FS} // '';
BAIL_OUT('ATHENA_TEST_SMALL_FS is not set: this test needs a small filesystem to fill '
	  . '(run scripts/test.sh as root, which mounts a tmpfs, or point the variable at one)')
  if $fs eq '';
BAIL_OUT("ATHENA_TEST_SMALL_FS=$fs is not a writable directory") unless -d $fs && -w $fs;
my @df = split /\s+/, (split /\n/, `df -Pk '$fs'`)[1] // '';
BAIL_OUT("could not read the size of $fs with df") unless defined $df[1] && $df[1] =~ /^\d+$/;
BAIL_OUT("$fs has $df[1] kB: refusing to fill a filesystem larger than 64 MB") if $df[1] > 65536;

my $waldir = "$fs/021_wal";
my $filler = "$fs/filler";
rmtree($waldir);
unlink($filler);

my $node = PostgreSQL::Test::Cluster->new('disk_faults');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'athena_deferred'
athena_deferred.wal_dir = '$waldir'
athena_deferred.wal_segment_size = '64kB'
athena_deferred.queue_size = '1MB'
athena_deferred.batch_window_ms = 0
athena_deferred.batch_max_size = 0
restart_after_crash = on
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION athena_deferred;
CREATE TABLE t (k int, tag text, pad text);
CREATE TABLE plain (id int);
});

sub wait_for_launcher
{
	$node->poll_query_until('postgres',
		q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'athena_deferred launcher'})
	  or die 'launcher did not come back';
}

# Run calls k = $from .. $to, each in its own transaction, in one session;
# returns the acknowledged k and the SQLSTATEs of the failures.
sub calls
{
	my ($tag, $from, $to, %opt) = @_;
	my $pad = $opt{pad} // 1000;
	my $script = "\\set VERBOSITY verbose\n" . ($opt{setup} // '');
	for my $k ($from .. $to)
	{
		$script .= "SELECT 'ack:' || k FROM (SELECT $k AS k, deferred_insert('t', "
		  . "jsonb_build_object('k', $k, 'tag', '$tag', 'pad', repeat('x', $pad)))) s;\n";
	}
	my ($ret, $out, $err) = $node->psql('postgres', $script, on_error_stop => 0);
	my @acked = ($out =~ /^ack:(\d+)$/mg);
	my @codes = ($err =~ /^(?:psql:[^\n]*?)?ERROR:  ([0-9A-Z]{5}):/mg);
	return (\@acked, \@codes, $err);
}

# "k,k,...|once" for the rows applied for a tag ("twice" if one was applied
# more than once)
sub applied
{
	my ($tag) = @_;
	return $node->safe_psql('postgres',
		"SELECT coalesce(string_agg(k::text, ',' ORDER BY k), '') || '|' || "
		  . "CASE WHEN count(*) = count(DISTINCT k) THEN 'once' ELSE 'twice' END FROM t WHERE tag = '$tag'");
}

sub expect
{
	my ($acked) = @_;
	return join(',', sort { $a <=> $b } @$acked) . '|once';
}

sub codes_are
{
	my ($codes, $code) = @_;
	return scalar(@$codes) > 0 && !grep { $_ ne $code } @$codes;
}

# Fill the filesystem to the last page
sub fill
{
	open(my $fh, '>>', $filler) or die "could not open $filler: $!";
	binmode($fh);
	for my $block (65536, 4096, 512)
	{
		my $zeros = "\0" x $block;
		while (1)
		{
			my $n = syswrite($fh, $zeros);
			last if !defined $n || $n < $block;
		}
		die "filling $fs: $!" if $! != ENOSPC;
	}
	close($fh);
	return;
}

# In one session: k = 1 with the fault point armed, then k = 2 without
sub fault_then_call
{
	my ($point, $tag) = @_;
	return $node->psql('postgres', qq{
\\set VERBOSITY verbose
SET athena_deferred.fault_point = '$point';
SELECT 'ack:' || deferred_insert('t', '{"k": 1, "tag": "$tag"}');
RESET athena_deferred.fault_point;
SELECT 'ack:' || deferred_insert('t', '{"k": 2, "tag": "$tag"}');
}, on_error_stop => 0);
}

sub no_panic
{
	my ($what) = @_;
	unlike(slurp_file($node->logfile), qr/PANIC/, "$what: no PANIC");
}

sub restart_immediate
{
	$node->stop('immediate');
	$node->start;
	wait_for_launcher();
	$node->safe_psql('postgres', 'SELECT deferred_flush()');
}

# ------------------------------------------------------------- disk full

my ($acked, $codes, $err) = calls('before', 1, 20, pad => 10);
is(scalar(@$acked), 20, 'entries queued before the disk fills');
# the worker creates the segment after the current one ahead of need
ok($node->poll_query_until('postgres', 'SELECT wal_segments >= 2 FROM deferred_stats()'),
	'next segment prepared');

# Fill the disk, then queue until the segments there are full.  (The queue
# must not fill up meanwhile: a full queue wakes the worker, whose flush
# frees segments.)
fill();
my ($full_acked, $full_codes, $full_err) = calls('full', 1, 200);
note(scalar(@$full_acked) . ' calls acknowledged until the disk was full');
ok(scalar(@$full_codes) >= 50, 'disk full: ' . scalar(@$full_codes) . ' calls failed');
ok(codes_are($full_codes, '53100'), 'disk full: every failed commit got SQLSTATE 53100');
is(scalar(@$full_acked) + scalar(@$full_codes), 200, 'every call either acknowledged or failed');
like($full_err, qr/could not zero-fill athena_deferred WAL file .*: No space left on device/,
	'disk full: the message says what failed');
is(join(',', @$full_acked), join(',', 1 .. scalar(@$full_acked)),
	'acknowledged calls are the ones before the disk filled');
unlike($full_err, qr/WARNING/, 'disk full: no warning while aborting (nothing to mark aborted)');

# Transactions whose records span two segments, the second of which cannot
# be created: nothing of them may reach the log, or recovery would apply the
# part that did.  Small first entries of decreasing size, so that some fit
# in what is left of the current segment.
my $script = "\\set VERBOSITY verbose\n";
for my $i (0 .. 40)
{
	my $pad = 400 - 10 * $i;
	$script .= "BEGIN;\n"
	  . "SELECT deferred_insert('t', jsonb_build_object('k', $i, 'tag', 'span', 'pad', repeat('x', $pad)));\n"
	  . "SELECT deferred_insert('t', jsonb_build_object('k', 1000 + $i, 'tag', 'span', 'pad', repeat('x', 5000)));\n"
	  . "SELECT 'ack:' || $i;\n"
	  . "COMMIT;\n";
}
my ($ret, $out);
($ret, $out, $err) = $node->psql('postgres', $script, on_error_stop => 0);
my @span_codes = ($err =~ /ERROR:  ([0-9A-Z]{5}):/g);
is(scalar(@span_codes), 41, 'disk full, records spanning segments: every commit failed');
ok(codes_are(\@span_codes, '53100'), 'disk full, records spanning segments: 53100');

# a transaction that also wrote rolls back as a whole
($ret, $out, $err) = $node->psql('postgres', q{
\set VERBOSITY verbose
BEGIN;
INSERT INTO plain VALUES (1);
SELECT deferred_insert('t', jsonb_build_object('k', 1, 'tag', 'full_xid', 'pad', repeat('x', 1000)));
COMMIT;
});
like($err, qr/ERROR:  53100:/, 'disk full, transaction with an xid: ERROR 53100 at commit');
is($node->safe_psql('postgres', 'SELECT count(*) FROM plain'), '0', 'its row was rolled back');
is($node->safe_psql('postgres', 'SELECT 1'), '1', 'disk full: server still up');
no_panic('disk full');

# a crash while the disk is still full: recovery only reads
restart_immediate();
is(applied('before'), expect([1 .. 20]), 'crash while full: earlier entries applied once');
is(applied('full'), expect($full_acked), 'crash while full: acknowledged entries applied once, failed ones not');
is(applied('span'), '|once', 'crash while full: no part of the spanning transactions applied');
is(applied('full_xid'), '|once', 'crash while full: the failed transaction\'s entry not applied');
is($node->safe_psql('postgres', 'SELECT pending_bytes FROM deferred_stats()'), '0',
	'nothing left in the queue');

# Space comes back: calls succeed again.
unlink($filler) or die "could not remove $filler: $!";
my ($after_acked) = calls('after', 1, 50);
is(scalar(@$after_acked), 50, 'space freed: calls succeed again');
$node->safe_psql('postgres', 'SELECT deferred_flush()');

# A write that fails half-way (a device error, fault point wal_write;
# wal_sync = always writes with pwrite()) is erased and fails the commit.
# Failing commits give back the queue space they had accounted for: more of
# them fail than the queue (1MB) holds, all with the write error, never
# with 53000 (queue full).
($acked, $codes) = calls('leak', 1, 60, pad => 30000,
	setup => "SET athena_deferred.enqueue_timeout_ms = 0;\nSET athena_deferred.fault_point = 'wal_write';\n");
is(scalar(@$acked), 0, 'write failing half-way, 60 calls of 30kB: none acknowledged');
is(scalar(@$codes), 60, 'write failing half-way, 60 calls of 30kB: all failed');
ok(codes_are($codes, '58030'), 'write failing half-way, 60 calls of 30kB: all 58030, the queue did not fill up');
($ret, $out, $err) = $node->psql('postgres', q{
\set VERBOSITY verbose
SET athena_deferred.fault_point = 'wal_write';
BEGIN;
SELECT deferred_insert('t', jsonb_build_object('k', g, 'tag', 'torn', 'pad', repeat('x', 200))) FROM generate_series(1, 20) g;
COMMIT;
RESET athena_deferred.fault_point;
SELECT 'ack:' || deferred_insert('t', '{"k": 21, "tag": "torn"}');
}, on_error_stop => 0);
like($err, qr/ERROR:  58030: could not write to athena_deferred WAL segment [0-9A-F]+: Input\/output error/,
	'write failing half-way: ERROR 58030');
like($out, qr/^ack:\d+$/m, 'write failing half-way: the next call succeeds');

# With wal_sync = batch a backend copies records into the segment mapped
# in memory: a segment that cannot be mapped fails the commit the same way.
# (The fault point fails the mapping, which a backend makes once per
# segment: hence a new session.)
set_wal_sync($node, 'batch');
($ret, $out, $err) = fault_then_call('wal_write', 'unmapped');
like($err, qr/ERROR:  58030: could not map athena_deferred WAL file ".*": Input\/output error/,
	'segment not mapped: ERROR 58030');
like($out, qr/\Aack:\d+\Z/, 'segment not mapped: only the next call is acknowledged');
set_wal_sync($node, undef);

# kill -9 of the postmaster, with a half-made segment of a creator left
# behind: every acknowledged entry once, nothing that failed
$node->kill9;
open(my $tmp, '>', "$waldir/tmp.99999") or die;
print $tmp "\0" x 1000;
close($tmp);
ok(start_after_kill9($node), 'restarted after kill -9 of the postmaster');
wait_for_launcher();
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is(applied('after'), expect([1 .. 50]), 'after kill -9: acknowledged entries applied once');
is(applied('full'), expect($full_acked), 'after kill -9: earlier entries still once');
is(applied('torn'), '21|once', 'after kill -9: nothing of the write that failed half-way');
is(applied('leak'), '|once', 'after kill -9: none of the other failed writes either');
is(applied('unmapped'), '2|once', 'after kill -9: nothing of the commit whose segment was not mapped');
ok(!-e "$waldir/tmp.99999", 'half-made segment removed by recovery');
is($node->safe_psql('postgres', 'SELECT torn_records + corrupt_records FROM deferred_stats()'), '0',
	'no damaged record in the WAL: the failed write was erased');
no_panic('disk full, then space freed');

# ------------------------------------------------------- unwritable dir

# While the WAL directory cannot be read or written: a session that has
# the current segment open still commits (it writes and syncs the file it
# holds, which already exists and is durable; no directory entry changes),
# a new session cannot open the segment and its commit fails with a clear
# error; once the permissions are back, calls succeed.  After a restart
# the first call starts a fresh segment, so the second one goes to the
# same file.
restart_immediate();
($ret, $out, $err) = $node->psql('postgres', qq{
\\set VERBOSITY verbose
SELECT 'ack:' || deferred_insert('t', '{"k": 1, "tag": "perm"}');
\\! chmod 000 '$waldir'
SELECT 'ack:' || deferred_insert('t', '{"k": 2, "tag": "perm"}');
\\c
\\set VERBOSITY verbose
SELECT 'ack:' || deferred_insert('t', '{"k": 3, "tag": "perm"}');
\\! chmod 700 '$waldir'
SELECT 'ack:' || deferred_insert('t', '{"k": 4, "tag": "perm"}');
}, on_error_stop => 0);
my @perm_acked = ($out =~ /^ack:(\d+)$/mg);
is(scalar(@perm_acked), 3,
	'unwritable directory: calls acknowledged before, in the session holding the segment, and after');
my @perm_codes = ($err =~ /ERROR:  ([0-9A-Z]{5}):/g);
is(join(',', @perm_codes), '42501', 'unwritable directory: the new session\'s commit fails with 42501');
like($err, qr/could not open athena_deferred WAL file ".*": Permission denied/,
	'unwritable directory: the message names the file and the cause');
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is(applied('perm'), '1,2,4|once', 'unwritable directory: only the acknowledged entries applied');
restart_immediate();
is(applied('perm'), '1,2,4|once', 'unwritable directory: and after a crash, still only those, once');
no_panic('unwritable directory');

# ------------------------------------------------------- failed fsync

# data_sync_retry = off (the default): a failed fsync of the WAL is not
# retried, the server PANICs and restarts.  The caller got no answer: its
# entry, whose record reached the log before the fsync, is in doubt (as a
# commit record PostgreSQL wrote before a failed flush), applied at most
# once.  A transaction with an xid never committed: nothing of it applied.
calls('sync', 1, 10, pad => 10);
my $log_offset = -s $node->logfile;
($ret, $out, $err) = $node->psql('postgres', q{
SET athena_deferred.fault_point = 'wal_fsync';
SELECT 'ack:' || deferred_insert('t', '{"k": 11, "tag": "sync"}');
});
isnt($ret, 0, 'fsync failure: the call failed');
unlike($out, qr/ack:/, 'fsync failure: no acknowledgement');
ok($node->wait_for_log(qr/PANIC:  could not fsync athena_deferred WAL file/, $log_offset),
	'fsync failure with data_sync_retry = off: PANIC');
ok($node->poll_query_until('postgres', 'SELECT 1', '1'), 'server back after the PANIC');
wait_for_launcher();
$node->safe_psql('postgres', 'SELECT deferred_flush()');
like(applied('sync'), qr/^1,2,3,4,5,6,7,8,9,10(,11)?\|once$/,
	'after the PANIC: acknowledged entries applied once, the one in doubt at most once');

$log_offset = -s $node->logfile;
($ret, $out, $err) = $node->psql('postgres', q{
SET athena_deferred.fault_point = 'wal_fsync';
BEGIN;
INSERT INTO plain VALUES (2);
SELECT deferred_insert('t', '{"k": 1, "tag": "sync_xid"}');
COMMIT;
});
isnt($ret, 0, 'fsync failure, transaction with an xid: the commit failed');
ok($node->wait_for_log(qr/PANIC:  could not fsync athena_deferred WAL file/, $log_offset),
	'fsync failure, transaction with an xid: PANIC');
ok($node->poll_query_until('postgres', 'SELECT 1', '1'), 'server back after the second PANIC');
wait_for_launcher();
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is(applied('sync_xid'), '|once', 'after the PANIC: the uncommitted transaction\'s entry not applied');
is($node->safe_psql('postgres', 'SELECT count(*) FROM plain'), '0', 'nor its row');

# data_sync_retry = on: the commit fails with an ERROR and the session
# goes on; the entry is never applied, also after a crash
$node->append_conf('postgresql.conf', "data_sync_retry = on\n");
$node->restart;
wait_for_launcher();
$log_offset = -s $node->logfile;
($ret, $out, $err) = fault_then_call('wal_fsync', 'sync_retry');
like($err, qr/ERROR:  58030: could not fsync athena_deferred WAL file ".*": Input\/output error/,
	'fsync failure with data_sync_retry = on: ERROR 58030');
like($out, qr/\Aack:\d+\Z/, 'data_sync_retry = on: the session goes on, the next call is acknowledged');
unlike(slurp_file($node->logfile, $log_offset), qr/PANIC/, 'data_sync_retry = on: no PANIC');
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is(applied('sync_retry'), '2|once', 'data_sync_retry = on: the failed entry not applied');
restart_immediate();
is(applied('sync_retry'), '2|once', 'data_sync_retry = on: nor after a crash');
is($node->safe_psql('postgres', 'SELECT count(*) FROM (SELECT FROM t GROUP BY tag, k HAVING count(*) > 1) d'),
	'0', 'no entry applied twice across all the restarts');

is($node->safe_psql('postgres', 'SELECT count(*) FROM deferred_dead_letters'), '0', 'nothing dead-lettered');
$node->stop;
rmtree($waldir);
done_testing();
