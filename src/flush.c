/*-------------------------------------------------------------------------
 *
 * flush.c
 *		Apply published entries through SPI, as the role that queued each.
 *
 * One flush is one transaction.  Consecutive inserts into one table by one
 * role with the same columns form a batch, applied by one statement; other
 * entries go one by one.  Each batch runs in a subtransaction under its
 * queuing role (SECURITY_LOCAL_USERID_CHANGE), so privileges, row-level
 * security and defaults such as current_user behave as if the caller had
 * run the statement; a batch that fails is split in halves down to the
 * entry at fault, so one bad entry does not undo the others.  A failed
 * entry stays in the queue for the next flush, ahead of newer entries,
 * until max_flush_attempts; then it moves to deferred_dead_letters.  The
 * same transaction records how far the queue has been applied
 * (deferred_progress), so that neither recovery after a crash nor a worker
 * that dies between its commit and updating shared memory applies anything
 * twice.  Only after that commit (synchronous, see worker.c) may the worker
 * remove WAL segments holding the settled entries.
 *
 * Values travel as JSON parameters, never as SQL text; identifiers are
 * quoted.  This file never touches files.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/lmgr.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"

#include "athena_deferred.h"

/* Inserts applied by one statement at most */
#define FLUSH_BATCH_ENTRIES 10000

static MemoryContext flush_context = NULL;

/* applied_upto as this worker last recorded or read it */
uint64		flush_progress_upto = 0;

/* Append "col1, col2" or "p.col1, p.col2" for the part's columns */
static void
append_columns(StringInfo sql, const DeferredPart *part, const char *prefix)
{
	const char *name = part_names(part);

	for (int i = 0; i < part->ncols; i++)
	{
		name++;					/* null flag */
		appendStringInfo(sql, "%s%s%s", i > 0 ? ", " : "", prefix,
						 quote_identifier(name));
		name += strlen(name) + 1;
	}
}

/* Append the WHERE conditions of a match part: = for values, IS NULL for nulls */
static void
append_conditions(StringInfo sql, const DeferredPart *part)
{
	const char *name = part_names(part);

	appendStringInfoString(sql, " WHERE ");
	for (int i = 0; i < part->ncols; i++)
	{
		bool		isnull = (*name++ == 'n');
		const char *col = quote_identifier(name);

		if (i > 0)
			appendStringInfoString(sql, " AND ");
		if (isnull)
			appendStringInfo(sql, "__t.%s IS NULL", col);
		else
			appendStringInfo(sql, "__t.%s = __m.%s", col, col);
		name += strlen(name) + 1;
	}
}

static Datum
part_json(const DeferredPart *part)
{
	return PointerGetDatum(cstring_to_text_with_len(part_text(part), part->textlen));
}

/* Run one statement with JSON parameters and return the rows it touched */
static int64
run_statement(const char *sql, int nargs, Datum *args, int expected)
{
	Oid			types[2] = {JSONOID, JSONOID};
	int			rc;

	rc = SPI_execute_with_args(sql, nargs, types, args, NULL, false, 0);
	if (rc != expected)
		elog(ERROR, "athena_deferred: unexpected SPI result %d for \"%s\"", rc, sql);
	return (int64) SPI_processed;
}

/* Insert the rows of a JSON array, with the columns a part names */
static int64
run_insert(const char *relname, const DeferredPart *part, Datum json)
{
	StringInfoData sql;

	initStringInfo(&sql);
	appendStringInfo(&sql, "INSERT INTO %s (", relname);
	append_columns(&sql, part, "");
	appendStringInfoString(&sql, ") SELECT ");
	append_columns(&sql, part, "");
	appendStringInfo(&sql, " FROM pg_catalog.json_populate_recordset(NULL::%s, $1)", relname);
	return run_statement(sql.data, 1, &json, SPI_OK_INSERT);
}

/*
 * Apply one entry to relname (quoted, qualified) with the current user's
 * privileges.  The caller has SPI connected.  Used by the worker and by the
 * immediate path (athena_deferred.enabled = off).
 */
void
flush_apply_entry(const DeferredEntry *entry, const char *relname, int64 *rows)
{
	const DeferredPart *part = entry_first_part(entry);
	StringInfoData sql;
	Datum		args[2];

	initStringInfo(&sql);
	*rows = 0;

	switch ((DeferredOp) entry->op)
	{
		case DEFERRED_INSERT:
			/* one statement per run of rows with the same keys */
			for (int i = 0; i < entry->nparts; i++, part = part_next(part))
				*rows += run_insert(relname, part, part_json(part));
			break;

		case DEFERRED_UPDATE:
			{
				const DeferredPart *changes = part_next(part);
				const char *name = part_names(changes);

				appendStringInfo(&sql, "UPDATE %s AS __t SET ", relname);
				for (int i = 0; i < changes->ncols; i++)
				{
					const char *col;

					name++;
					col = quote_identifier(name);
					appendStringInfo(&sql, "%s%s = __s.%s", i > 0 ? ", " : "", col, col);
					name += strlen(name) + 1;
				}
				appendStringInfo(&sql,
								 " FROM pg_catalog.json_populate_record(NULL::%s, $1) AS __m,"
								 " pg_catalog.json_populate_record(NULL::%s, $2) AS __s",
								 relname, relname);
				append_conditions(&sql, part);
				args[0] = part_json(part);
				args[1] = part_json(changes);
				*rows = run_statement(sql.data, 2, args, SPI_OK_UPDATE);
			}
			break;

		case DEFERRED_DELETE:
			appendStringInfo(&sql,
							 "DELETE FROM %s AS __t USING pg_catalog.json_populate_record(NULL::%s, $1) AS __m",
							 relname, relname);
			append_conditions(&sql, part);
			args[0] = part_json(part);
			*rows = run_statement(sql.data, 1, args, SPI_OK_DELETE);
			break;
	}
}

/*
 * Lock the entry's target and return its quoted, qualified name.  The lock
 * pins the OID to the name, so the statement cannot reach another table
 * created under the same name meanwhile.
 */
static char *
target_name_locked(Oid relid)
{
	char	   *relname;
	char	   *nspname;

	LockRelationOid(relid, RowExclusiveLock);
	relname = get_rel_name(relid);
	nspname = relname ? get_namespace_name(get_rel_namespace(relid)) : NULL;
	if (relname == NULL || nspname == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation with OID %u no longer exists", relid)));
	return quote_qualified_identifier(nspname, relname);
}

/* Move an entry that ran out of attempts into deferred_dead_letters */
static void
dead_letter(const char *schema, const DeferredEntry *entry, ErrorData *edata)
{
	StringInfoData sql;
	Oid			types[9] = {INT8OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID,
	TIMESTAMPTZOID, INT4OID, TEXTOID, TEXTOID};
	Datum		values[9];
	char		nulls[9] = "         ";
	char	   *relname = get_rel_name(entry->relid);
	char	   *rolname = GetUserNameFromId(entry->roleid, true);

	values[0] = Int64GetDatum(entry->id);
	values[1] = CStringGetTextDatum(relname ?
									quote_qualified_identifier(get_namespace_name(get_rel_namespace(entry->relid)), relname) :
									psprintf("%u", entry->relid));
	values[2] = CStringGetTextDatum(deferred_op_name(entry->op));
	values[3] = CStringGetTextDatum(entry_payload_json(entry));
	values[4] = CStringGetTextDatum(rolname ? rolname : psprintf("%u", entry->roleid));
	values[5] = TimestampTzGetDatum(entry->enqueued_at);
	values[6] = Int32GetDatum(entry->attempts);
	values[7] = CStringGetTextDatum(edata->message ? edata->message : "unknown error");
	values[8] = CStringGetTextDatum(unpack_sql_state(edata->sqlerrcode));

	initStringInfo(&sql);
	appendStringInfo(&sql,
					 "INSERT INTO %s.deferred_dead_letters"
					 " (id, target, op, payload, role, enqueued_at, attempts, last_error, sqlstate)"
					 " VALUES ($1, $2, $3, $4::pg_catalog.jsonb, $5, $6, $7, $8, $9)",
					 quote_identifier(schema));
	if (SPI_execute_with_args(sql.data, 9, types, values, nulls, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not insert dead letter for entry " INT64_FORMAT, entry->id);

	ereport(LOG,
			(errmsg("athena_deferred: entry " INT64_FORMAT " (%s on %s) dead-lettered after %u attempts: %s",
					entry->id, deferred_op_name(entry->op),
					relname ? relname : "dropped table", entry->attempts,
					edata->message ? edata->message : "unknown error")));
}

/*
 * Run fn(arg) in a subtransaction.  Returns NULL if it succeeded, else its
 * error (in the caller's memory context), the subtransaction rolled back.
 */
static ErrorData *
run_in_subxact(void (*fn) (void *), void *arg)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	ErrorData  *volatile edata = NULL;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		fn(arg);
		ReleaseCurrentSubTransaction();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	CurrentResourceOwner = owner;
	return edata;
}

typedef struct DeadLetterArgs
{
	const char *schema;
	const DeferredEntry *entry;
	ErrorData  *cause;
} DeadLetterArgs;

static void
dead_letter_fn(void *arg)
{
	DeadLetterArgs *a = arg;

	dead_letter(a->schema, a->entry, a->cause);
}

/*
 * Dead-letter an entry in a subtransaction: if that fails (the flush must
 * not), the entry stays queued and the next flush tries again.
 */
static bool
dead_letter_in_subxact(const char *schema, const DeferredEntry *entry, ErrorData *cause)
{
	DeadLetterArgs args = {schema, entry, cause};
	ErrorData  *edata = run_in_subxact(dead_letter_fn, &args);

	if (edata != NULL)
		ereport(WARNING,
				(errmsg("athena_deferred: could not dead-letter entry " INT64_FORMAT ", it stays queued: %s",
						entry->id, edata->message)));
	return edata == NULL;
}

/*
 * Can entry b join a batch started by entry a?  Inserts into the same table
 * by the same role, each one run of rows with the same columns, are applied
 * by one statement.
 */
static bool
batchable(const DeferredEntry *a, const DeferredEntry *b)
{
	const DeferredPart *pa = entry_first_part(a);
	const DeferredPart *pb = entry_first_part(b);

	return a->op == DEFERRED_INSERT && b->op == DEFERRED_INSERT &&
		a->nparts == 1 && b->nparts == 1 &&
		a->relid == b->relid && a->roleid == b->roleid &&
		pa->namelen == pb->namelen &&
		memcmp(part_names(pa), part_names(pb), pa->namelen) == 0;
}

/* Apply a batch (one entry, or batchable inserts) to relname; rows touched */
static int64
apply_batch(DeferredEntry **batch, int count, const char *relname)
{
	StringInfoData rows;
	int64		touched;

	if (count == 1)
	{
		flush_apply_entry(batch[0], relname, &touched);
		return touched;
	}

	/* join the entries' arrays of rows into one */
	initStringInfo(&rows);
	appendStringInfoChar(&rows, '[');
	for (int i = 0; i < count; i++)
	{
		const DeferredPart *part = entry_first_part(batch[i]);

		if (i > 0)
			appendStringInfoChar(&rows, ',');
		appendBinaryStringInfo(&rows, part_text(part) + 1, part->textlen - 2);
	}
	appendStringInfoChar(&rows, ']');
	return run_insert(relname, entry_first_part(batch[0]),
					  PointerGetDatum(cstring_to_text_with_len(rows.data, rows.len)));
}

typedef struct BatchArgs
{
	DeferredEntry **batch;
	int			count;
	int64		rows;			/* out: rows touched */
} BatchArgs;

/* Apply a batch as its queuing role; run in a subtransaction */
static void
apply_batch_as_role(void *arg)
{
	BatchArgs  *a = arg;
	const DeferredEntry *entry = a->batch[0];
	Oid			save_userid;
	int			save_sec;
	int			gucnest;
	char	   *relname;

	if (!SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(entry->roleid)))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("role with OID %u that queued this entry no longer exists",
						entry->roleid)));
	relname = target_name_locked(entry->relid);

	/*
	 * Settings the entry's triggers or defaults change (search_path,
	 * TimeZone, ...) must not outlive it: they would reach later entries of
	 * other roles and the worker's own statements.  Hence a GUC nest level,
	 * always rolled back.  (On error the subtransaction's abort restores
	 * them and the user id.)
	 */
	gucnest = NewGUCNestLevel();
	GetUserIdAndSecContext(&save_userid, &save_sec);
	SetUserIdAndSecContext(entry->roleid, save_sec | SECURITY_LOCAL_USERID_CHANGE);
	if (deferred_statement_timeout_ms > 0)
		enable_timeout_after(STATEMENT_TIMEOUT, deferred_statement_timeout_ms);
	a->rows = apply_batch(a->batch, a->count, relname);
	disable_timeout(STATEMENT_TIMEOUT, false);
	/* a cancel the timer raised just before it was disabled fails this batch */
	CHECK_FOR_INTERRUPTS();
	SetUserIdAndSecContext(save_userid, save_sec);
	AtEOXact_GUC(false, gucnest);
}

/*
 * Apply a batch in a subtransaction as its queuing role.  Returns NULL on
 * success, else the error (in the caller's memory context).
 */
static ErrorData *
apply_in_subxact(DeferredEntry **batch, int count, NotifyTally *tally)
{
	BatchArgs	args = {batch, count, 0};
	ErrorData  *edata = run_in_subxact(apply_batch_as_role, &args);

	if (edata != NULL)
		disable_timeout(STATEMENT_TIMEOUT, false);
	else
		notify_tally_add(tally, batch[0]->relid, batch[0]->op, count, args.rows);
	return edata;
}

/* What one flush did, for its progress record and shared memory */
typedef struct FlushOutcome
{
	const char *schema;
	NotifyTally *tally;
	List	   *retry;
	int64		applied;
	int64		failed;
	int64		dead;
} FlushOutcome;

/* An entry failed: retry it later, or dead-letter it after its last attempt */
static void
entry_failed(DeferredEntry *e, ErrorData *edata, FlushOutcome *out)
{
	e->attempts++;
	out->failed++;
	queue_note_error(e->qseq, edata->message);
	if (e->attempts >= (uint32) deferred_max_flush_attempts &&
		dead_letter_in_subxact(out->schema, e, edata))
	{
		e->state = ENTRY_DEAD;
		out->dead++;
		return;
	}
	ereport(WARNING,
			(errmsg("athena_deferred: entry " INT64_FORMAT " failed (attempt %u of %d), will retry: %s",
					e->id, e->attempts, deferred_max_flush_attempts, edata->message)));
	out->retry = lappend(out->retry, e);
}

/*
 * Apply a batch; if it fails, apply its halves, down to single entries, so
 * that a bad entry costs a few retries of its batch rather than a slow path
 * for every entry.  Order is kept: the first half goes first.
 */
static void
settle_batch(DeferredEntry **batch, int count, FlushOutcome *out)
{
	ErrorData  *edata = apply_in_subxact(batch, count, out->tally);

	if (edata == NULL)
	{
		for (int i = 0; i < count; i++)
			batch[i]->state = ENTRY_DONE;
		out->applied += count;
	}
	else if (count == 1)
		entry_failed(batch[0], edata, out);
	else
	{
		FreeErrorData(edata);
		settle_batch(batch, count / 2, out);
		settle_batch(batch + count / 2, count - count / 2, out);
	}
}

/* Name of the extension's schema, or NULL if it is not installed here */
char *
flush_extension_schema(void)
{
	Oid			nspid = deferred_extension_schema();

	return OidIsValid(nspid) ? get_namespace_name(nspid) : NULL;
}

/*
 * Record, in the flush transaction, how far the queue has been applied:
 * everything below applied_upto is settled except the entries to retry.
 */
static void
record_progress(const char *schema, uint64 applied_upto, List *retry)
{
	StringInfoData sql;
	Oid			types[3] = {INT8OID, INT8ARRAYOID, INT4ARRAYOID};
	Datum		values[3];
	Datum	   *qseqs;
	Datum	   *attempts;
	int			n = list_length(retry);
	int			i = 0;
	ListCell   *lc;

	qseqs = palloc(sizeof(Datum) * Max(n, 1));
	attempts = palloc(sizeof(Datum) * Max(n, 1));
	foreach(lc, retry)
	{
		DeferredEntry *e = lfirst(lc);

		qseqs[i] = Int64GetDatum((int64) e->qseq);
		attempts[i++] = Int32GetDatum((int32) e->attempts);
	}

	values[0] = Int64GetDatum((int64) applied_upto);
	values[1] = PointerGetDatum(construct_array(qseqs, n, INT8OID, 8, true, TYPALIGN_DOUBLE));
	values[2] = PointerGetDatum(construct_array(attempts, n, INT4OID, 4, true, TYPALIGN_INT));

	initStringInfo(&sql);
	appendStringInfo(&sql,
					 "UPDATE %s.deferred_progress SET applied_upto = $1, retry = $2, retry_attempts = $3",
					 quote_identifier(schema));
	if (SPI_execute_with_args(sql.data, 3, types, values, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "could not record athena_deferred progress");
}

/*
 * One flush: apply up to max_entries published entries in one transaction.
 * Returns how many entries it handled (and sets *settled to how many of
 * them were applied or dead-lettered), or -1 if the extension is not
 * installed in this database.
 */
int
flush_run(int max_entries, int *settled)
{
	DeferredEntry **entries;
	uint64	   *positions;
	int			n;
	FlushOutcome out = {0};
	MemoryContext oldcxt;
	TimestampTz started;
	uint64		upto = 0;

	*settled = 0;
	if (flush_context == NULL)
		flush_context = AllocSetContextCreate(TopMemoryContext, "athena_deferred flush",
											  ALLOCSET_DEFAULT_SIZES);

	started = GetCurrentTimestamp();
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	oldcxt = MemoryContextSwitchTo(flush_context);

	out.schema = flush_extension_schema();
	n = out.schema ? queue_collect(&entries, &positions, max_entries, true) : 0;
	if (n > 0)
	{
		Oid			shown_relid = InvalidOid;

		out.tally = notify_tally_create();
		for (int i = 0, j; i < n; i = j)
		{
			/* pg_stat_activity says which table the flush is at */
			if (entries[i]->relid != shown_relid)
			{
				char	   *relname = get_rel_name(entries[i]->relid);

				shown_relid = entries[i]->relid;
				pgstat_report_activity(STATE_RUNNING,
									   psprintf("flushing %d entries into %s", n,
												relname ? quote_qualified_identifier(get_namespace_name(get_rel_namespace(shown_relid)), relname)
												: "a dropped table"));
			}
			for (j = i + 1; j < n && j - i < FLUSH_BATCH_ENTRIES && batchable(entries[i], entries[j]); j++)
				;
			settle_batch(entries + i, j - i, &out);
		}

		/*
		 * The record never goes back: a flush of retries alone must not
		 * un-apply what an earlier flush applied.  Entries it covers but did
		 * not collect stay listed for retry.
		 */
		upto = Max(flush_progress_upto, entries[n - 1]->qseq + 1);
		out.retry = list_concat(out.retry,
								queue_unsettled_below(positions[n - 1] + entries[n - 1]->size, upto));
		record_progress(out.schema, upto, out.retry);
		notify_tally_send(out.tally);
	}

	MemoryContextSwitchTo(oldcxt);
	SPI_finish();
	PopActiveSnapshot();
	if (n > 0)
		deferred_fault("before_flush_commit");
	CommitTransactionCommand();

	if (n > 0)
	{
		int64		duration = GetCurrentTimestamp() - started;

		flush_progress_upto = upto;
		deferred_fault("after_flush_commit");
		queue_settle(positions, entries, n, out.applied, out.failed, out.dead, duration);
		*settled = out.applied + out.dead;
		ereport(DEBUG1,
				(errmsg("athena_deferred: flushed %d entries in %.3f ms: " INT64_FORMAT " applied, " INT64_FORMAT " failed, " INT64_FORMAT " dead-lettered",
						n, duration / 1000.0, out.applied, out.failed, out.dead)));
	}
	pgstat_report_activity(STATE_IDLE, NULL);
	pgstat_report_stat(false);
	MemoryContextReset(flush_context);
	return out.schema ? n : -1;
}

/* Read the single row of deferred_progress (SPI connected) */
void
flush_read_progress(const char *schema, Progress *p)
{
	char	   *sql = psprintf("SELECT applied_upto, retry, retry_attempts FROM %s.deferred_progress",
							   quote_identifier(schema));
	HeapTuple	tuple;
	TupleDesc	desc;
	bool		isnull;
	Datum	   *elems;
	int			n;

	memset(p, 0, sizeof(*p));
	if (SPI_execute(sql, true, 0) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "athena_deferred: deferred_progress must have exactly one row");
	tuple = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;

	p->applied_upto = (uint64) DatumGetInt64(SPI_getbinval(tuple, desc, 1, &isnull));
	deconstruct_array(DatumGetArrayTypeP(SPI_getbinval(tuple, desc, 2, &isnull)),
					  INT8OID, 8, true, TYPALIGN_DOUBLE, &elems, NULL, &n);
	p->nretry = n;
	p->retry_qseq = palloc(sizeof(uint64) * Max(n, 1));
	p->retry_attempts = palloc0(sizeof(int32) * Max(n, 1));
	for (int i = 0; i < n; i++)
		p->retry_qseq[i] = (uint64) DatumGetInt64(elems[i]);
	deconstruct_array(DatumGetArrayTypeP(SPI_getbinval(tuple, desc, 3, &isnull)),
					  INT4OID, 4, true, TYPALIGN_INT, &elems, NULL, &n);
	for (int i = 0; i < Min(n, p->nretry); i++)
		p->retry_attempts[i] = DatumGetInt32(elems[i]);
}

/* Run a one-parameter statement on a dead letter as the current user */
static bool
dead_letter_query(const char *sql_fmt, int64 id)
{
	char	   *schema = flush_extension_schema();
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(id)};

	if (schema == NULL)
		elog(ERROR, "athena_deferred is not installed in this database");
	if (SPI_execute_with_args(psprintf(sql_fmt, quote_identifier(schema)), 1, types, values,
							  NULL, false, 0) < 0)
		elog(ERROR, "could not read dead letter " INT64_FORMAT, id);
	return SPI_processed == 1;
}

/*
 * deferred_requeue(dead_letter_id bigint) RETURNS bigint: queue a dead
 * letter again, as the role that first queued it (so the caller must have
 * that role's privileges), with its attempts reset, and remove it from
 * deferred_dead_letters in the same transaction.  Returns the new entry id.
 */
PG_FUNCTION_INFO_V1(deferred_requeue);
Datum
deferred_requeue(PG_FUNCTION_ARGS)
{
	int64		id = PG_GETARG_INT64(0);
	HeapTuple	tuple;
	TupleDesc	desc;
	char	   *op;
	char	   *rolename;
	Oid			roleid;
	Oid			save_userid;
	int			save_sec;
	bool		isnull;
	Datum		newid;
	const char *call;

	SPI_connect();
	/* as the caller: reading and deleting dead letters needs their privileges */
	if (!dead_letter_query("SELECT target, op, payload, role FROM %s.deferred_dead_letters"
						   " WHERE id = $1 FOR UPDATE", id))
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("dead letter " INT64_FORMAT " does not exist", id)));
	tuple = SPI_copytuple(SPI_tuptable->vals[0]);
	desc = SPI_tuptable->tupdesc;
	op = SPI_getvalue(tuple, desc, 2);
	rolename = SPI_getvalue(tuple, desc, 4);
	roleid = get_role_oid(rolename, true);
	if (!OidIsValid(roleid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("role \"%s\" that queued dead letter " INT64_FORMAT " no longer exists", rolename, id)));
	if (!has_privs_of_role(GetUserId(), roleid))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to requeue dead letter " INT64_FORMAT, id),
				 errdetail("Only roles with the privileges of role \"%s\", which queued it, can queue it again.",
						   rolename)));

	if (strcmp(op, "insert") == 0)
		call = "SELECT %s.deferred_insert($1::pg_catalog.regclass, $2 OPERATOR(pg_catalog.->) 'rows')";
	else if (strcmp(op, "update") == 0)
		call = "SELECT %s.deferred_update($1::pg_catalog.regclass, $2 OPERATOR(pg_catalog.->) 'match', $2 OPERATOR(pg_catalog.->) 'changes')";
	else
		call = "SELECT %s.deferred_delete($1::pg_catalog.regclass, $2 OPERATOR(pg_catalog.->) 'match')";

	/* queue it as the role that queued it first: the same checks apply */
	GetUserIdAndSecContext(&save_userid, &save_sec);
	SetUserIdAndSecContext(roleid, save_sec | SECURITY_LOCAL_USERID_CHANGE);
	{
		Oid			types[2] = {TEXTOID, JSONBOID};
		Datum		values[2];

		values[0] = SPI_getbinval(tuple, desc, 1, &isnull);
		values[1] = SPI_getbinval(tuple, desc, 3, &isnull);
		if (SPI_execute_with_args(psprintf(call, quote_identifier(flush_extension_schema())),
								  2, types, values, NULL, false, 1) != SPI_OK_SELECT)
			elog(ERROR, "could not requeue dead letter " INT64_FORMAT, id);
		newid = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	}
	SetUserIdAndSecContext(save_userid, save_sec);

	dead_letter_query("DELETE FROM %s.deferred_dead_letters WHERE id = $1", id);
	SPI_finish();

	ereport(LOG,
			(errmsg("athena_deferred: dead letter " INT64_FORMAT " requeued by %s", id,
					GetUserNameFromId(GetUserId(), false))));
	if (isnull)
		PG_RETURN_NULL();		/* athena_deferred.enabled = off: applied at once */
	PG_RETURN_DATUM(newid);
}

/* deferred_discard(dead_letter_id bigint): delete a dead letter, on purpose */
PG_FUNCTION_INFO_V1(deferred_discard);
Datum
deferred_discard(PG_FUNCTION_ARGS)
{
	int64		id = PG_GETARG_INT64(0);

	SPI_connect();
	if (!dead_letter_query("DELETE FROM %s.deferred_dead_letters WHERE id = $1", id))
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("dead letter " INT64_FORMAT " does not exist", id)));
	SPI_finish();
	ereport(LOG,
			(errmsg("athena_deferred: dead letter " INT64_FORMAT " discarded by %s", id,
					GetUserNameFromId(GetUserId(), false))));
	PG_RETURN_VOID();
}
