# WAL written by version 0.3.0 recovers: its entry records name each part's
# columns ("c") and null flags ("n"), which entries no longer store (the
# flush reads the columns from the part's JSON text) and new records no
# longer carry.  Segments holding such records, as a server of 0.3.0 leaves
# them after a crash, are replayed: every kind of entry is applied as
# before, entries of a transaction that aborted are not, and new records
# written afterwards recover alongside them.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;

my $node = PostgreSQL::Test::Cluster->new('wal030');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'athena_deferred'
athena_deferred.batch_window_ms = 0
athena_deferred.batch_max_size = 0
athena_deferred.wal_segment_size = '1MB'
athena_deferred.max_flush_attempts = 1000
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION athena_deferred;
CREATE TABLE t (id int, tag text, n int, "Say ""hi""" text);
-- entries stay pending (failing, retried) until the gate opens
CREATE TABLE gate (open boolean);
INSERT INTO gate VALUES (false);
CREATE FUNCTION t_gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT (SELECT open FROM gate) THEN
        RAISE EXCEPTION 'gate closed';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER t_gate BEFORE INSERT OR UPDATE OR DELETE ON t
    FOR EACH STATEMENT EXECUTE FUNCTION t_gate();
});
my $waldir = $node->data_dir . '/pg_athena_deferred';
my $db = $node->safe_psql('postgres', q{SELECT oid FROM pg_database WHERE datname = 'postgres'});
my $role = $node->safe_psql('postgres', q{SELECT oid FROM pg_roles WHERE rolname = current_user});
my $rel = $node->safe_psql('postgres', q{SELECT 't'::regclass::oid});
my $committed = $node->safe_psql('postgres', q{SELECT txid_current() % 4294967296});
my $aborted = $node->safe_psql('postgres', q{BEGIN; SELECT txid_current() % 4294967296; ROLLBACK;});
$node->stop;

# --- a segment as version 0.3.0 wrote it ---------------------------------------

# CRC-32C (Castagnoli), as pg_crc32c computes it
my @crc_table = map {
	my $c = $_;
	$c = ($c & 1) ? (($c >> 1) ^ 0x82F63B78) : ($c >> 1) for 1 .. 8;
	$c
} 0 .. 255;

sub crc32c
{
	my ($data) = @_;
	my $crc = 0xFFFFFFFF;
	$crc = $crc_table[($crc ^ $_) & 0xFF] ^ ($crc >> 8) for unpack('C*', $data);
	return $crc ^ 0xFFFFFFFF;
}

# magic, length, CRC of the payload, CRC of those three; padded to 8 bytes
sub frame
{
	my ($payload) = @_;
	my $head = pack('VVV', 0x57444441, length($payload), crc32c($payload));
	my $record = $head . pack('V', crc32c($head)) . $payload;
	return $record . ("\0" x ((8 - length($record) % 8) % 8));
}

my $json = JSON::PP->new->allow_nonref;
my $qseq = 0;

# an entry record of 0.3.0: parts are [kind, [columns], null flags, text]
sub entry
{
	my ($op, $xid, @parts) = @_;
	$qseq++;
	my $p = join(',', map {
		my ($k, $cols, $nulls, $text) = @$_;
		sprintf('{"k":%d,"c":[%s],"n":%s,"j":%s}', $k,
			join(',', map { $json->encode($_) } @$cols), $json->encode($nulls), $json->encode($text))
	} @parts);
	return frame(sprintf('{"t":"e","id":%d,"q":%d,"db":%s,"role":%s,"rel":%s,"op":%d,"xid":%s,"at":%d,"att":0,"p":[%s]}',
		1000 + $qseq, $qseq, $db, $role, $rel, $op, $xid, 817000000000000 + $qseq, $p));
}

my $segment = join('',
	# an insert of two runs of rows with different columns
	entry(1, 0,
		[1, ['id', 'tag'], 'vv', '[{"id": 1, "tag": "a"},{"id": 2, "tag": "b"}]'],
		[1, ['n', 'id'], 'nv', '[{"n": null, "id": 3}]']),
	# a column whose name the JSON text escapes
	entry(1, 0, [1, ['id', 'Say "hi"'], 'vv', '[{"id": 4, "Say \\"hi\\"": "hi 4"}]']),
	# from a transaction that committed, and from one that aborted
	entry(1, $committed, [1, ['id', 'tag'], 'vv', '[{"id": 5, "tag": "committed"}]']),
	entry(1, $aborted, [1, ['id', 'tag'], 'vv', '[{"id": 6, "tag": "aborted"}]']),
	# an update whose match has a null (IS NULL), a delete
	entry(2, 0, [2, ['n', 'id'], 'nv', '{"n": null, "id": 3}'], [3, ['tag'], 'v', '{"tag": "updated"}']),
	entry(3, 0, [2, ['tag'], 'v', '{"tag": "b"}']),
	# single-row inserts with the same columns: one batch, one COPY
	(map { entry(1, 0, [1, ['id', 'tag'], 'vv', qq([{"id": $_, "tag": "batch"}])]) } 7 .. 9));

my @segnos = sort map { hex(substr($_, -16)) } glob("$waldir/????????????????");
my $segno = @segnos ? $segnos[-1] + 1 : 0;
open(my $fh, '>', sprintf("%s/%016X", $waldir, $segno)) or die "could not write the segment: $!";
binmode $fh;
print $fh $segment . ("\0" x (1024 * 1024 - length($segment)));
close $fh;

# --- recovery ------------------------------------------------------------------
$node->start;
is($node->safe_psql('postgres', 'SELECT recovered_entries, corrupt_records FROM deferred_stats()'), '8|0',
	'the 0.3.0 records are recovered, but for the aborted transaction\'s');
is($node->safe_psql('postgres', q{SELECT string_agg(id - 1000 || ' ' || op || ' ' || payload::text, E'\n' ORDER BY id) FROM deferred_pending() WHERE id BETWEEN 1001 AND 1009}),
	join("\n",
		'1 insert {"rows": [{"id": 1, "tag": "a"}, {"id": 2, "tag": "b"}, {"n": null, "id": 3}]}',
		'2 insert {"rows": [{"id": 4, "Say \"hi\"": "hi 4"}]}',
		'3 insert {"rows": [{"id": 5, "tag": "committed"}]}',
		'5 update {"match": {"n": null, "id": 3}, "changes": {"tag": "updated"}}',
		'6 delete {"match": {"tag": "b"}}',
		'7 insert {"rows": [{"id": 7, "tag": "batch"}]}',
		'8 insert {"rows": [{"id": 8, "tag": "batch"}]}',
		'9 insert {"rows": [{"id": 9, "tag": "batch"}]}'),
	'deferred_pending() shows their payloads as given');

# new records, after the old ones, then another crash
$node->safe_psql('postgres', q{SELECT deferred_insert('t', '[{"id": 10, "tag": "new"}, {"id": 11}]')});
$node->safe_psql('postgres', q{SELECT deferred_update('t', '{"id": 10, "n": null}', '{"n": 10}')});
$node->stop('immediate');
my $new = join('', map { slurp_file($_) } grep { hex(substr($_, -16)) > $segno } glob("$waldir/????????????????"));
like($new, qr/\{"t":"e",.*"p":\[\{"k":2,"j":"\{\\"n\\": null, \\"id\\": 10\}"\},\{"k":3,"j":/,
	'new records carry each part\'s kind and text only');
$node->start;
is($node->safe_psql('postgres', 'SELECT recovered_entries FROM deferred_stats()'), '10',
	'old and new records recovered together');
is($node->safe_psql('postgres', q{SELECT string_agg(op || ' ' || payload::text, E'\n' ORDER BY id) FROM deferred_pending() WHERE id NOT BETWEEN 1001 AND 1009}),
	'insert {"rows": [{"id": 10, "tag": "new"}, {"id": 11}]}' . "\n"
	  . 'update {"match": {"n": null, "id": 10}, "changes": {"n": 10}}',
	'the new ones with their payloads');
$node->safe_psql('postgres', 'UPDATE gate SET open = true');
$node->safe_psql('postgres', 'SELECT deferred_flush()');
is($node->safe_psql('postgres', q{SELECT string_agg(concat_ws(' ', id, tag, n, "Say ""hi"""), ', ' ORDER BY id) FROM t}),
	'1 a, 3 updated, 4 hi 4, 5 committed, 7 batch, 8 batch, 9 batch, 10 new 10, 11',
	'every entry applied once, in order; the aborted one not');
is($node->safe_psql('postgres', 'SELECT applied, pending FROM deferred_stats()'), '10|0', 'all applied');
is($node->safe_psql('postgres', 'SELECT count(*) FROM deferred_dead_letters'), '0', 'nothing dead-lettered');
$node->stop;
done_testing();
