/*-------------------------------------------------------------------------
 *
 * notify.c
 *		The cache-invalidation NOTIFY: one per table touched by a flush.
 *
 * A tally collects, during a flush (or an immediate call), what was done to
 * each table; notify_tally_send() gives the flush its number and queues one
 * NOTIFY per table in the current transaction, so listeners hear it only
 * once the rows are visible; its tables enter the invalidation ring when the
 * transaction commits.  The payload is a JSON object written with jansson:
 *
 *	{"flush": 1764080000000123, "schema": "public", "table": "items",
 *	 "entries": 3, "inserted": 5, "updated": 1, "deleted": 0}
 *
 * The invalidation ring (deferred_invalidations()) closes LISTEN/NOTIFY's
 * gap: a listener that was disconnected asks which tables the flushes after
 * the last one it heard touched.  Flush numbers start above the time the
 * server started, in microseconds, so they grow across restarts, and a
 * listener's number from before a restart is recognizably too old.  The
 * ring is guarded by DeferredShared->lock.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <jansson.h>

#include "commands/async.h"
#include "miscadmin.h"
#include "nodes/pg_list.h"
#include "storage/shmem.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "athena_deferred.h"

typedef struct TableTally
{
	Oid			relid;
	int64		entries;
	int64		rows[4];		/* indexed by DeferredOp */
} TableTally;

struct NotifyTally
{
	List	   *tables;			/* of TableTally, in order of first touch */
};

typedef struct NotifyShared
{
	int64		last_flush;		/* number of the latest flush */
	int64		forgotten_upto; /* flushes up to this one are not listed */
	uint64		written;		/* slots ever written */
	int64		notifications;	/* NOTIFYs queued */
	InvalidationSlot slots[FLEXIBLE_ARRAY_MEMBER];
} NotifyShared;

static NotifyShared *notify_shared = NULL;

/* Shared memory for the invalidation ring */
Size
notify_shmem_size(void)
{
	return add_size(offsetof(NotifyShared, slots),
					mul_size(deferred_invalidation_ring_size, sizeof(InvalidationSlot)));
}

/* Attach to (or create) the invalidation ring; caller holds AddinShmemInitLock */
void
notify_shmem_init(void)
{
	bool		found;

	notify_shared = ShmemInitStruct("athena_deferred invalidations", notify_shmem_size(), &found);
	if (!found)
	{
		memset(notify_shared, 0, offsetof(NotifyShared, slots));
		notify_shared->last_flush = GetCurrentTimestamp();
		notify_shared->forgotten_upto = notify_shared->last_flush;
	}
}

/*
 * Invalidations of the current transaction's flush, listed in the ring only
 * when it commits (notify_at_commit): a listener catching up must not learn
 * of a flush whose rows it cannot see yet.
 */
static InvalidationSlot *pending_slots = NULL;
static int	pending_nslots = 0;

/* Give the flush its number and keep its tables for the commit */
static int64
number_flush(NotifyTally *tally, char **schemas, char **tables)
{
	int			n = list_length(tally->tables);
	TimestampTz now = GetCurrentTimestamp();
	int64		flush;

	LWLockAcquire(deferred_shared->lock, LW_EXCLUSIVE);
	flush = ++notify_shared->last_flush;
	notify_shared->notifications += n;
	LWLockRelease(deferred_shared->lock);

	/* several immediate calls in one transaction add up */
	if (pending_slots == NULL)
		pending_slots = MemoryContextAllocZero(TopTransactionContext, sizeof(InvalidationSlot) * n);
	else
		pending_slots = repalloc(pending_slots, sizeof(InvalidationSlot) * (pending_nslots + n));
	for (int i = 0; i < n; i++)
	{
		InvalidationSlot *slot = &pending_slots[pending_nslots];

		if (tables[i] == NULL)
			continue;
		slot->dbid = MyDatabaseId;
		slot->flush = flush;
		slot->flushed_at = now;
		strlcpy(NameStr(slot->schema), schemas[i], NAMEDATALEN);
		strlcpy(NameStr(slot->table), tables[i], NAMEDATALEN);
		pending_nslots++;
	}
	return flush;
}

/* At commit: list the committed flush's tables in the ring */
void
notify_at_commit(void)
{
	NotifyShared *ns = notify_shared;

	if (pending_nslots == 0)
		return;
	LWLockAcquire(deferred_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < pending_nslots; i++)
	{
		InvalidationSlot *slot = &ns->slots[ns->written % deferred_invalidation_ring_size];

		if (ns->written >= (uint64) deferred_invalidation_ring_size)
			ns->forgotten_upto = Max(ns->forgotten_upto, slot->flush);
		*slot = pending_slots[i];
		ns->written++;
	}
	LWLockRelease(deferred_shared->lock);
	notify_at_abort();
}

/* At abort (and after commit): forget the transaction's invalidations */
void
notify_at_abort(void)
{
	pending_slots = NULL;
	pending_nslots = 0;
}

/* A new, empty tally in the current memory context */
NotifyTally *
notify_tally_create(void)
{
	return palloc0(sizeof(NotifyTally));
}

/* Count applied entries and the rows they touched */
void
notify_tally_add(NotifyTally *tally, Oid relid, DeferredOp op, int64 entries, int64 rows)
{
	TableTally *t = NULL;
	ListCell   *lc;

	foreach(lc, tally->tables)
	{
		if (((TableTally *) lfirst(lc))->relid == relid)
		{
			t = lfirst(lc);
			break;
		}
	}
	if (t == NULL)
	{
		t = palloc0(sizeof(TableTally));
		t->relid = relid;
		tally->tables = lappend(tally->tables, t);
	}
	t->entries += entries;
	t->rows[op] += rows;
}

/* Queue one NOTIFY and free its payload (jansson's malloc) */
static void
send_payload(char *payload)
{
	PG_TRY();
	{
		Async_Notify(deferred_notify_channel, payload);
	}
	PG_FINALLY();
	{
		free(payload);
	}
	PG_END_TRY();
}

/*
 * Number the flush, list its tables in the invalidation ring, and queue one
 * NOTIFY per table (unless invalidation is skipped).
 */
void
notify_tally_send(NotifyTally *tally)
{
	int			n = list_length(tally->tables);
	char	  **schemas;
	char	  **tables;
	int64		flush;
	int			i = 0;
	ListCell   *lc;

	if (deferred_skip_cache_invalidation || n == 0)
		return;

	/* names of tables dropped within this transaction stay NULL */
	schemas = palloc0(sizeof(char *) * n);
	tables = palloc0(sizeof(char *) * n);
	foreach(lc, tally->tables)
	{
		Oid			relid = ((TableTally *) lfirst(lc))->relid;

		tables[i] = get_rel_name(relid);
		if (tables[i] != NULL)
			schemas[i] = get_namespace_name(get_rel_namespace(relid));
		i++;
	}

	flush = number_flush(tally, schemas, tables);

	i = 0;
	foreach(lc, tally->tables)
	{
		TableTally *t = lfirst(lc);
		json_t	   *obj;
		char	   *payload;

		if (tables[i] == NULL)
		{
			i++;
			continue;
		}
		obj = json_pack("{s:I, s:s, s:s, s:I, s:I, s:I, s:I}",
						"flush", (json_int_t) flush,
						"schema", schemas[i],
						"table", tables[i],
						"entries", (json_int_t) t->entries,
						"inserted", (json_int_t) t->rows[DEFERRED_INSERT],
						"updated", (json_int_t) t->rows[DEFERRED_UPDATE],
						"deleted", (json_int_t) t->rows[DEFERRED_DELETE]);
		payload = obj ? json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
		json_decref(obj);

		/* jansson refuses names that are not UTF-8; the flush must not fail */
		if (payload == NULL)
		{
			ereport(WARNING,
					(errmsg("athena_deferred: could not build the notification for table \"%s\"", tables[i]),
					 errdetail("The table name is not valid UTF-8.")));
			i++;
			continue;
		}

		send_payload(payload);
		i++;
	}
}

/*
 * For deferred_stats(): notifications queued so far, and the number of the
 * latest flush (where a new listener starts)
 */
void
notify_counters(int64 *notifications, int64 *latest_flush)
{
	LWLockAcquire(deferred_shared->lock, LW_SHARED);
	*notifications = notify_shared->notifications;
	*latest_flush = notify_shared->last_flush;
	LWLockRelease(deferred_shared->lock);
}

/*
 * Copy the listed invalidations of flushes after since into out (room for
 * invalidation_ring_size slots); returns how many, or -1 if some flush
 * after since is no longer listed.  *oldest and *last get the range known.
 */
int
notify_invalidations_since(int64 since, InvalidationSlot *out, int64 *oldest, int64 *last)
{
	NotifyShared *ns = notify_shared;
	int			count = 0;

	LWLockAcquire(deferred_shared->lock, LW_SHARED);
	*oldest = ns->forgotten_upto;
	*last = ns->last_flush;
	if (since < ns->forgotten_upto || since > ns->last_flush)
		count = -1;
	else
	{
		uint64		size = deferred_invalidation_ring_size;

		for (uint64 i = ns->written > size ? ns->written - size : 0; i < ns->written; i++)
		{
			InvalidationSlot *slot = &ns->slots[i % size];

			if (slot->flush > since && slot->dbid == MyDatabaseId)
				out[count++] = *slot;
		}
	}
	LWLockRelease(deferred_shared->lock);
	return count;
}
