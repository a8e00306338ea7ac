/*-------------------------------------------------------------------------
 *
 * worker.c
 *		A database's worker: its loop.
 *
 * The launcher starts one worker per database with pending entries.  The
 * worker wakes every batch_window_ms, when a committing backend finds
 * batch_max_size entries pending, and when deferred_flush() asks; each time
 * it flushes its database's published entries.  At server start the
 * launcher starts one first to learn how far the database's entries were
 * applied (recovery.c); that one reports and leaves.  A worker exits once its database has had nothing queued for
 * WORKER_IDLE_EXIT_MS.  SIGHUP reloads the settings; SIGTERM lets the
 * flush at hand finish, then exits.  The SQL work lives in flush.c.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/dbcommands.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/guc.h"
#include "utils/memutils.h"
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
 * FLUSH_MIN_ENTRIES and FLUSH_MAX_ENTRIES.  Memory: the flush reads the
 * entries where they lie in the queue (copying only one that wraps around
 * the ring's end) and keeps 21 bytes an entry taken, from flush to flush.
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

/*
 * An idle worker exits after this long, well within the 5 s that DROP
 * DATABASE waits for other sessions to leave
 */
#define WORKER_IDLE_EXIT_MS	2000

/* Launcher: start a worker for database dbid; false if no slot was free */
bool
worker_start(Oid dbid, BackgroundWorkerHandle **handle)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;	/* the launcher does */
	snprintf(worker.bgw_library_name, BGW_MAXLEN, ATHENA_EXTENSION_NAME);
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "deferred_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "athena_deferred worker for database %u", dbid);
	snprintf(worker.bgw_type, BGW_MAXLEN, ATHENA_EXTENSION_NAME);
	worker.bgw_main_arg = ObjectIdGetDatum(dbid);
	worker.bgw_notify_pid = MyProcPid;
	return RegisterDynamicBackgroundWorker(&worker, handle);
}

/*
 * The database's slot, while this worker is attached to it: the launcher
 * frees only slots without a worker, so it stays this database's.  Its
 * fields are read under the lock.
 */
static DeferredDatabase *my_db = NULL;

/*
 * Take the database's slot: false if another worker already serves it (a
 * launcher that restarted may start a second one).
 */
static bool
worker_attach(void)
{
	DeferredDatabase *db;

	LWLockAcquire(deferred_shared->lock, LW_EXCLUSIVE);
	db = queue_database_slot(MyDatabaseId, true);
	if (db != NULL && db->worker_latch == NULL)
	{
		db->worker_latch = MyLatch;
		my_db = db;
	}
	LWLockRelease(deferred_shared->lock);
	return my_db != NULL;
}

/* Stop backends from setting the latch of a worker that is gone */
static void
worker_detach(int code pg_attribute_unused(), Datum arg pg_attribute_unused())
{
	LWLockReleaseAll();			/* exiting on an error raised under a lock */
	LWLockAcquire(deferred_shared->lock, LW_EXCLUSIVE);
	if (my_db->worker_latch == MyLatch)
		my_db->worker_latch = NULL;
	LWLockRelease(deferred_shared->lock);
	queue_wake_launcher();
}

/*
 * Has the database had nothing queued, not even by open transactions, for
 * WORKER_IDLE_EXIT_MS?  Then the worker leaves its slot, in the same lock
 * hold as the check, so that the next commit wakes the launcher instead.
 */
static bool
worker_idle_exit(TimestampTz *idle_since)
{
	TimestampTz now = GetCurrentTimestamp();
	bool		leave = false;

	LWLockAcquire(deferred_shared->lock, LW_EXCLUSIVE);
	if (pg_atomic_read_u64(&my_db->pending) > 0 || my_db->bytes > 0)
		*idle_since = 0;
	else if (*idle_since == 0)
		*idle_since = now;
	else if (TimestampDifferenceMilliseconds(*idle_since, now) >= WORKER_IDLE_EXIT_MS)
	{
		my_db->worker_latch = NULL;
		leave = true;
	}
	LWLockRelease(deferred_shared->lock);
	return leave;
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

/* True if deferred_flush() is waiting for entries of this database */
static bool
flush_requested(void)
{
	uint64		wanted;

	LWLockAcquire(deferred_shared->lock, LW_SHARED);
	wanted = my_db->flush_requested_qseq;
	LWLockRelease(deferred_shared->lock);
	return wanted > 0 && !queue_flushed(wanted);
}

/* True if batch_max_size entries of this database are pending */
static bool
batch_full(void)
{
	int64		pending;

	if (deferred_batch_max_size <= 0)
		return false;
	LWLockAcquire(deferred_shared->lock, LW_SHARED);
	pending = (int64) pg_atomic_read_u64(&my_db->pending);
	LWLockRelease(deferred_shared->lock);
	return pending >= deferred_batch_max_size;
}

void
deferred_worker_main(Datum main_arg)
{
	Oid			dbid = DatumGetObjectId(main_arg);
	bool		installed;
	bool		warned = false;
	char	   *dbname;
	int			retry_rounds = 0;
	TimestampTz idle_since = 0;
	TimestampTz last_flush;
	bool		more = false;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	/* entries queued before datallowconn was turned off are applied too */
	BackgroundWorkerInitializeConnectionByOid(dbid, InvalidOid, BGWORKER_BYPASS_ALLOWCONN);
	pgstat_report_appname("athena_deferred worker");
	StartTransactionCommand();
	dbname = MemoryContextStrdup(TopMemoryContext, get_database_name(MyDatabaseId));
	CommitTransactionCommand();
	if (!worker_attach())
		proc_exit(0);
	on_shmem_exit(worker_detach, 0);

	/*
	 * A flush's commit must be durable before the WAL segments holding its
	 * entries are removed, whatever the server's default.
	 */
	SetConfigOption("synchronous_commit", "on", PGC_SUSET, PGC_S_OVERRIDE);
	worker_apply_timeouts();

	/*
	 * At server start the launcher waits for this database's progress.  A
	 * worker that reported it leaves, so that recovery needs only one
	 * background worker slot at a time however many databases the WAL
	 * holds; the launcher starts a worker again for the restored entries.
	 */
	installed = recovery_report_progress();
	if (!deferred_shared->recovered)
		proc_exit(0);
	recovery_reconcile();
	last_flush = GetCurrentTimestamp();

	ereport(DEBUG1, (errmsg("athena_deferred worker started in database \"%s\"", dbname)));

	while (!ShutdownRequestPending)
	{
		int			handled = 0;
		int			settled = 0;
		int			limit;
		long		timeout;
		long		elapsed;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			worker_apply_timeouts();
		}

		/*
		 * Flush when the timer is due, batch_max_size entries are pending,
		 * or deferred_flush() asks; batch_window_ms = 0 turns the timer off.
		 */
		elapsed = TimestampDifferenceMilliseconds(last_flush, GetCurrentTimestamp());
		limit = flush_limit;
		if (more || (deferred_batch_window_ms > 0 && elapsed >= deferred_batch_window_ms) ||
			flush_requested() || batch_full())
		{
			TimestampTz started = GetCurrentTimestamp();

			handled = flush_run(limit, &settled);
			last_flush = GetCurrentTimestamp();
			adapt_flush_limit(handled, (long) ((last_flush - started) / 1000));
			elapsed = 0;
			installed = (handled >= 0);
		}
		if (settled > 0)
			queue_wake_launcher();	/* WAL segments may be removable */
		if (!installed && !warned)
			ereport(WARNING,
					(errmsg("athena_deferred: entries are queued in database \"%s\", where the extension is not installed",
							dbname),
					 errdetail("They are applied once CREATE EXTENSION athena_deferred has run there.")));
		warned |= !installed;

		/*
		 * Go again at once while there is more than one flush's worth, or
		 * while deferred_flush() waits and the last flush got somewhere.
		 * Entries that only failed are retried after a growing pause, so
		 * that a transient failure (a deadlock, a lock timeout) is not
		 * dead-lettered by a burst of retries.
		 */
		retry_rounds = (handled > settled) ? retry_rounds + 1 : 0;
		more = (handled == limit);
		if (more || (settled > 0 && flush_requested()))
			continue;
		if (worker_idle_exit(&idle_since))
			break;
		if (flush_requested())
			timeout = retry_rounds > 0 ? Min(100L * retry_rounds, 5000L) : 10;
		else if (!installed)
			timeout = 1000;
		else if (deferred_batch_window_ms > 0)
			timeout = Max(deferred_batch_window_ms - elapsed, 1);
		else
			timeout = -1;
		if (idle_since != 0 && (timeout < 0 || timeout > WORKER_IDLE_EXIT_MS))
			timeout = WORKER_IDLE_EXIT_MS;

		(void) WaitLatch(MyLatch,
						 WL_LATCH_SET | WL_EXIT_ON_PM_DEATH | (timeout >= 0 ? WL_TIMEOUT : 0),
						 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}

	proc_exit(0);
}
