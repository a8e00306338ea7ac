# Helpers shared by the TAP tests of athena_deferred.
package AthenaDeferredTest;

use strict;
use warnings;
use Exporter 'import';
use PostgreSQL::Test::Utils;

our @EXPORT = qw(start_after_kill9 set_wal_sync);

# Start a node whose postmaster was killed with SIGKILL: its children leave
# on their own, and the server cannot start before they have.  Returns
# true once it runs.
sub start_after_kill9
{
	my ($node) = @_;

	for (1 .. 60)
	{
		if (PostgreSQL::Test::Utils::system_log('pg_ctl', '-D', $node->data_dir, '-l',
				$node->logfile, '-w', 'start') == 0)
		{
			$node->_update_pid(1);
			return 1;
		}
		sleep(1);
	}
	return 0;
}

# Set athena_deferred.wal_sync (a reload setting) and wait until new
# sessions see it; undef resets it.
sub set_wal_sync
{
	my ($node, $mode) = @_;

	if (defined $mode)
	{
		$node->safe_psql('postgres', "ALTER SYSTEM SET athena_deferred.wal_sync = '$mode'");
	}
	else
	{
		$node->safe_psql('postgres', 'ALTER SYSTEM RESET athena_deferred.wal_sync');
	}
	$node->reload;
	my $want = $mode // 'always';
	$node->poll_query_until('postgres', "SELECT current_setting('athena_deferred.wal_sync') = '$want'")
	  or die "wal_sync = $want not taken";
	return;
}

1;
