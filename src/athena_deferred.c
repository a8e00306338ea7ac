/*-------------------------------------------------------------------------
 *
 * athena_deferred.c
 *		Start-up: settings, shared memory, the launcher.
 *
 * The library must be loaded through shared_preload_libraries, since its
 * queue lives in shared memory allocated at server start.  No SQL work is
 * done here.  The settings' levels: what changes the worker's behaviour or
 * the WAL is superuser-only (SIGHUP or restart); a caller may choose
 * enabled and enqueue_timeout_ms for its own session.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/indexing.h"
#include "catalog/objectaccess.h"
#include "catalog/pg_extension.h"
#include "commands/extension.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "storage/ipc.h"
#include "storage/shmem.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/rel.h"

#include "athena_deferred.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

static object_access_hook_type prev_object_access_hook = NULL;

/* Settings: see the README for what each one does */
bool		deferred_enabled = true;
int			deferred_batch_window_ms = 1000;
int			deferred_batch_max_size = 100;
int			deferred_max_flush_attempts = 10;
int			deferred_queue_size_kb = 16 * 1024;
int			deferred_enqueue_timeout_ms = 5000;
char	   *deferred_notify_channel = NULL;
bool		deferred_skip_cache_invalidation = false;
char	   *deferred_database = NULL;
bool		deferred_wal_enabled = true;
char	   *deferred_wal_dir = NULL;
int			deferred_wal_sync = WAL_SYNC_ALWAYS;
int			deferred_wal_segment_size_kb = 16 * 1024;
char	   *deferred_fault_point = NULL;
int			deferred_invalidation_ring_size = 1024;
int			deferred_lock_timeout_ms = 5000;
int			deferred_statement_timeout_ms = 60000;

static const struct config_enum_entry wal_sync_options[] = {
	{"always", WAL_SYNC_ALWAYS, false},
	{"batch", WAL_SYNC_BATCH, false},
	{"off", WAL_SYNC_OFF, false},
	{NULL, 0, false}
};

DeferredShared *deferred_shared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

extern void enqueue_init(void);

/* Ask for the queue's shared memory and its lock */
static void
deferred_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(queue_shmem_size());
	RequestAddinShmemSpace(notify_shmem_size());
	RequestNamedLWLockTranche(ATHENA_EXTENSION_NAME, 3);
}

/* Attach to (or create) the queue in shared memory */
static void
deferred_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	deferred_shared = ShmemInitStruct(ATHENA_EXTENSION_NAME, queue_shmem_size(), &found);
	if (!found)
	{
		LWLockPadded *locks = GetNamedLWLockTranche(ATHENA_EXTENSION_NAME);

		queue_shmem_init(deferred_shared, found);
		deferred_shared->lock = &locks[0].lock;
		deferred_shared->wal_lock = &locks[1].lock;
		deferred_shared->wal_flush_lock = &locks[2].lock;
	}
	notify_shmem_init();
	LWLockRelease(AddinShmemInitLock);
}

/* A NOTIFY channel PostgreSQL accepts: a failing NOTIFY would fail every flush */
static bool
check_notify_channel(char **newval, void **extra pg_attribute_unused(), GucSource source pg_attribute_unused())
{
	if (*newval == NULL || (*newval)[0] == '\0' || strlen(*newval) >= NAMEDATALEN)
	{
		GUC_check_errdetail("The channel name must be between 1 and %d bytes long.", NAMEDATALEN - 1);
		return false;
	}
	return true;
}

static void
deferred_define_settings(void)
{
	DefineCustomBoolVariable("athena_deferred.enabled",
							 "Queues mutations for the background worker; when off, applies them at once.",
							 NULL,
							 &deferred_enabled, true,
							 PGC_USERSET, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("athena_deferred.batch_window_ms",
							"Interval between timed flushes; 0 disables the timer.",
							NULL,
							&deferred_batch_window_ms, 1000, 0, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomIntVariable("athena_deferred.batch_max_size",
							"Pending entries that wake the worker before its timer; 0 disables.",
							NULL,
							&deferred_batch_max_size, 100, 0, INT_MAX,
							PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("athena_deferred.max_flush_attempts",
							"Failed flush attempts after which an entry is dead-lettered.",
							NULL,
							&deferred_max_flush_attempts, 10, 1, 1000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("athena_deferred.queue_size",
							"Shared memory for the queue of pending entries.",
							NULL,
							&deferred_queue_size_kb, 16 * 1024, 64, INT_MAX / 2,
							PGC_POSTMASTER, GUC_UNIT_KB, NULL, NULL, NULL);

	DefineCustomIntVariable("athena_deferred.enqueue_timeout_ms",
							"How long a call waits for room in a full queue before failing.",
							NULL,
							&deferred_enqueue_timeout_ms, 5000, 0, INT_MAX,
							PGC_USERSET, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomStringVariable("athena_deferred.notify_channel",
							   "Channel of the NOTIFY sent for each table after a flush.",
							   NULL,
							   &deferred_notify_channel, ATHENA_EXTENSION_NAME,
							   PGC_SIGHUP, 0, check_notify_channel, NULL, NULL);

	DefineCustomBoolVariable("athena_deferred.skip_cache_invalidation",
							 "Suppresses the NOTIFY after flushes and immediate mutations.",
							 NULL,
							 &deferred_skip_cache_invalidation, false,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomStringVariable("athena_deferred.database",
							   "If set, mutations can be queued only in this database.",
							   "Empty (the default): in every database where the extension is installed.",
							   &deferred_database, "",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);

	DefineCustomBoolVariable("athena_deferred.wal_enabled",
							 "Writes every entry to the extension's WAL before its commit returns.",
							 "Off: entries pending at a crash or restart are lost.",
							 &deferred_wal_enabled, true,
							 PGC_POSTMASTER, 0, NULL, NULL, NULL);

	DefineCustomStringVariable("athena_deferred.wal_dir",
							   "Directory of the extension's WAL segments, relative to the data directory.",
							   NULL,
							   &deferred_wal_dir, "pg_athena_deferred",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);

	DefineCustomEnumVariable("athena_deferred.wal_sync",
							 "When the WAL is fsynced: always (before each commit returns, shared by concurrent commits), batch (every batch_window_ms) or off.",
							 NULL,
							 &deferred_wal_sync, WAL_SYNC_ALWAYS, wal_sync_options,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("athena_deferred.wal_segment_size",
							"Size of each pre-allocated WAL segment file.",
							NULL,
							&deferred_wal_segment_size_kb, 16 * 1024, 64, 1024 * 1024,
							PGC_POSTMASTER, GUC_UNIT_KB, NULL, NULL, NULL);

	DefineCustomIntVariable("athena_deferred.invalidation_ring_size",
							"Table invalidations kept for deferred_invalidations().",
							NULL,
							&deferred_invalidation_ring_size, 1024, 16, 1024 * 1024,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("athena_deferred.lock_timeout_ms",
							"lock_timeout of the worker's statements: an entry waiting longer fails and is retried.",
							NULL,
							&deferred_lock_timeout_ms, 5000, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomIntVariable("athena_deferred.statement_timeout_ms",
							"statement_timeout of the worker's statements: an entry running longer fails and is retried.",
							NULL,
							&deferred_statement_timeout_ms, 60000, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomStringVariable("athena_deferred.fault_point",
							   "Testing only: the named point where the worker or a backend kills itself, or the WAL write or fsync that fails (wal_write, wal_fsync).",
							   NULL,
							   &deferred_fault_point, "",
							   PGC_SUSET, GUC_NOT_IN_SAMPLE, NULL, NULL, NULL);

	MarkGUCPrefixReserved(ATHENA_EXTENSION_NAME);
}

/*
 * DROP EXTENSION (directly, or through DROP SCHEMA ... CASCADE) while this
 * database has entries in the queue would leave acknowledged mutations
 * with nothing to apply them: refuse it.  Otherwise log that the
 * database's entries so far are settled (a call racing with the drop gets
 * a later number and is kept).
 */
static void
deferred_object_access(ObjectAccessType access, Oid classId, Oid objectId,
					   int subId, void *arg)
{
	if (prev_object_access_hook)
		prev_object_access_hook(access, classId, objectId, subId, arg);

	if (access == OAT_DROP && classId == ExtensionRelationId && deferred_shared != NULL)
	{
		char	   *name = get_extension_name(objectId);
		int64		pending;
		uint64		upto;

		if (name == NULL || strcmp(name, ATHENA_EXTENSION_NAME) != 0)
			return;
		pending = queue_database_pending(&upto);
		if (pending > 0)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_IN_USE),
					 errmsg("cannot drop extension athena_deferred while entries of this database are queued"),
					 errdetail("Pending entries: " INT64_FORMAT ". Dropping the extension would leave acknowledged mutations unapplied.",
							   pending),
					 errhint("Apply them first with SELECT deferred_flush(); entries that keep failing end in deferred_dead_letters.")));
		wal_append_database_settled(MyDatabaseId, upto);
	}
}

/* Module load: refuse anything but shared_preload_libraries */
void
_PG_init(void)
{
	if (!process_shared_preload_libraries_in_progress)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("athena_deferred must be loaded via shared_preload_libraries"),
				 errhint("Add athena_deferred to shared_preload_libraries in postgresql.conf and restart the server.")));

	deferred_define_settings();

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = deferred_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = deferred_shmem_startup;

	prev_object_access_hook = object_access_hook;
	object_access_hook = deferred_object_access;

	enqueue_init();
	deferred_register_launcher();
}

/* Name of an operation, as in payloads, dead letters and notifications */
const char *
deferred_op_name(DeferredOp op)
{
	switch (op)
	{
		case DEFERRED_INSERT:
			return "insert";
		case DEFERRED_UPDATE:
			return "update";
		case DEFERRED_DELETE:
			return "delete";
	}
	return "unknown";
}

/*
 * Schema of the extension in the current database, or InvalidOid if it is
 * not installed here.  (PostgreSQL 15 does not export a lookup for this.)
 */
Oid
deferred_extension_schema(void)
{
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;
	Oid			nspid = InvalidOid;

	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_extname, BTEqualStrategyNumber, F_NAMEEQ,
				CStringGetDatum(ATHENA_EXTENSION_NAME));
	scan = systable_beginscan(rel, ExtensionNameIndexId, true, NULL, 1, &key);
	tuple = systable_getnext(scan);
	if (HeapTupleIsValid(tuple))
		nspid = ((Form_pg_extension) GETSTRUCT(tuple))->extnamespace;
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return nspid;
}

/*
 * Fault injection for the crash tests: when athena_deferred.fault_point
 * names this point, the process kills itself with SIGKILL, as a crash
 * would (the postmaster then reinitializes shared memory).  Each point
 * fires once: a marker file in the WAL directory remembers that it did, so
 * the restarted server does not crash again at the same place.
 */
void
deferred_fault(const char *point)
{
	char	   *marker;
	int			fd;

	if (deferred_fault_point == NULL || strcmp(deferred_fault_point, point) != 0)
		return;
	(void) MakePGDirectory(deferred_wal_dir);
	marker = psprintf("%s/fault.%s", deferred_wal_dir, point);
	fd = open(marker, O_CREAT | O_EXCL | O_WRONLY, S_IRUSR | S_IWUSR);
	if (fd < 0)
		return;
	close(fd);
	ereport(LOG, (errmsg("athena_deferred: fault point \"%s\" reached, killing process", point)));
	kill(MyProcPid, SIGKILL);
}
