/*-------------------------------------------------------------------------
 *
 * launcher.c
 *		The launcher: one worker per database with entries, and the WAL's
 *		background work.
 *
 * The launcher is the one background worker registered at server start.
 * It connects to no database.  At start it recovers the queue from the WAL
 * (recovery.c), with the help of a worker in each database found there.
 * Then it starts a worker (worker.c) for each database that has pending
 * entries and none running; workers exit when their database has been idle
 * for a while, so that no database is kept busy (or undroppable) by an idle
 * worker.  A database dropped while it had entries is noticed when its
 * worker cannot run there: its entries are discarded, logged and counted.
 *
 * The WAL work that concerns every database is done here: the wal_sync =
 * batch fsync, creating segments ahead of need, and removing segments
 * whose entries are all settled.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/guc.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "athena_deferred.h"

/* A database's worker is not restarted more often than this */
#define WORKER_RESTART_MS	1000

/* The launcher's own view of the workers it started, by slot */
typedef struct LaunchedWorker
{
	Oid			dbid;
	BackgroundWorkerHandle *handle;
	TimestampTz started_at;
	bool		failed_to_register;
} LaunchedWorker;

static LaunchedWorker launched[DEFERRED_MAX_DATABASES];

/* Register the launcher; called from _PG_init */
void
deferred_register_launcher(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 1;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, ATHENA_EXTENSION_NAME);
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "deferred_launcher_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "athena_deferred launcher");
	snprintf(worker.bgw_type, BGW_MAXLEN, "athena_deferred launcher");
	RegisterBackgroundWorker(&worker);
}

static void
launcher_detach(int code pg_attribute_unused(), Datum arg pg_attribute_unused())
{
	LWLockReleaseAll();			/* exiting on an error raised under a lock */
	LWLockAcquire(deferred_shared->lock, LW_EXCLUSIVE);
	deferred_shared->launcher_latch = NULL;
	LWLockRelease(deferred_shared->lock);
}

/* Does the database exist, and is it not left invalid by an interrupted DROP DATABASE? */
static bool
database_exists(Oid dbid)
{
	HeapTuple	tuple;
	bool		exists = false;

	StartTransactionCommand();
	tuple = SearchSysCache1(DATABASEOID, ObjectIdGetDatum(dbid));
	if (HeapTupleIsValid(tuple))
	{
		exists = ((Form_pg_database) GETSTRUCT(tuple))->datconnlimit != DATCONNLIMIT_INVALID_DB;
		ReleaseSysCache(tuple);
	}
	CommitTransactionCommand();
	return exists;
}

/*
 * Is the worker this launcher started in slot i still there?  Forgets it
 * once it has stopped.
 */
static bool
launched_running(int i)
{
	pid_t		pid;

	if (launched[i].handle == NULL)
		return false;
	if (GetBackgroundWorkerPid(launched[i].handle, &pid) == BGWH_STOPPED)
	{
		pfree(launched[i].handle);
		launched[i].handle = NULL;
		return false;
	}
	return true;
}

/* Start a worker for the database in slot i, at most once per WORKER_RESTART_MS */
static void
launch(int i, Oid dbid)
{
	TimestampTz now = GetCurrentTimestamp();

	if (launched[i].dbid == dbid &&
		TimestampDifferenceMilliseconds(launched[i].started_at, now) < WORKER_RESTART_MS)
		return;
	launched[i].dbid = dbid;
	launched[i].started_at = now;
	if (worker_start(dbid, &launched[i].handle))
		launched[i].failed_to_register = false;
	else
	{
		launched[i].handle = NULL;
		if (!launched[i].failed_to_register)
			ereport(WARNING,
					(errmsg("athena_deferred: could not start a worker for database %u", dbid),
					 errhint("Increase max_worker_processes; the launcher keeps trying.")));
		launched[i].failed_to_register = true;
	}
}

/*
 * Recover the queue: read the WAL, have a worker in each database found
 * there report its progress, then restore what may be pending.
 */
static void
launcher_recover(void)
{
	DeferredShared *q = deferred_shared;
	List	   *dbids;
	ListCell   *lc;

	recovery_scan();
	dbids = recovery_databases();

	foreach(lc, dbids)
	{
		Oid			dbid = lfirst_oid(lc);
		DeferredDatabase *db = NULL;

		if (database_exists(dbid))
		{
			LWLockAcquire(q->lock, LW_EXCLUSIVE);
			db = queue_database_slot(dbid, true);
			LWLockRelease(q->lock);
		}
		if (db == NULL)
			ereport(LOG,
					(errmsg("athena_deferred: entries of database %u in the WAL will be discarded", dbid),
					 errdetail("The database no longer exists, or more than %d databases have entries.",
							   DEFERRED_MAX_DATABASES)));
	}

	/* wait until every database with entries has reported, or is gone */
	for (;;)
	{
		bool		waiting = false;

		CHECK_FOR_INTERRUPTS();
		if (ShutdownRequestPending)
			proc_exit(1);

		for (int i = 0; i < DEFERRED_MAX_DATABASES; i++)
		{
			DeferredDatabase *db = &q->databases[i];
			Oid			dbid;
			bool		reported;

			LWLockAcquire(q->lock, LW_SHARED);
			dbid = db->dbid;
			reported = db->progress_reported;
			LWLockRelease(q->lock);
			if (dbid == InvalidOid || reported)
				continue;
			if (launched_running(i))
				waiting = true;
			else if (database_exists(dbid))
			{
				launch(i, dbid);
				waiting = true;
			}
			else
			{
				/* dropped meanwhile: its entries are not restored */
				LWLockAcquire(q->lock, LW_EXCLUSIVE);
				db->dbid = InvalidOid;
				LWLockRelease(q->lock);
			}
		}
		if (!waiting)
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 100L, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}

	recovery_restore();

	/* the workers that reported have left: start the next ones at once */
	for (int i = 0; i < DEFERRED_MAX_DATABASES; i++)
		launched[i].started_at = 0;
}

/*
 * Start workers for databases with pending entries and none running;
 * discard the entries of databases that are gone; free idle slots.
 */
static void
launcher_tend_databases(void)
{
	DeferredShared *q = deferred_shared;

	for (int i = 0; i < DEFERRED_MAX_DATABASES; i++)
	{
		DeferredDatabase *db = &q->databases[i];
		Oid			dbid;
		bool		has_worker;
		int64		pending;
		bool		running = launched_running(i);

		LWLockAcquire(q->lock, LW_SHARED);
		dbid = db->dbid;
		has_worker = (db->worker_latch != NULL);
		pending = (int64) pg_atomic_read_u64(&db->pending);
		LWLockRelease(q->lock);

		if (dbid == InvalidOid || has_worker || running)
			continue;
		if (pending > 0)
		{
			if (database_exists(dbid))
				launch(i, dbid);
			else
			{
				int64		n;

				deferred_fault("before_discard");
				n = queue_discard_database(dbid);

				ereport(LOG,
						(errmsg("athena_deferred: discarded " INT64_FORMAT " pending entries of database %u, which was dropped",
								n, dbid)));
			}
			continue;
		}

		/* nothing pending, no worker: free the slot unless a caller uses it */
		LWLockAcquire(q->lock, LW_EXCLUSIVE);
		if (db->dbid == dbid && db->worker_latch == NULL && pg_atomic_read_u64(&db->pending) == 0 &&
			db->bytes == 0 &&
			(db->waiting_since == 0 ||
			 TimestampDifferenceMilliseconds(db->waiting_since, GetCurrentTimestamp()) > 1000))
			db->dbid = InvalidOid;
		LWLockRelease(q->lock);
	}
}

void
deferred_launcher_main(Datum main_arg pg_attribute_unused())
{
	DeferredShared *q = deferred_shared;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	/* shared catalogs only: pg_database, to tell dropped databases */
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);

	LWLockAcquire(q->lock, LW_EXCLUSIVE);
	q->launcher_latch = MyLatch;
	LWLockRelease(q->lock);
	on_shmem_exit(launcher_detach, 0);

	ereport(LOG, (errmsg("athena_deferred launcher started")));

	if (!q->recovered)
		launcher_recover();

	while (!ShutdownRequestPending)
	{
		long		timeout = 1000;
		long		sync_in;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		launcher_tend_databases();

		if (wal_sync_due_in() == 0)
			wal_flush_written();
		wal_prepare_segments();
		wal_remove_settled(q->settled_qseq);

		/* with wal_sync = batch, wake up for the background fsync too */
		sync_in = wal_sync_due_in();
		if (sync_in >= 0 && sync_in < timeout)
			timeout = sync_in;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}

	ereport(LOG, (errmsg("athena_deferred launcher shutting down")));
	/* exit code 1: a terminated launcher is restarted; at shutdown it is not */
	proc_exit(1);
}
