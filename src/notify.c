/*-------------------------------------------------------------------------
 *
 * notify.c
 *		The cache-invalidation NOTIFY: one per table touched by a flush.
 *
 * A tally collects, during a flush (or an immediate call), what was done to
 * each table; notify_tally_send() queues one NOTIFY per table in the
 * current transaction, so listeners hear it only once the rows are
 * visible.  The payload is a JSON object written with jansson:
 *
 *	{"schema": "public", "table": "items", "entries": 3,
 *	 "inserted": 5, "updated": 1, "deleted": 0}
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <jansson.h>

#include "commands/async.h"
#include "nodes/pg_list.h"
#include "utils/lsyscache.h"

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

/* A new, empty tally in the current memory context */
NotifyTally *
notify_tally_create(void)
{
	return palloc0(sizeof(NotifyTally));
}

/* Count one applied entry and the rows it touched */
void
notify_tally_add(NotifyTally *tally, Oid relid, DeferredOp op, int64 rows)
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
	t->entries++;
	t->rows[op] += rows;
}

/* Queue one NOTIFY per table in the tally, unless invalidation is skipped */
void
notify_tally_send(NotifyTally *tally)
{
	ListCell   *lc;

	if (deferred_skip_cache_invalidation)
		return;

	foreach(lc, tally->tables)
	{
		TableTally *t = lfirst(lc);
		char	   *relname = get_rel_name(t->relid);
		json_t	   *obj;
		char	   *payload;

		if (relname == NULL)
			continue;			/* dropped within this transaction */

		obj = json_pack("{s:s, s:s, s:I, s:I, s:I, s:I}",
						"schema", get_namespace_name(get_rel_namespace(t->relid)),
						"table", relname,
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
					(errmsg("athena_deferred: could not build the notification for table \"%s\"", relname),
					 errdetail("The table name is not valid UTF-8.")));
			continue;
		}

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
}
