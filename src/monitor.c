/*-------------------------------------------------------------------------
 *
 * monitor.c
 *		What operators and applications can ask: deferred_stats(),
 *		deferred_pending(), deferred_invalidations() and deferred_wait().
 *
 * These only read shared memory (and, for deferred_pending(), copies of
 * pending entries); they never change the queue.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_authid.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "athena_deferred.h"

PG_FUNCTION_INFO_V1(deferred_stats);
PG_FUNCTION_INFO_V1(deferred_pending);
PG_FUNCTION_INFO_V1(deferred_invalidations);
PG_FUNCTION_INFO_V1(deferred_wait);

/* Number of deferred_stats() columns (fewer in version 0.1.0's signature) */
#define STATS_COLUMNS 22

static void
check_loaded(void)
{
	if (deferred_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("athena_deferred must be loaded via shared_preload_libraries"),
				 errhint("Add athena_deferred to shared_preload_libraries in postgresql.conf and restart the server.")));
}

/* Upper bound, in ms, of the flush duration below which a share of flushes fall */
static double
histogram_percentile(const int64 *hist, double share)
{
	int64		total = 0;
	int64		seen = 0;

	for (int k = 0; k < FLUSH_HISTOGRAM; k++)
		total += hist[k];
	if (total == 0)
		return 0;
	for (int k = 0; k < FLUSH_HISTOGRAM; k++)
	{
		seen += hist[k];
		if (seen >= share * total)
			return (double) (INT64CONST(1) << k);
	}
	return (double) (INT64CONST(1) << (FLUSH_HISTOGRAM - 1));
}

/* deferred_stats(): the queue's counters, one row */
Datum
deferred_stats(PG_FUNCTION_ARGS)
{
	DeferredShared *q = deferred_shared;
	TupleDesc	tupdesc;
	Datum		values[STATS_COLUMNS];
	bool		nulls[STATS_COLUMNS] = {0};
	TimestampTz oldest;
	int64		hist[FLUSH_HISTOGRAM];
	int64		notifications;
	int64		latest_flush;

	check_loaded();
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	oldest = queue_oldest_pending();

	LWLockAcquire(q->lock, LW_SHARED);
	values[0] = Int64GetDatum((int64) pg_atomic_read_u64(&q->enqueued));
	values[1] = Int64GetDatum(q->applied);
	values[2] = Int64GetDatum(q->failed_attempts);
	values[3] = Int64GetDatum(q->dead_lettered);
	values[4] = Int64GetDatum((int64) pg_atomic_read_u64(&q->pending));
	values[5] = Int64GetDatum((int64) (q->reserve_pos - q->head_pos));
	values[6] = Int64GetDatum((int64) q->capacity);
	values[7] = Int64GetDatum(q->flushes);
	values[8] = TimestampTzGetDatum(q->last_flush_at);
	nulls[8] = (q->last_flush_at == 0);
	values[9] = Int64GetDatum(q->recovered_entries);
	values[10] = Int64GetDatum(q->torn_records);
	values[11] = Int64GetDatum(q->corrupt_records);
	values[12] = Int64GetDatum(q->wal_bytes);
	values[13] = Int64GetDatum(q->wal_segments);
	values[14] = Float8GetDatum(oldest ? (GetCurrentTimestamp() - oldest) / 1000000.0 : 0);
	values[15] = Float8GetDatum(q->last_flush_us / 1000.0);
	values[16] = Int64GetDatum(q->last_flush_entries);
	memcpy(hist, q->flush_histogram, sizeof(hist));
	LWLockRelease(q->lock);
	values[17] = Float8GetDatum(histogram_percentile(hist, 0.5));
	values[18] = Float8GetDatum(histogram_percentile(hist, 0.99));
	notify_counters(&notifications, &latest_flush);
	values[19] = Int64GetDatum(notifications);
	values[20] = Int64GetDatum(latest_flush);
	LWLockAcquire(q->lock, LW_SHARED);
	values[21] = Int64GetDatum(q->discarded);
	LWLockRelease(q->lock);

	/* older versions of the SQL declare only the first 14 or 21 columns */
	if (tupdesc->natts > STATS_COLUMNS)
		elog(ERROR, "deferred_stats() declares more columns than the library provides");
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* May the current user see entries queued by roleid? */
static bool
may_see(Oid roleid)
{
	return has_privs_of_role(GetUserId(), roleid) ||
		has_privs_of_role(GetUserId(), ROLE_PG_READ_ALL_STATS);
}

/*
 * deferred_pending(): the entries waiting in the queue, oldest first.
 * Ordinary users see only entries of roles whose privileges they have.
 */
Datum
deferred_pending(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	DeferredEntry **entries;
	uint64	   *positions;
	int			n;

	check_loaded();
	InitMaterializedSRF(fcinfo, 0);
	n = queue_collect(&entries, &positions, INT_MAX);

	for (int i = 0; i < n; i++)
	{
		DeferredEntry *e = entries[i];
		Datum		values[8];
		bool		nulls[8] = {0};
		char	   *role;
		ErrorSlot  *err = &deferred_shared->errors[e->qseq % ERROR_SLOTS];
		char		message[ERROR_MESSAGE_LEN] = "";

		if (e->dbid != MyDatabaseId || !may_see(e->roleid))
			continue;
		role = GetUserNameFromId(e->roleid, true);

		LWLockAcquire(deferred_shared->lock, LW_SHARED);
		if (err->qseq == e->qseq)
			strlcpy(message, err->message, sizeof(message));
		LWLockRelease(deferred_shared->lock);

		values[0] = Int64GetDatum(e->id);
		values[1] = ObjectIdGetDatum(e->relid);
		values[2] = CStringGetTextDatum(deferred_op_name(e->op));
		values[3] = DirectFunctionCall1(jsonb_in, CStringGetDatum(entry_payload_json(e)));
		values[4] = role ? CStringGetTextDatum(role) : (Datum) 0;
		nulls[4] = (role == NULL);
		values[5] = TimestampTzGetDatum(e->enqueued_at);
		values[6] = Int32GetDatum((int32) e->attempts);
		values[7] = CStringGetTextDatum(message);
		nulls[7] = (e->attempts == 0 || message[0] == '\0');
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/*
 * deferred_invalidations(since bigint): the flushes after since, and the
 * tables each touched.  If flushes after since are no longer listed (the
 * ring overflowed, or the server restarted), the caller cannot know what it
 * missed and must drop its whole cache: that is an error, SQLSTATE AD100.
 */
Datum
deferred_invalidations(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	InvalidationSlot *slots;
	int64		since;
	int64		oldest;
	int64		last;
	int			n;

	check_loaded();
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("argument \"since\" must not be null")));
	since = PG_GETARG_INT64(0);

	InitMaterializedSRF(fcinfo, 0);
	slots = palloc(sizeof(InvalidationSlot) * deferred_invalidation_ring_size);
	n = notify_invalidations_since(since, slots, &oldest, &last);
	if (n < 0)
		ereport(ERROR,
				(errcode(MAKE_SQLSTATE('A', 'D', '1', '0', '0')),
				 errmsg("invalidations since flush " INT64_FORMAT " are no longer known", since),
				 errdetail("Flushes after " INT64_FORMAT " are listed; the latest is " INT64_FORMAT ".",
						   oldest, last),
				 errhint("Drop the whole cache, then resume from flush " INT64_FORMAT ".", last)));

	for (int i = 0; i < n; i++)
	{
		Datum		values[4];
		bool		nulls[4] = {0};

		values[0] = Int64GetDatum(slots[i].flush);
		values[1] = CStringGetTextDatum(NameStr(slots[i].schema));
		values[2] = CStringGetTextDatum(NameStr(slots[i].table));
		values[3] = TimestampTzGetDatum(slots[i].flushed_at);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/*
 * deferred_wait(id bigint, timeout_ms integer): wait until the entry is
 * settled and say how: 'applied' or 'dead_letter'.
 */
Datum
deferred_wait(PG_FUNCTION_ARGS)
{
	int64		id;
	int			timeout_ms = PG_ARGISNULL(1) ? 30000 : PG_GETARG_INT32(1);
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), timeout_ms);

	check_loaded();
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("argument \"id\" must not be null")));
	id = PG_GETARG_INT64(0);

	if (enqueue_staged(id))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("entry " INT64_FORMAT " was queued by the current transaction", id),
				 errdetail("It cannot be applied before this transaction commits."),
				 errhint("Call deferred_wait() after COMMIT.")));

	for (;;)
	{
		bool		too_old;
		long		remaining;

		switch (queue_outcome(id, &too_old))
		{
			case OUTCOME_APPLIED:
				ConditionVariableCancelSleep();
				PG_RETURN_TEXT_P(cstring_to_text("applied"));
			case OUTCOME_DEAD_LETTER:
				ConditionVariableCancelSleep();
				PG_RETURN_TEXT_P(cstring_to_text("dead_letter"));
			case OUTCOME_ROLLED_BACK:
				ereport(ERROR,
						(errcode(ERRCODE_NO_DATA_FOUND),
						 errmsg("entry " INT64_FORMAT " was rolled back", id),
						 errdetail("Its transaction aborted, so it will never be applied.")));
				break;
			case OUTCOME_UNKNOWN:
				if (too_old)
					ereport(ERROR,
							(errcode(ERRCODE_NO_DATA_FOUND),
							 errmsg("entry " INT64_FORMAT " is older than the outcomes athena_deferred remembers", id),
							 errhint("It was settled or rolled back long ago; deferred_dead_letters lists it if it failed.")));
				/* not committed yet, or not at all: wait and see */
				break;
			case OUTCOME_PENDING:
				break;
		}

		remaining = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);
		if (remaining <= 0)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("entry " INT64_FORMAT " was not settled within %d ms", id, timeout_ms),
					 errhint("Check that the athena_deferred worker is running; deferred_pending() shows the entry if it is queued.")));
		(void) queue_request_flush();
		ConditionVariableTimedSleep(&deferred_shared->settled_cv, Min(remaining, 1000),
									PG_WAIT_EXTENSION);
	}
}
