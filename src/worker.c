/*-------------------------------------------------------------------------
 *
 * worker.c
 *		The background worker's loop.
 *
 * The worker wakes every batch_window_ms, when a committing backend finds
 * batch_max_size entries pending, and when deferred_flush() asks; each time
 * it flushes what is published.  Before its first flush it replays the WAL
 * (recovery.c).  With wal_sync = batch it also fsyncs the WAL every
 * batch_window_ms, and it creates the next WAL segment ahead of need.
 * SIGHUP reloads the settings; SIGTERM lets the flush at hand finish, then
 * exits.  The SQL work lives in flush.c.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/guc.h"
#include "utils/timestamp.h"

#include "athena_deferred.h"

/*
 * Entries applied in one flush transaction at most.  A flush has fixed costs
 * (its commit, its progress record, the WAL chores of the loop between two
 * flushes) that large batches amortize: COPY applies inserts at up to a
 * million rows a second.  But a flush keeps its entries invisible and its
 * row locks held until it commits, and updates and deletes, one statement
 * each, run an order of magnitude slower.  So the limit follows the speed
 * of the last full flush, aiming at FLUSH_TARGET_MS of work, between
 * FLUSH_MIN_ENTRIES and FLUSH_MAX_ENTRIES.  Memory: the flush copies the
 * entries it takes, no more than the queue holds (queue_size), plus 16
 * bytes an entry.
 */
#define FLUSH_MIN_ENTRIES	10000
#define FLUSH_MAX_ENTRIES	1000000
#define FLUSH_TARGET_MS		1000

static int	flush_limit = FLUSH_MAX_ENTRIES;

/*
 * Adapt flush_limit after a flush that handled entries in elapsed_ms.  A
 * flush that took fewer entries than it could says nothing about how many
 * it could take, unless it was too slow already.
 */
static void
adapt_flush_limit(int handled, long elapsed_ms)
{
	double		wanted;

	if (handled <= 0 || (handled < flush_limit && elapsed_ms <= FLUSH_TARGET_MS))
		return;
	wanted = (double) handled * FLUSH_TARGET_MS / Max(elapsed_ms, 1);
	flush_limit = (int) Max(Min(wanted, FLUSH_MAX_ENTRIES), FLUSH_MIN_ENTRIES);
}

/* Register the worker; called from _PG_init */
void
deferred_register_worker(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 1;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, ATHENA_EXTENSION_NAME);
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "deferred_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "athena_deferred worker");
	snprintf(worker.bgw_type, BGW_MAXLEN, ATHENA_EXTENSION_NAME);
	RegisterBackgroundWorker(&worker);
}

/* Stop backends from setting the latch of a worker that is gone */
static void
worker_detach(int code pg_attribute_unused(), Datum arg pg_attribute_unused())
{
	LWLockAcquire(deferred_shared->lock, LW_EXCLUSIVE);
	deferred_shared->worker_latch = NULL;
	LWLockRelease(deferred_shared->lock);
}

/*
 * The worker's statements wait for locks at most this long: an entry held
 * up by a user's lock fails, is retried later, and does not hold up the
 * entries behind it.  (statement_timeout is armed per entry in flush.c:
 * PostgreSQL arms it only for client statements.)
 */
static void
worker_apply_timeouts(void)
{
	char		value[32];

	snprintf(value, sizeof(value), "%d", deferred_lock_timeout_ms);
	SetConfigOption("lock_timeout", value, PGC_SUSET, PGC_S_OVERRIDE);
}

/* True if deferred_flush() is waiting for entries not yet settled */
static bool
flush_requested(void)
{
	bool		requested;

	LWLockAcquire(deferred_shared->lock, LW_SHARED);
	requested = deferred_shared->flush_requested_qseq > deferred_shared->settled_qseq;
	LWLockRelease(deferred_shared->lock);
	return requested;
}

void
deferred_worker_main(Datum main_arg pg_attribute_unused())
{
	bool		ready = false;
	int			retry_rounds = 0;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(deferred_database, NULL, 0);
	pgstat_report_appname("athena_deferred worker");

	/*
	 * A flush's commit must be durable before the WAL segments holding its
	 * entries are removed, whatever the server's default.
	 */
	SetConfigOption("synchronous_commit", "on", PGC_SUSET, PGC_S_OVERRIDE);
	worker_apply_timeouts();

	LWLockAcquire(deferred_shared->lock, LW_EXCLUSIVE);
	deferred_shared->worker_latch = MyLatch;
	LWLockRelease(deferred_shared->lock);
	on_shmem_exit(worker_detach, 0);

	ereport(LOG, (errmsg("athena_deferred worker started in database \"%s\"", deferred_database)));

	while (!ShutdownRequestPending)
	{
		int			handled = 0;
		int			settled = 0;
		int			limit;
		long		timeout;
		long		sync_in;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			worker_apply_timeouts();
		}

		/* until CREATE EXTENSION has run here, there is nothing to do */
		if (!ready)
			ready = recovery_run();
		limit = flush_limit;
		if (ready)
		{
			TimestampTz started = GetCurrentTimestamp();

			handled = flush_run(limit, &settled);
			adapt_flush_limit(handled,
							  (long) ((GetCurrentTimestamp() - started) / 1000));
			wal_remove_settled(deferred_shared->settled_qseq);
		}
		if (wal_sync_due_in() == 0)
			wal_flush_written();
		wal_prepare_segments();

		/*
		 * Go again at once while there is more than one flush's worth, or
		 * while deferred_flush() waits and the last flush got somewhere.
		 * Entries that only failed are retried after a growing pause, so
		 * that a transient failure (a deadlock, a lock timeout) is not
		 * dead-lettered by a burst of retries.
		 */
		retry_rounds = (handled > settled) ? retry_rounds + 1 : 0;
		if (handled == limit || (settled > 0 && flush_requested()))
			continue;
		if (flush_requested())
			timeout = retry_rounds > 0 ? Min(100L * retry_rounds, 5000L) : 10;
		else if (!ready)
			timeout = 1000;
		else
			timeout = deferred_batch_window_ms > 0 ? deferred_batch_window_ms : -1;
		/* with wal_sync = batch, wake up for the background fsync too */
		sync_in = wal_sync_due_in();
		if (sync_in >= 0 && (timeout < 0 || sync_in < timeout))
			timeout = sync_in;

		(void) WaitLatch(MyLatch,
						 WL_LATCH_SET | WL_EXIT_ON_PM_DEATH | (timeout >= 0 ? WL_TIMEOUT : 0),
						 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}

	ereport(LOG, (errmsg("athena_deferred worker shutting down")));
	/* exit code 1: a terminated worker is restarted; at shutdown it is not */
	proc_exit(1);
}
