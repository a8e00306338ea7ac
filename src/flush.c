/*-------------------------------------------------------------------------
 *
 * flush.c
 *		Apply published entries through SPI, as the role that queued each.
 *
 * One flush is one transaction.  Consecutive inserts into one table by one
 * role with the same columns form a batch, applied by one COPY fed from the
 * queue (or, where COPY cannot give what INSERT gives, by INSERT statements);
 * other entries go one by one, through prepared statements kept across
 * flushes.  Each batch runs in a subtransaction under its
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
 * Values travel as JSON parameters or as COPY data, never as SQL text;
 * identifiers are quoted.  This file never touches files.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/sysattr.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/copy.h"
#include "common/jsonapi.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "parser/parse_relation.h"
#include "pgstat.h"
#include "storage/lmgr.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/jsonfuncs.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/rls.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"

#include "athena_deferred.h"

/*
 * Inserts in one batch at most (as many as the worker's largest flush).  A
 * batch that COPY serves is one COPY: its fixed cost (setting up the
 * executor, the multi-insert buffers) is paid once per batch, and batches
 * of 10000 rows and more run near the speed of a plain COPY.  A bad entry
 * costs a retry of the halves of its batch, down to itself: about twice the
 * batch's work.
 */
#define FLUSH_BATCH_ENTRIES 1000000

/*
 * Inserts applied by one INSERT ... SELECT FROM json_populate_recordset() at
 * most, where COPY cannot serve a batch: the statement parses one JSON
 * document of all its rows and keeps them in a tuplestore, which gets slower
 * above some ten thousand rows.
 */
#define FLUSH_STATEMENT_ENTRIES 10000

/* Prepared statements kept for entries applied one by one */
#define STATEMENT_CACHE_SIZE 64

static MemoryContext flush_context = NULL;

/* The entries of the flush at hand, read in place in the ring (queue.c) */
static QueueTake flush_take;

/* applied_upto as this worker last recorded or read it */
uint64		flush_progress_upto = 0;

/*
 * The keys of a part's first object, as read from its text (see part_keys):
 * pointers into the text, or de-escaped copies; not NUL-terminated
 */
typedef struct PartKeys
{
	int			nkeys;
	int			maxkeys;
	const char **name;
	int		   *len;
	bool	   *isnull;
	bool		escaped;		/* read by the lexer: a key held a backslash,
								 * so the names are not the part's text */
	MemoryContext cxt;			/* where the arrays are */
	MemoryContext lexcxt;		/* the lexer's, and de-escaped keys; reset
								 * at each read */
} PartKeys;

static bool part_keys(const DeferredPart *part, PartKeys *keys);
static bool keys_same_fast(const DeferredPart *part, const PartKeys *keys);
static void part_columns(const DeferredPart *part, KeyList *cols);

/* Append "col1, col2" or "p.col1, p.col2" for the columns */
static void
append_columns(StringInfo sql, const KeyList *cols, const char *prefix)
{
	for (int i = 0; i < cols->nkeys; i++)
		appendStringInfo(sql, "%s%s%s", i > 0 ? ", " : "", prefix,
						 quote_identifier(cols->names[i]));
}

/* Append the WHERE conditions of a match part: = for values, IS NULL for nulls */
static void
append_conditions(StringInfo sql, const KeyList *match)
{
	appendStringInfoString(sql, " WHERE ");
	for (int i = 0; i < match->nkeys; i++)
	{
		const char *col = quote_identifier(match->names[i]);

		if (i > 0)
			appendStringInfoString(sql, " AND ");
		if (match->isnull[i])
			appendStringInfo(sql, "__t.%s IS NULL", col);
		else
			appendStringInfo(sql, "__t.%s = __m.%s", col, col);
	}
}

static Datum
part_json(const DeferredPart *part)
{
	return PointerGetDatum(cstring_to_text_with_len(part_text(part), part->textlen));
}

/*
 * Statements applying single entries are prepared once and kept (SPI
 * plans, which the plan cache revalidates after DDL on what they use),
 * most recently used first.  The key is the target's OID, the role, and the
 * statement's text, which names the target by its current name: a renamed
 * target gets a statement of its own, and a statement is never reused for
 * another table that took the old name, whose OID differs.
 */
typedef struct StatementSlot
{
	Oid			relid;
	Oid			roleid;
	char	   *sql;
	SPIPlanPtr	plan;
} StatementSlot;

static StatementSlot statement_cache[STATEMENT_CACHE_SIZE];
static int	statement_cache_used = 0;
static MemoryContext statement_cache_context = NULL;

/*
 * Cached statements running now.  A statement's trigger can apply an entry
 * itself (athena_deferred.enabled = off); while one runs, no plan is
 * evicted, since that would free the running statement's plan.
 */
static int	statement_cache_running = 0;

/* The cached plan of a statement, or NULL if it cannot be cached now */
static SPIPlanPtr
cached_statement(Oid relid, const char *sql, int nargs, Oid *types)
{
	Oid			roleid = GetUserId();
	StatementSlot slot;
	int			i;

	for (i = 0; i < statement_cache_used; i++)
	{
		StatementSlot *s = &statement_cache[i];

		if (s->relid == relid && s->roleid == roleid && strcmp(s->sql, sql) == 0)
			break;
	}

	if (i < statement_cache_used)
		slot = statement_cache[i];
	else
	{
		if (statement_cache_running > 0 && statement_cache_used == STATEMENT_CACHE_SIZE)
			return NULL;
		if (statement_cache_context == NULL)
			statement_cache_context = AllocSetContextCreate(TopMemoryContext,
															"athena_deferred statements",
															ALLOCSET_SMALL_SIZES);
		slot.plan = SPI_prepare(sql, nargs, types);
		if (slot.plan == NULL)
			elog(ERROR, "athena_deferred: could not prepare \"%s\": %s",
				 sql, SPI_result_code_string(SPI_result));
		if (SPI_keepplan(slot.plan) != 0)
			elog(ERROR, "athena_deferred: could not keep the plan of \"%s\"", sql);
		slot.relid = relid;
		slot.roleid = roleid;
		slot.sql = MemoryContextStrdup(statement_cache_context, sql);
		if (statement_cache_used == STATEMENT_CACHE_SIZE)
		{
			StatementSlot *lru = &statement_cache[--statement_cache_used];

			SPI_freeplan(lru->plan);
			pfree(lru->sql);
		}
		i = statement_cache_used++;
	}
	memmove(&statement_cache[1], &statement_cache[0], sizeof(StatementSlot) * i);
	statement_cache[0] = slot;
	return slot.plan;
}

/*
 * Run one statement on relid with JSON parameters, through a cached plan,
 * and return the rows it touched
 */
static int64
run_statement(Oid relid, const char *sql, int nargs, Datum *args, int expected)
{
	Oid			types[2] = {JSONOID, JSONOID};
	SPIPlanPtr	plan = cached_statement(relid, sql, nargs, types);
	int			rc;

	if (plan == NULL)
		rc = SPI_execute_with_args(sql, nargs, types, args, NULL, false, 0);
	else
	{
		statement_cache_running++;
		PG_TRY();
		{
			rc = SPI_execute_plan(plan, args, NULL, false, 0);
		}
		PG_FINALLY();
		{
			statement_cache_running--;
		}
		PG_END_TRY();
	}
	if (rc != expected)
		elog(ERROR, "athena_deferred: unexpected SPI result %d for \"%s\"", rc, sql);
	return (int64) SPI_processed;
}

/* Insert the rows of a JSON array, which name the columns cols */
static int64
run_insert(Oid relid, const char *relname, const KeyList *cols, Datum json)
{
	StringInfoData sql;

	initStringInfo(&sql);
	appendStringInfo(&sql, "INSERT INTO %s (", relname);
	append_columns(&sql, cols, "");
	appendStringInfoString(&sql, ") SELECT ");
	append_columns(&sql, cols, "");
	appendStringInfo(&sql, " FROM pg_catalog.json_populate_recordset(NULL::%s, $1)", relname);
	return run_statement(relid, sql.data, 1, &json, SPI_OK_INSERT);
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
	KeyList		cols;

	initStringInfo(&sql);
	*rows = 0;

	switch ((DeferredOp) entry->op)
	{
		case DEFERRED_INSERT:
			/* one statement per run of rows with the same keys */
			for (int i = 0; i < entry->nparts; i++, part = part_next(part))
			{
				part_columns(part, &cols);
				*rows += run_insert(entry->relid, relname, &cols, part_json(part));
			}
			break;

		case DEFERRED_UPDATE:
			{
				const DeferredPart *changes = part_next(part);

				part_columns(changes, &cols);
				appendStringInfo(&sql, "UPDATE %s AS __t SET ", relname);
				for (int i = 0; i < cols.nkeys; i++)
				{
					const char *col = quote_identifier(cols.names[i]);

					appendStringInfo(&sql, "%s%s = __s.%s", i > 0 ? ", " : "", col, col);
				}
				appendStringInfo(&sql,
								 " FROM pg_catalog.json_populate_record(NULL::%s, $1) AS __m,"
								 " pg_catalog.json_populate_record(NULL::%s, $2) AS __s",
								 relname, relname);
				part_columns(part, &cols);
				append_conditions(&sql, &cols);
				args[0] = part_json(part);
				args[1] = part_json(changes);
				*rows = run_statement(entry->relid, sql.data, 2, args, SPI_OK_UPDATE);
			}
			break;

		case DEFERRED_DELETE:
			appendStringInfo(&sql,
							 "DELETE FROM %s AS __t USING pg_catalog.json_populate_record(NULL::%s, $1) AS __m",
							 relname, relname);
			part_columns(part, &cols);
			append_conditions(&sql, &cols);
			args[0] = part_json(part);
			*rows = run_statement(entry->relid, sql.data, 1, args, SPI_OK_DELETE);
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

/* Do two parts' keys name the same columns, in the same order? */
static bool
same_keys(const PartKeys *a, const PartKeys *b)
{
	if (a->nkeys != b->nkeys)
		return false;
	for (int i = 0; i < a->nkeys; i++)
		if (a->len[i] != b->len[i] || memcmp(a->name[i], b->name[i], a->len[i]) != 0)
			return false;
	return true;
}

/*
 * Can entry a start a batch of inserts?  If so, its keys are read into
 * akeys.  Inserts of one run of rows each can; an entry whose text cannot
 * be read goes alone, so that its error is the statement's (and fails
 * only it, in its subtransaction).
 */
static bool
batch_head(const DeferredEntry *a, PartKeys *akeys)
{
	return a->op == DEFERRED_INSERT && a->nparts == 1 &&
		part_keys(entry_first_part(a), akeys);
}

/*
 * Can entry b join a batch started by entry a, whose keys are akeys?
 * Inserts into the same table by the same role, each one run of rows with
 * the same columns, are applied together.  bkeys is scratch space.
 */
static bool
batchable(const DeferredEntry *a, const PartKeys *akeys, const DeferredEntry *b,
		  PartKeys *bkeys)
{
	return b->op == DEFERRED_INSERT && b->nparts == 1 &&
		a->relid == b->relid && a->roleid == b->roleid &&
		(keys_same_fast(entry_first_part(b), akeys) ||
		 (part_keys(entry_first_part(b), bkeys) && same_keys(akeys, bkeys)));
}

/* Insert a batch with INSERT ... SELECT FROM json_populate_recordset() */
static int64
insert_by_statement(DeferredEntry **batch, int count, const char *relname)
{
	StringInfoData rows;
	KeyList		cols;

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
	part_columns(entry_first_part(batch[0]), &cols);
	return run_insert(batch[0]->relid, relname, &cols,
					  PointerGetDatum(cstring_to_text_with_len(rows.data, rows.len)));
}

/*
 * The COPY path.  A batch of inserts becomes COPY text-format rows, made
 * from the entries' JSON as COPY reads them, so that only a chunk of them
 * exists at a time.  Each value is turned into the very string that
 * json_populate_recordset() would give the column's input function:
 *
 *	JSON null		NULL (\N); a column a row does not name is NULL too
 *	string			its de-escaped text; for a json or jsonb column (or a
 *					domain over one) the string re-quoted as a JSON string
 *	number, true,	the token as written
 *	false
 *	object, array	its JSON text as written, whitespace included
 *
 * and then escaped for COPY (backslash, tab, newline, carriage return), so
 * that COPY hands the input function that same string.  Column types for
 * which json_populate_recordset() does something else (arrays and
 * composites, built element by element from JSON arrays and objects) are
 * left to the statement path (see copy_serves).
 */
typedef struct CopyFeed
{
	DeferredEntry **batch;
	int			count;
	int			next;			/* next entry to convert */
	const PartKeys *head;		/* NULL, or: the batch's extent is not known
								 * yet, it ends before the first entry
								 * (past the second) that is not batchable
								 * with batch[0], whose keys these are */
	PartKeys	keys;			/* scratch for batchable() */
	int			ncols;
	char	  **colnames;
	bool	   *quote_strings;	/* per column: re-quote JSON strings */
	char	  **qnames;			/* per column: its name as a JSON string,
								 * quotes included, as the rows write it */
	int		   *qlen;
	int		   *valstart;		/* per column: offset of the current row's
								 * value in rowbuf, or -1 for NULL */
	int		   *vallen;
	StringInfoData rowbuf;		/* the current row's values, escaped */
	StringInfoData scratch;
	StringInfoData out;			/* rows converted, not yet read by COPY */
	int			outpos;
	MemoryContext lexcxt;		/* the JSON lexer of one entry */
} CopyFeed;

/*
 * The feed of the COPY running now.  COPY's data source callback takes no
 * context argument, hence a static; it is set just before the COPY and
 * never read by anything else.
 */
static CopyFeed *copy_feed = NULL;

/* Append s to buf escaped for COPY's text format */
static void
append_copy_text(StringInfo buf, const char *s, int len)
{
	const char *run = s;
	const char *end = s + len;

	for (const char *p = s; p < end; p++)
	{
		const char *esc;

		switch (*p)
		{
			case '\\':
				esc = "\\\\";
				break;
			case '\t':
				esc = "\\t";
				break;
			case '\n':
				esc = "\\n";
				break;
			case '\r':
				esc = "\\r";
				break;
			default:
				continue;
		}
		appendBinaryStringInfo(buf, run, p - run);
		appendBinaryStringInfo(buf, esc, 2);
		run = p + 1;
	}
	appendBinaryStringInfo(buf, run, end - run);
}

/* Next JSON token; the lexer's errors are PostgreSQL's JSON errors */
static void
feed_lex(JsonLexContext *lex)
{
	JsonParseErrorType result = json_lex(lex);

	if (result != JSON_SUCCESS)
		json_ereport_error(result, lex);
}

/*
 * After the token that opens an object or array: lex up to the one that
 * closes it.  JSON_SUCCESS, the lexer's error, or JSON_EXPECTED_MORE if the
 * text ends first.
 */
static JsonParseErrorType
lex_past_container(JsonLexContext *lex)
{
	for (int depth = 1; depth > 0;)
	{
		JsonParseErrorType result = json_lex(lex);

		if (result != JSON_SUCCESS)
			return result;
		if (lex->token_type == JSON_TOKEN_OBJECT_START ||
			lex->token_type == JSON_TOKEN_ARRAY_START)
			depth++;
		else if (lex->token_type == JSON_TOKEN_OBJECT_END ||
				 lex->token_type == JSON_TOKEN_ARRAY_END)
			depth--;
		else if (lex->token_type == JSON_TOKEN_END)
			return JSON_EXPECTED_MORE;
	}
	return JSON_SUCCESS;
}

static void
feed_expect(JsonLexContext *lex, JsonTokenType type)
{
	if (lex->token_type != type)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("athena_deferred: queued insert is not a JSON array of objects")));
}

/*
 * Index of the batch's column a key (len bytes, not necessarily
 * NUL-terminated) names, or -1.  Rows usually list their keys in the order
 * of the part's names: guess is where this key should be.
 */
static int
copy_column(CopyFeed *f, const char *key, int len, int guess)
{
	if (guess < f->ncols && strncmp(f->colnames[guess], key, len) == 0 &&
		f->colnames[guess][len] == '\0')
		return guess;
	for (int i = 0; i < f->ncols; i++)
		if (strncmp(f->colnames[i], key, len) == 0 && f->colnames[i][len] == '\0')
			return i;
	return -1;
}

/*
 * Convert the value the lexer is at into the current row's column col (-1:
 * a key that names no column, skipped as json_populate_recordset() skips
 * it), leaving the lexer on the value's last token.
 */
static void
feed_value(CopyFeed *f, JsonLexContext *lex, int col)
{
	int			start = f->rowbuf.len;

	switch (lex->token_type)
	{
		case JSON_TOKEN_NULL:
			if (col >= 0)
				f->valstart[col] = -1;
			return;

		case JSON_TOKEN_STRING:
			if (col >= 0 && f->quote_strings[col])
			{
				resetStringInfo(&f->scratch);
				escape_json(&f->scratch, lex->strval->data);
				append_copy_text(&f->rowbuf, f->scratch.data, f->scratch.len);
			}
			else
				append_copy_text(&f->rowbuf, lex->strval->data, lex->strval->len);
			break;

		case JSON_TOKEN_NUMBER:
		case JSON_TOKEN_TRUE:
		case JSON_TOKEN_FALSE:
			append_copy_text(&f->rowbuf, lex->token_start,
							 lex->token_terminator - lex->token_start);
			break;

		case JSON_TOKEN_OBJECT_START:
		case JSON_TOKEN_ARRAY_START:
			{
				char	   *value_start = lex->token_start;
				JsonParseErrorType result = lex_past_container(lex);

				if (result == JSON_EXPECTED_MORE)
					feed_expect(lex, JSON_TOKEN_OBJECT_END);
				else if (result != JSON_SUCCESS)
					json_ereport_error(result, lex);
				append_copy_text(&f->rowbuf, value_start,
								 lex->token_terminator - value_start);
			}
			break;

		default:
			feed_expect(lex, JSON_TOKEN_STRING);
	}
	if (col >= 0)
	{
		f->valstart[col] = start;
		f->vallen[col] = f->rowbuf.len - start;
	}
}

/* Convert one row, the lexer at its '{', into valstart and vallen */
static void
feed_row(CopyFeed *f, JsonLexContext *lex)
{
	resetStringInfo(&f->rowbuf);
	for (int i = 0; i < f->ncols; i++)
		f->valstart[i] = -1;

	feed_lex(lex);
	for (int key = 0; lex->token_type != JSON_TOKEN_OBJECT_END; key++)
	{
		int			col;

		if (key > 0)
		{
			feed_expect(lex, JSON_TOKEN_COMMA);
			feed_lex(lex);
		}
		feed_expect(lex, JSON_TOKEN_STRING);
		col = copy_column(f, lex->strval->data, lex->strval->len, key);
		feed_lex(lex);
		feed_expect(lex, JSON_TOKEN_COLON);
		feed_lex(lex);
		/* a key given twice: the last value wins, as in the statement */
		feed_value(f, lex, col);
		feed_lex(lex);
	}
}

/* Append the current row (valstart, vallen) to out as one COPY line */
static void
feed_emit_row(CopyFeed *f)
{
	for (int i = 0; i < f->ncols; i++)
	{
		if (i > 0)
			appendStringInfoChar(&f->out, '\t');
		if (f->valstart[i] < 0)
			appendBinaryStringInfo(&f->out, "\\N", 2);
		else
			appendBinaryStringInfo(&f->out, f->rowbuf.data + f->valstart[i], f->vallen[i]);
	}
	appendStringInfoChar(&f->out, '\n');
}

/*
 * Convert the rows of one entry, a JSON array of objects, with
 * PostgreSQL's JSON lexer, which de-escapes strings as the statement's
 * parser does.
 */
static void
feed_entry_lexer(CopyFeed *f, const DeferredPart *part)
{
	JsonLexContext *lex;

	/* the lexer only reads its input */
	lex = makeJsonLexContextCstringLen(unconstify(char *, part_text(part)), part->textlen,
									   GetDatabaseEncoding(), true);
	feed_lex(lex);
	feed_expect(lex, JSON_TOKEN_ARRAY_START);
	feed_lex(lex);
	for (int row = 0; lex->token_type != JSON_TOKEN_ARRAY_END; row++)
	{
		if (row > 0)
		{
			feed_expect(lex, JSON_TOKEN_COMMA);
			feed_lex(lex);
		}
		feed_expect(lex, JSON_TOKEN_OBJECT_START);
		feed_row(f, lex);
		feed_emit_row(f);
		feed_lex(lex);
	}
	feed_lex(lex);
	feed_expect(lex, JSON_TOKEN_END);
}

/*
 * The same for JSON text without a backslash, which is most of it: no
 * string needs de-escaping, so a string's value is its bytes between the
 * quotes, and none holds a quote, a backslash or a control character (the
 * scanner checks), so none needs escaping for COPY or for JSON either.
 * PostgreSQL's lexer copies strings a byte at a time; this does not.  At
 * the first backslash in a string the scanner gives up on the entry (see
 * feed_entry).  Anything else unexpected is an error, which fails the
 * batch: its halves, and finally the entry alone, then take the statement
 * path, which reports it.
 */
static void
plain_error(void)
{
	/* never returns */
	ereport(ERROR,
			(errcode(ERRCODE_DATA_CORRUPTED),
			 errmsg("athena_deferred: queued insert is not a JSON array of objects")));
}

static inline const char *
plain_skip_space(const char *p, const char *end)
{
	while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
		p++;
	return p;
}

/*
 * p at a string's opening quote: its contents, and what follows it; NULL if
 * it holds a backslash
 */
static const char *
plain_string(const char *p, const char *end, const char **str, int *len)
{
	const char *start = ++p;

	while (p < end && *p != '"')
	{
		if (*p == '\\')
			return NULL;
		if ((unsigned char) *p < 0x20)
			plain_error();
		p++;
	}
	if (p >= end)
		plain_error();
	*str = start;
	*len = p - start;
	return p + 1;
}

/*
 * Convert the value at p into column col (-1: none); returns what follows,
 * or NULL at a backslash
 */
static const char *
plain_value(CopyFeed *f, const char *p, const char *end, int col)
{
	int			start = f->rowbuf.len;
	const char *str;
	int			len;

	if (p >= end)
		plain_error();
	switch (*p)
	{
		case '"':
			p = plain_string(p, end, &str, &len);
			if (p == NULL)
				return NULL;
			if (col >= 0 && f->quote_strings[col])
				appendStringInfoChar(&f->rowbuf, '"');
			appendBinaryStringInfo(&f->rowbuf, str, len);
			if (col >= 0 && f->quote_strings[col])
				appendStringInfoChar(&f->rowbuf, '"');
			break;

		case '{':
		case '[':
			{
				const char *value_start = p;
				int			depth = 0;

				do
				{
					if (p >= end)
						plain_error();
					if (*p == '"')
					{
						p = plain_string(p, end, &str, &len);
						if (p == NULL)
							return NULL;
						continue;
					}
					if (*p == '{' || *p == '[')
						depth++;
					else if (*p == '}' || *p == ']')
						depth--;
					p++;
				} while (depth > 0);
				append_copy_text(&f->rowbuf, value_start, p - value_start);
			}
			break;

		case 't':
		case 'f':
		case 'n':
			{
				const char *word = (*p == 't') ? "true" : (*p == 'f') ? "false" : "null";

				len = strlen(word);
				if (end - p < len || memcmp(p, word, len) != 0)
					plain_error();
				if (*p == 'n')
				{
					if (col >= 0)
						f->valstart[col] = -1;
					return p + len;
				}
				appendBinaryStringInfo(&f->rowbuf, p, len);
				p += len;
			}
			break;

		default:
			{
				const char *num = p;

				while (p < end && (isdigit((unsigned char) *p) || *p == '-' || *p == '+' ||
								   *p == '.' || *p == 'e' || *p == 'E'))
					p++;
				if (p == num || !IsValidJsonNumber(num, p - num))
					plain_error();
				appendBinaryStringInfo(&f->rowbuf, num, p - num);
			}
			break;
	}
	if (col >= 0)
	{
		f->valstart[col] = start;
		f->vallen[col] = f->rowbuf.len - start;
	}
	return p;
}

static bool
feed_entry_plain(CopyFeed *f, const char *p, const char *end)
{
	p = plain_skip_space(p, end);
	if (p >= end || *p != '[')
		plain_error();
	for (;;)
	{
		p = plain_skip_space(p + 1, end);
		if (p >= end || *p != '{')
			plain_error();

		resetStringInfo(&f->rowbuf);
		for (int i = 0; i < f->ncols; i++)
			f->valstart[i] = -1;
		p = plain_skip_space(p + 1, end);
		if (p < end && *p == '}')
			p++;
		else
		{
			for (int key = 0;; key++)
			{
				const char *name;
				int			len;
				int			col;

				if (p >= end || *p != '"')
					plain_error();
				p = plain_string(p, end, &name, &len);
				if (p == NULL)
					return false;
				col = copy_column(f, name, len, key);
				p = plain_skip_space(p, end);
				if (p >= end || *p != ':')
					plain_error();
				/* a key given twice: the last value wins, as in the statement */
				p = plain_value(f, plain_skip_space(p + 1, end), end, col);
				if (p == NULL)
					return false;
				p = plain_skip_space(p, end);
				if (p < end && *p == ',')
					p = plain_skip_space(p + 1, end);
				else if (p < end && *p == '}')
				{
					p++;
					break;
				}
				else
					plain_error();
			}
		}
		feed_emit_row(f);

		p = plain_skip_space(p, end);
		if (p < end && *p == ']')
			break;
		if (p >= end || *p != ',')
			plain_error();
	}
	if (plain_skip_space(p + 1, end) != end)
		plain_error();
	return true;
}


/*
 * The fast path, for what nearly every entry is: JsonbToCString() output
 * whose rows name exactly the batch's columns, in the batch's order (rows
 * of one batch have the same keys, and jsonb orders keys the same way in
 * every row), and whose strings hold no backslash.  Its output is exactly
 * what feed_entry_plain() gives for such text, written straight into the
 * destination without per-row buffers: each key is checked to be the one
 * expected in its place with one memcmp, and the end of a string is found
 * eight bytes at a time.  Anything else (a key out of place, missing or
 * extra, a backslash, a control character, malformed text, too little
 * room) makes it give up, -1, and the entry goes the general way, which
 * converts it or reports its error.
 */

#if defined(__GNUC__)
#define feed_prefetch(p) __builtin_prefetch(p)
#else
#define feed_prefetch(p) ((void) 0)
#endif

/* Does the 8-byte word hold a byte that is '"', '\\' or below 0x20? */
#define SWAR_ONES	UINT64CONST(0x0101010101010101)
#define SWAR_HIGHS	UINT64CONST(0x8080808080808080)
#define SWAR_HASZERO(v) (((v) - SWAR_ONES) & ~(v) & SWAR_HIGHS)

static inline bool
fast_word_special(uint64 v)
{
	return (SWAR_HASZERO(v ^ (SWAR_ONES * '"')) |
			SWAR_HASZERO(v ^ (SWAR_ONES * '\\')) |
			((v - SWAR_ONES * 0x20) & ~v & SWAR_HIGHS)) != 0;
}

/*
 * p just past a string's opening quote: its closing quote, or NULL if a
 * backslash or a control character comes first, or it has no end
 */
static inline const char *
fast_string_end(const char *p, const char *end)
{
	while (end - p >= 8)
	{
		uint64		v;

		memcpy(&v, p, 8);
		if (fast_word_special(v))
			break;
		p += 8;
	}
	for (; p < end; p++)
	{
		unsigned char c = (unsigned char) *p;

		if (c == '"')
			return p;
		if (c == '\\' || c < 0x20)
			return NULL;
	}
	return NULL;
}

static inline const char *
fast_skip_space(const char *p, const char *end)
{
	/* JsonbToCString() writes one space after ':' and ',', none elsewhere */
	if (likely(p < end) && *p == ' ')
		p++;
	if (unlikely(p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')))
		return plain_skip_space(p, end);
	return p;
}

/* memcmp() == 0 for the few bytes of a key, without a call */
static inline bool
fast_equal(const char *a, const char *b, int len)
{
	for (; len >= 8; a += 8, b += 8, len -= 8)
	{
		uint64		x,
					y;

		memcpy(&x, a, 8);
		memcpy(&y, b, 8);
		if (x != y)
			return false;
	}
	if (len >= 4)
	{
		uint32		x,
					y;

		memcpy(&x, a, 4);
		memcpy(&y, b, 4);
		if (x != y)
			return false;
		a += 4;
		b += 4;
		len -= 4;
	}
	for (; len > 0; a++, b++, len--)
		if (*a != *b)
			return false;
	return true;
}

static inline bool
fast_number_char(char c)
{
	return (c >= '0' && c <= '9') || c == '-' || c == '+' || c == '.' ||
		c == 'e' || c == 'E';
}

/*
 * Convert the entry's text [p, end) into COPY lines at dst, at most dend;
 * bytes written, or -1 (nothing of it counts) to leave it to the general way
 */
static int
feed_entry_fast(CopyFeed *f, const char *p, const char *end, char *dst,
				const char *dend)
{
	char	   *d = dst;

	p = plain_skip_space(p, end);
	if (p >= end || *p != '[')
		return -1;
	p = fast_skip_space(p + 1, end);
	for (;;)
	{
		if (p >= end || *p != '{')
			return -1;
		p++;
		for (int col = 0; col < f->ncols; col++)
		{
			int			qlen = f->qlen[col];
			const char *v;

			/* the key: "name", as expected in this place */
			p = fast_skip_space(p, end);
			if (end - p < qlen || !fast_equal(p, f->qnames[col], qlen))
				return -1;
			p = fast_skip_space(p + qlen, end);
			if (p >= end || *p != ':')
				return -1;
			p = fast_skip_space(p + 1, end);
			if (p >= end)
				return -1;

			if (col > 0)
			{
				if (d >= dend)
					return -1;
				*d++ = '\t';
			}

			/* the value, as feed_entry_plain() (plain_value) writes it */
			v = p;
			switch (*p)
			{
				case '"':
					{
						const char *q = fast_string_end(p + 1, end);
						bool		quote = f->quote_strings[col];
						int			len;

						if (q == NULL)
							return -1;
						/* the string's bytes, with its quotes or without */
						if (!quote)
							v++;
						len = (q - v) + (quote ? 1 : 0);
						if (dend - d < len)
							return -1;
						memcpy(d, v, len);
						d += len;
						p = q + 1;
					}
					break;

				case 'n':
					if (end - p < 4 || memcmp(p, "null", 4) != 0 || dend - d < 2)
						return -1;
					*d++ = '\\';
					*d++ = 'N';
					p += 4;
					break;

				case 't':
				case 'f':
					{
						int			len = (*p == 't') ? 4 : 5;

						if (end - p < len ||
							memcmp(p, (*p == 't') ? "true" : "false", len) != 0 ||
							dend - d < len)
							return -1;
						memcpy(d, p, len);
						d += len;
						p += len;
					}
					break;

				case '{':
				case '[':
					{
						int			depth = 0;

						do
						{
							if (p >= end)
								return -1;
							if (*p == '"')
							{
								p = fast_string_end(p + 1, end);
								if (p == NULL)
									return -1;
							}
							else if (*p == '{' || *p == '[')
								depth++;
							else if (*p == '}' || *p == ']')
								depth--;
							p++;
						} while (depth > 0);

						/* escaped for COPY, as append_copy_text() does */
						for (; v < p; v++)
						{
							char		c = *v;
							char		e;

							switch (c)
							{
								case '\\':
									e = '\\';
									break;
								case '\t':
									e = 't';
									break;
								case '\n':
									e = 'n';
									break;
								case '\r':
									e = 'r';
									break;
								default:
									if (d >= dend)
										return -1;
									*d++ = c;
									continue;
							}
							if (dend - d < 2)
								return -1;
							*d++ = '\\';
							*d++ = e;
						}
					}
					break;

				default:
					{
						const char *num = p;
						bool		valid;

						/* -?(0|[1-9][0-9]*) here; anything else as plain_value() */
						if (*p == '-')
							p++;
						if (p < end && *p == '0')
							p++;
						else if (p < end && *p >= '1' && *p <= '9')
						{
							for (p++; p < end && *p >= '0' && *p <= '9'; p++)
								;
						}
						else
							p = num;
						valid = (p > num && (p >= end || !fast_number_char(*p)));
						if (!valid)
						{
							for (p = num; p < end && fast_number_char(*p); p++)
								;
							if (p == num || !IsValidJsonNumber(num, p - num))
								return -1;
						}
						if (dend - d < p - num)
							return -1;
						memcpy(d, num, p - num);
						d += p - num;
					}
					break;
			}

			p = fast_skip_space(p, end);
			if (p >= end || *p != (col < f->ncols - 1 ? ',' : '}'))
				return -1;
			p++;
		}
		if (d >= dend)
			return -1;
		*d++ = '\n';

		p = fast_skip_space(p, end);
		if (p < end && *p == ']')
			break;
		if (p >= end || *p != ',')
			return -1;
		p = fast_skip_space(p + 1, end);
	}
	if (plain_skip_space(p + 1, end) != end)
		return -1;
	return d - dst;
}

/*
 * Does the first row of a PART_ROWS part surely have exactly keys' keys, in
 * their order?  A quick check for batchable(), in the manner of
 * feed_entry_fast(): false whenever it is not sure (a key or a string with
 * a backslash, a nested value, anything unexpected), and part_keys() then
 * reads the keys as usual.  Compares the keys' text as the part writes
 * them, which for keys without a backslash is the key itself.
 */
static bool
keys_same_fast(const DeferredPart *part, const PartKeys *keys)
{
	const char *p = part_text(part);
	const char *end = p + part->textlen;

	/*
	 * De-escaped names are not comparable with a part's text: a name
	 * holding a quote could line up with several other keys.
	 */
	if (part->kind != PART_ROWS || keys->escaped)
		return false;
	p = plain_skip_space(p, end);
	if (p >= end || *p != '[')
		return false;
	p = fast_skip_space(p + 1, end);
	if (p >= end || *p != '{')
		return false;
	p++;
	for (int i = 0; i < keys->nkeys; i++)
	{
		int			len = keys->len[i];
		const char *value;

		p = fast_skip_space(p, end);
		if (end - p < len + 2 || p[0] != '"' || p[len + 1] != '"' ||
			!fast_equal(p + 1, keys->name[i], len))
			return false;
		p = fast_skip_space(p + len + 2, end);
		if (p >= end || *p != ':')
			return false;
		p = fast_skip_space(p + 1, end);
		if (p >= end)
			return false;
		value = p;
		if (*p == '"')
		{
			p = fast_string_end(p + 1, end);
			if (p == NULL)
				return false;
			p++;
		}
		else
		{
			while (p < end && *p != ',' && *p != '}' && *p != ' ' &&
				   *p != '{' && *p != '[' && *p != '"' && *p != '\\' &&
				   (unsigned char) *p >= 0x20)
				p++;
			if (p == value || (p < end && (*p == '{' || *p == '[' || *p == '"' || *p == '\\')))
				return false;
		}
		p = fast_skip_space(p, end);
		if (p >= end || *p != (i < keys->nkeys - 1 ? ',' : '}'))
			return false;
		p++;
	}
	return keys->nkeys > 0;
}

/* Room feed_entry_fast() needs at most for an entry's rows */
static inline int64
feed_bound(const DeferredPart *part)
{
	/*
	 * Each value's text becomes at most twice as long (COPY escapes of
	 * nested values), a row's tabs and newline are no more than its commas
	 * and closing brace.
	 */
	return 2 * (int64) part->textlen + 16;
}

/*
 * Convert the rows of one entry into COPY lines appended to out: the fast
 * way unless it was tried already, else without PostgreSQL's lexer unless
 * the text holds a backslash, else with it
 */
static void
feed_entry(CopyFeed *f, const DeferredEntry *entry, bool tried_fast)
{
	const DeferredPart *part = entry_first_part(entry);
	const char *text = part_text(part);
	int			start = f->out.len;

	if (!tried_fast)
	{
		int64		bound = feed_bound(part);
		int			n;

		if (bound < (int64) MaxAllocSize - start)
		{
			enlargeStringInfo(&f->out, (int) bound);
			n = feed_entry_fast(f, text, text + part->textlen, f->out.data + start,
								f->out.data + f->out.maxlen - 1);
			if (n >= 0)
			{
				f->out.len += n;
				f->out.data[f->out.len] = '\0';
				return;
			}
		}
	}
	if (!feed_entry_plain(f, text, text + part->textlen))
	{
		MemoryContext oldcxt;

		/* a backslash: the entry's rows again, from the start */
		f->out.len = start;
		f->out.data[start] = '\0';
		MemoryContextReset(f->lexcxt);
		oldcxt = MemoryContextSwitchTo(f->lexcxt);
		feed_entry_lexer(f, part);
		MemoryContextSwitchTo(oldcxt);
	}
}

/*
 * The columns of a part: the keys of its first object (of its first row,
 * for PART_ROWS: all rows of a part have the same keys, see
 * deferred_insert), with whether each value is null (which the conditions
 * of a match part need).  The text is JsonbToCString() output of objects
 * whose keys were checked to be columns, so the keys are the column names
 * exactly, each once, in the same order in every row with the same
 * columns.  Only what tells keys from values is read here, once per part,
 * with the plain scanner's helpers: values are skipped, not checked (the
 * statement or the COPY feed reads them).  A key holding a backslash (a
 * column name with a quote, a backslash or a control character) is read
 * with PostgreSQL's JSON lexer instead, which de-escapes it.  Reading never
 * fails with an error: batches are formed outside any subtransaction.
 */
typedef enum KeysResult
{
	KEYS_OK,
	KEYS_ESCAPED,				/* a key holds a backslash: use the lexer */
	KEYS_MALFORMED
} KeysResult;

static void
keys_add(PartKeys *keys, const char *name, int len, bool isnull)
{
	if (keys->nkeys == keys->maxkeys)
	{
		keys->maxkeys = Max(keys->maxkeys * 2, 8);
		if (keys->name == NULL)
		{
			keys->name = MemoryContextAlloc(keys->cxt, sizeof(char *) * keys->maxkeys);
			keys->len = MemoryContextAlloc(keys->cxt, sizeof(int) * keys->maxkeys);
			keys->isnull = MemoryContextAlloc(keys->cxt, sizeof(bool) * keys->maxkeys);
		}
		else
		{
			keys->name = repalloc(keys->name, sizeof(char *) * keys->maxkeys);
			keys->len = repalloc(keys->len, sizeof(int) * keys->maxkeys);
			keys->isnull = repalloc(keys->isnull, sizeof(bool) * keys->maxkeys);
		}
	}
	keys->name[keys->nkeys] = name;
	keys->len[keys->nkeys] = len;
	keys->isnull[keys->nkeys] = isnull;
	keys->nkeys++;
}

/* p at a string's opening quote: what follows the string, or NULL */
static inline const char *
keys_skip_string(const char *p, const char *end)
{
	for (p++; p < end; p++)
	{
		const char *quote = memchr(p, '"', end - p);
		const char *escape;

		if (quote == NULL)
			return NULL;
		escape = memchr(p, '\\', quote - p);
		if (escape == NULL)
			return quote + 1;
		p = escape + 1;			/* the escaped character is skipped */
	}
	return NULL;
}

/* p at a value: what follows it (p itself if there is none), or NULL */
static const char *
keys_skip_value(const char *p, const char *end)
{
	int			depth = 0;

	while (p < end)
	{
		switch (*p)
		{
			case '"':
				p = keys_skip_string(p, end);
				if (p == NULL || depth == 0)
					return p;
				continue;
			case '{':
			case '[':
				depth++;
				break;
			case '}':
			case ']':
				if (depth == 0)
					return p;	/* after a number or a literal */
				if (--depth == 0)
					return p + 1;
				break;
			case ',':
			case ' ':
			case '\t':
			case '\n':
			case '\r':
				if (depth == 0)
					return p;
				break;
		}
		p++;
	}
	return depth == 0 ? p : NULL;
}

static KeysResult
keys_plain(const char *p, const char *end, bool rows, PartKeys *keys)
{
	p = plain_skip_space(p, end);
	if (rows)
	{
		if (p >= end || *p != '[')
			return KEYS_MALFORMED;
		p = plain_skip_space(p + 1, end);
	}
	if (p >= end || *p != '{')
		return KEYS_MALFORMED;
	p = plain_skip_space(p + 1, end);
	for (;;)
	{
		const char *name;
		int			len;
		const char *value;

		if (p >= end || *p != '"')
			return KEYS_MALFORMED;
		for (name = ++p; p < end && *p != '"'; p++)
		{
			if (*p == '\\')
				return KEYS_ESCAPED;
		}
		if (p >= end || p == name)
			return KEYS_MALFORMED;
		len = p - name;
		value = plain_skip_space(p + 1, end);
		if (value >= end || *value != ':')
			return KEYS_MALFORMED;
		value = plain_skip_space(value + 1, end);
		p = keys_skip_value(value, end);
		if (p == NULL || p == value)
			return KEYS_MALFORMED;
		keys_add(keys, name, len, p - value == 4 && memcmp(value, "null", 4) == 0);
		p = plain_skip_space(p, end);
		if (p < end && *p == '}')
			return KEYS_OK;
		if (p >= end || *p != ',')
			return KEYS_MALFORMED;
		p = plain_skip_space(p + 1, end);
	}
}

/*
 * The same with PostgreSQL's JSON lexer, which de-escapes the keys.  What
 * it allocates goes to keys->lexcxt, reset at each read: a flush may read
 * a million entries' keys.
 */
static bool
keys_lexer_read(const char *text, int textlen, bool rows, PartKeys *keys)
{
	JsonLexContext *lex;

	/* the lexer only reads its input */
	lex = makeJsonLexContextCstringLen(unconstify(char *, text), textlen,
									   GetDatabaseEncoding(), true);
	if (json_lex(lex) != JSON_SUCCESS)
		return false;
	if (rows)
	{
		if (lex->token_type != JSON_TOKEN_ARRAY_START || json_lex(lex) != JSON_SUCCESS)
			return false;
	}
	if (lex->token_type != JSON_TOKEN_OBJECT_START || json_lex(lex) != JSON_SUCCESS)
		return false;
	for (int key = 0; lex->token_type != JSON_TOKEN_OBJECT_END; key++)
	{
		char	   *name;
		int			len;
		bool		isnull;

		if (key > 0 &&
			(lex->token_type != JSON_TOKEN_COMMA || json_lex(lex) != JSON_SUCCESS))
			return false;
		if (lex->token_type != JSON_TOKEN_STRING || lex->strval->len == 0)
			return false;
		name = pnstrdup(lex->strval->data, lex->strval->len);
		len = lex->strval->len;
		if (json_lex(lex) != JSON_SUCCESS || lex->token_type != JSON_TOKEN_COLON ||
			json_lex(lex) != JSON_SUCCESS)
			return false;
		isnull = (lex->token_type == JSON_TOKEN_NULL);
		if (lex->token_type == JSON_TOKEN_OBJECT_START ||
			lex->token_type == JSON_TOKEN_ARRAY_START)
		{
			if (lex_past_container(lex) != JSON_SUCCESS)
				return false;
		}
		else if (lex->token_type != JSON_TOKEN_STRING &&
				 lex->token_type != JSON_TOKEN_NUMBER &&
				 lex->token_type != JSON_TOKEN_TRUE &&
				 lex->token_type != JSON_TOKEN_FALSE && !isnull)
			return false;
		keys_add(keys, name, len, isnull);
		if (json_lex(lex) != JSON_SUCCESS)
			return false;
	}
	return keys->nkeys > 0;
}

static bool
keys_lexer(const char *text, int textlen, bool rows, PartKeys *keys)
{
	MemoryContext oldcxt;
	bool		ok;

	if (keys->lexcxt == NULL)
		keys->lexcxt = AllocSetContextCreate(keys->cxt, "athena_deferred keys",
											 ALLOCSET_SMALL_SIZES);
	else
		MemoryContextReset(keys->lexcxt);
	oldcxt = MemoryContextSwitchTo(keys->lexcxt);
	ok = keys_lexer_read(text, textlen, rows, keys);
	MemoryContextSwitchTo(oldcxt);
	return ok;
}

/*
 * Read the keys of a part's first object into keys (whose arrays are
 * reused); false if the text is not an object, or an array of objects for
 * PART_ROWS, with at least one key
 */
static bool
part_keys(const DeferredPart *part, PartKeys *keys)
{
	const char *text = part_text(part);
	bool		rows = (part->kind == PART_ROWS);

	if (keys->cxt == NULL)
		keys->cxt = CurrentMemoryContext;
	keys->nkeys = 0;
	keys->escaped = false;
	switch (keys_plain(text, text + part->textlen, rows, keys))
	{
		case KEYS_OK:
			return true;
		case KEYS_ESCAPED:
			keys->nkeys = 0;
			keys->escaped = true;
			return keys_lexer(text, part->textlen, rows, keys);
		default:
			return false;
	}
}

/* The columns of a part, NUL-terminated, for a statement or a COPY */
static void
part_columns(const DeferredPart *part, KeyList *cols)
{
	PartKeys	keys = {0};

	if (!part_keys(part, &keys))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("athena_deferred: queued entry is not a JSON object, or array of objects, with keys")));
	cols->nkeys = keys.nkeys;
	cols->names = palloc(sizeof(char *) * keys.nkeys);
	cols->isnull = keys.isnull;
	for (int i = 0; i < keys.nkeys; i++)
		cols->names[i] = pnstrdup(keys.name[i], keys.len[i]);
	if (keys.lexcxt != NULL)
		MemoryContextDelete(keys.lexcxt);
}

/*
 * While the batch's extent is not known (f->head), entries past the second
 * join it as batchable() says.  Their headers are checked first; their
 * keys need no check when their rows convert the fast way, which they do
 * only if their keys are the batch's columns in order.
 */
static inline bool
feed_header_joins(const CopyFeed *f, const DeferredEntry *entry)
{
	const DeferredEntry *first = f->batch[0];

	return entry->op == DEFERRED_INSERT && entry->nparts == 1 &&
		entry->relid == first->relid && entry->roleid == first->roleid;
}

/*
 * COPY's data source: hand over up to maxread bytes of rows, converting
 * entries as needed; 0 at the end of the batch.  Entries are converted
 * straight into COPY's buffer while there is room for them; one that might
 * not fit goes through out, whence it is handed over in pieces.
 */
static int
copy_feed_read(void *outbuf, int minread pg_attribute_unused(), int maxread)
{
	CopyFeed   *f = copy_feed;
	char	   *dst = outbuf;
	int			done = 0;

	Assert(f != NULL);
	while (done < maxread)
	{
		int			avail = f->out.len - f->outpos;
		const DeferredEntry *entry;
		bool		lazy;
		bool		tried_fast = false;

		if (avail > 0)
		{
			avail = Min(avail, maxread - done);
			memcpy(dst + done, f->out.data + f->outpos, avail);
			f->outpos += avail;
			done += avail;
			continue;
		}
		if (f->next >= f->count)
			break;
		entry = f->batch[f->next];
		lazy = (f->head != NULL && f->next >= 2);
		if (lazy && !feed_header_joins(f, entry))
		{
			f->count = f->next; /* the batch ends here */
			break;
		}
		if (f->next + 2 < f->count)
		{
			/* the entry after next, from the ring: header and text */
			const char *ahead = (const char *) f->batch[f->next + 2];

			feed_prefetch(ahead);
			feed_prefetch(ahead + 64);
		}
		if (feed_bound(entry_first_part(entry)) <= maxread - done)
		{
			const DeferredPart *part = entry_first_part(entry);
			const char *text = part_text(part);
			int			n;

			n = feed_entry_fast(f, text, text + part->textlen, dst + done,
								dst + maxread);
			if (n >= 0)
			{
				f->next++;
				done += n;
				continue;
			}
			tried_fast = true;
		}
		if (lazy && !batchable(f->batch[0], f->head, entry, &f->keys))
		{
			f->count = f->next; /* the batch ends here */
			break;
		}
		f->next++;
		resetStringInfo(&f->out);
		f->outpos = 0;
		feed_entry(f, entry, tried_fast);
	}
	return done;
}

/*
 * Can COPY insert a batch of rows with these columns into rel and give
 * exactly what INSERT ... SELECT FROM json_populate_recordset() gives?  If
 * so, fill attnums and quote_strings for the columns.  Runs as the queuing
 * role.  Where the answer is no the statement path runs, and with it
 * whatever error or behaviour INSERT has.
 */
static bool
copy_serves(Relation rel, char **colnames, int ncols, AttrNumber *attnums,
			bool *quote_strings)
{
	TupleDesc	desc = RelationGetDescr(rel);
	Bitmapset  *named = NULL;

	/* COPY does not apply rules, and refuses row-level security */
	if ((rel->rd_rel->relkind != RELKIND_RELATION &&
		 rel->rd_rel->relkind != RELKIND_PARTITIONED_TABLE) ||
		rel->rd_rel->relhasrules ||
		check_enable_rls(RelationGetRelid(rel), InvalidOid, true) == RLS_ENABLED)
		return false;

	/*
	 * The statement reaches the table by its schema-qualified name and calls
	 * json_populate_recordset(): privileges COPY would not check.  (A
	 * read-only transaction fails INSERT with its own message.)
	 */
	if (XactReadOnly ||
		pg_namespace_aclcheck(RelationGetNamespace(rel), GetUserId(), ACL_USAGE) != ACLCHECK_OK ||
		pg_proc_aclcheck(F_JSON_POPULATE_RECORDSET, GetUserId(), ACL_EXECUTE) != ACLCHECK_OK)
		return false;

	for (int i = 0; i < ncols; i++)
	{
		Form_pg_attribute att;
		Oid			basetype;

		attnums[i] = attnameAttNum(rel, colnames[i], false);
		if (attnums[i] <= 0)
			return false;
		att = TupleDescAttr(desc, attnums[i] - 1);

		/* COPY writes GENERATED ALWAYS identity columns, INSERT refuses to */
		if (att->attgenerated || att->attidentity == ATTRIBUTE_IDENTITY_ALWAYS)
			return false;

		basetype = getBaseType(att->atttypid);
		if (type_is_array(basetype) || get_typtype(basetype) == TYPTYPE_COMPOSITE)
			return false;
		quote_strings[i] = (basetype == JSONOID || basetype == JSONBOID);
		named = bms_add_member(named, attnums[i]);
	}

	/*
	 * json_populate_recordset(NULL::table, ...) gives every column the rows
	 * do not name a NULL, and checks a domain's constraints against it, so
	 * INSERT fails where a NOT NULL domain column is left to its default;
	 * COPY would take the default.
	 */
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (!att->attisdropped && !bms_is_member(i + 1, named) &&
			get_typtype(att->atttypid) == TYPTYPE_DOMAIN)
			return false;
	}
	return true;
}

/*
 * Insert a batch with COPY, if COPY can serve it (see copy_serves); false
 * if it cannot, with nothing done.  The caller holds RowExclusiveLock on the
 * target and runs as the queuing role.
 */
static bool
insert_by_copy(DeferredEntry **batch, int count, int64 *rows,
			   const PartKeys *head, int *consumed)
{
	KeyList		cols;
	int			ncols;
	MemoryContext copycxt;
	MemoryContext oldcxt;
	Relation	rel;
	CopyFeed   *f;
	AttrNumber *attnums;
	List	   *attnamelist = NIL;
	ParseState *pstate;
	RangeTblEntry *rte;
	CopyFromState cstate;
	List	   *options;

	/*
	 * In the subtransaction's memory: if the COPY fails, its abort frees
	 * what the COPY and the feed allocated.
	 */
	copycxt = AllocSetContextCreate(CurTransactionContext, "athena_deferred copy",
									ALLOCSET_DEFAULT_SIZES);
	oldcxt = MemoryContextSwitchTo(copycxt);

	part_columns(entry_first_part(batch[0]), &cols);
	ncols = cols.nkeys;
	f = palloc0(sizeof(CopyFeed));
	f->batch = batch;
	f->count = count;
	f->head = head;
	f->keys.cxt = copycxt;
	f->ncols = ncols;
	f->colnames = cols.names;
	f->quote_strings = palloc(sizeof(bool) * ncols);
	f->valstart = palloc(sizeof(int) * ncols);
	f->vallen = palloc(sizeof(int) * ncols);
	f->qnames = palloc(sizeof(char *) * ncols);
	f->qlen = palloc(sizeof(int) * ncols);
	for (int i = 0; i < ncols; i++)
	{
		StringInfoData qname;

		/* as JsonbToCString() writes a key */
		initStringInfo(&qname);
		escape_json(&qname, f->colnames[i]);
		f->qnames[i] = qname.data;
		f->qlen[i] = qname.len;
	}
	attnums = palloc(sizeof(AttrNumber) * ncols);
	for (int i = 0; i < ncols; i++)
		attnamelist = lappend(attnamelist, makeString(f->colnames[i]));

	rel = table_open(batch[0]->relid, NoLock);
	if (!copy_serves(rel, f->colnames, ncols, attnums, f->quote_strings))
	{
		table_close(rel, NoLock);
		MemoryContextSwitchTo(oldcxt);
		MemoryContextDelete(copycxt);
		return false;
	}

	/* the checks COPY leaves to its caller: INSERT on the columns */
	pstate = make_parsestate(NULL);
	pstate->p_sourcetext = "athena_deferred flush";
	rte = addRangeTableEntryForRelation(pstate, rel, RowExclusiveLock,
										NULL, false, false)->p_rte;
	rte->requiredPerms = ACL_INSERT;
	for (int i = 0; i < ncols; i++)
		rte->insertedCols = bms_add_member(rte->insertedCols,
										   attnums[i] - FirstLowInvalidHeapAttributeNumber);
	ExecCheckRTPerms(pstate->p_rtable, true);

	initStringInfo(&f->rowbuf);
	initStringInfo(&f->scratch);
	initStringInfo(&f->out);
	f->lexcxt = AllocSetContextCreate(copycxt, "athena_deferred copy rows",
									  ALLOCSET_DEFAULT_SIZES);
	copy_feed = f;

	/* the rows are the database's text already: no conversion */
	options = list_make1(makeDefElem("encoding",
									 (Node *) makeString(pstrdup(GetDatabaseEncodingName())), -1));

	/* like a statement: see what came before, with a snapshot of its own */
	CommandCounterIncrement();
	PushActiveSnapshot(GetTransactionSnapshot());
	cstate = BeginCopyFrom(pstate, rel, NULL, NULL, false, copy_feed_read,
						   attnamelist, options);
	*rows = (int64) CopyFrom(cstate);
	EndCopyFrom(cstate);
	PopActiveSnapshot();
	CommandCounterIncrement();
	if (consumed != NULL)
		*consumed = f->count;

	copy_feed = NULL;
	table_close(rel, NoLock);
	free_parsestate(pstate);
	MemoryContextSwitchTo(oldcxt);
	MemoryContextDelete(copycxt);
	return true;
}

/*
 * Apply a batch (one entry, or batchable inserts) to relname; rows touched.
 * With head (see settle_batch_lazy): by COPY only, as many of the entries
 * as form a batch, which says consumed; 0 if COPY cannot serve it.
 */
static int64
apply_batch(DeferredEntry **batch, int count, const char *relname,
			const PartKeys *head, int *consumed)
{
	int64		touched = 0;

	if (head != NULL)
	{
		if (!insert_by_copy(batch, count, &touched, head, consumed))
			*consumed = 0;
		return touched;
	}

	if (count == 1)
	{
		flush_apply_entry(batch[0], relname, &touched);
		return touched;
	}

	if (insert_by_copy(batch, count, &touched, NULL, NULL))
		return touched;

	for (int i = 0; i < count; i += FLUSH_STATEMENT_ENTRIES)
		touched += insert_by_statement(batch + i, Min(count - i, FLUSH_STATEMENT_ENTRIES), relname);
	return touched;
}

typedef struct BatchArgs
{
	DeferredEntry **batch;
	int			count;
	int64		rows;			/* out: rows touched */
	const PartKeys *head;		/* see apply_batch */
	int			consumed;		/* out, with head */
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
	a->rows = apply_batch(a->batch, a->count, relname, a->head, &a->consumed);
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
	BatchArgs	args = {batch, count, 0, NULL, 0};
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
	QueueTake  *take;			/* the entries, and what becomes of each */
	const char *schema;
	NotifyTally *tally;
	List	   *retry;
	int64		applied;
	int64		failed;
	int64		dead;
} FlushOutcome;

/*
 * Entry i of the flush failed: retry it later, or dead-letter it after its
 * last attempt.  What the retry list and the dead letter get is a copy that
 * carries the new attempt count; the ring gets it at queue_settle().
 */
static void
entry_failed(int i, ErrorData *edata, FlushOutcome *out)
{
	const DeferredEntry *taken = out->take->entries[i];
	DeferredEntry *e = palloc(taken->size);

	memcpy(e, taken, taken->size);
	if (out->take->attempts[i] < ENTRY_MAX_ATTEMPTS)
		out->take->attempts[i]++;
	e->attempts = out->take->attempts[i];
	out->failed++;
	queue_note_error(e->qseq, edata->message);
	if (e->attempts >= (uint32) deferred_max_flush_attempts &&
		dead_letter_in_subxact(out->schema, e, edata))
	{
		out->take->states[i] = ENTRY_DEAD;
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
	int			first = batch - out->take->entries;

	if (edata == NULL)
	{
		memset(out->take->states + first, ENTRY_DONE, count);
		out->applied += count;
	}
	else if (count == 1)
		entry_failed(first, edata, out);
	else
	{
		FreeErrorData(edata);
		settle_batch(batch, count / 2, out);
		settle_batch(batch + count / 2, count - count / 2, out);
	}
}

/*
 * Apply by one COPY the batch that starts at batch[0] (whose keys are head)
 * and batch[1] (batchable with it), among the next count entries, without
 * reading the keys of the others first: the COPY feed ends the batch at the
 * first entry that cannot join it (see copy_feed_read), so the batch is the
 * one flush_run() would have formed.  Returns how many entries it settled;
 * 0 if COPY cannot serve the batch, and -1 if the COPY failed (rolled
 * back): then the caller forms the batch and settles it as usual, or, after
 * a failure, its halves.
 */
static int
settle_batch_lazy(DeferredEntry **batch, int count, const PartKeys *head,
				  FlushOutcome *out)
{
	BatchArgs	args = {batch, count, 0, head, 0};
	ErrorData  *edata = run_in_subxact(apply_batch_as_role, &args);
	int			first = batch - out->take->entries;

	if (edata != NULL)
	{
		disable_timeout(STATEMENT_TIMEOUT, false);
		FreeErrorData(edata);
		return -1;
	}
	if (args.consumed == 0)
		return 0;
	Assert(args.consumed >= 2 && args.consumed <= count);
	notify_tally_add(out->tally, batch[0]->relid, batch[0]->op, args.consumed, args.rows);
	memset(out->take->states + first, ENTRY_DONE, args.consumed);
	out->applied += args.consumed;
	return args.consumed;
}

/*
 * Recovery: which of the n entry ids a committed flush moved to
 * deferred_dead_letters: that flush inserted their rows in its own
 * transaction.  Returns how many, sorted, in *dead.
 */
int
flush_dead_lettered(const int64 *ids, int n, int64 **dead)
{
	MemoryContext caller = CurrentMemoryContext;
	Datum	   *elems = palloc(sizeof(Datum) * n);
	Datum		arg;
	Oid			argtype = INT8ARRAYOID;
	StringInfoData sql;
	char	   *schema;
	int			ndead = 0;

	for (int i = 0; i < n; i++)
		elems[i] = Int64GetDatum(ids[i]);
	arg = PointerGetDatum(construct_array(elems, n, INT8OID, sizeof(int64), FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	*dead = palloc(sizeof(int64) * n);

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	schema = flush_extension_schema();
	if (schema != NULL)
	{
		initStringInfo(&sql);
		appendStringInfo(&sql, "SELECT id FROM %s.deferred_dead_letters WHERE id = ANY($1) ORDER BY id",
						 quote_identifier(schema));
		if (SPI_execute_with_args(sql.data, 1, &argtype, &arg, NULL, true, 0) != SPI_OK_SELECT)
			elog(ERROR, "could not read deferred_dead_letters");
		for (uint64 i = 0; i < SPI_processed && ndead < n; i++)
		{
			bool		isnull;
			Datum		id = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull);

			if (!isnull)
				(*dead)[ndead++] = DatumGetInt64(id);
		}
	}
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(caller);
	return ndead;
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
	out.take = &flush_take;
	if (flush_take.cxt == NULL)
		flush_take.cxt = AllocSetContextCreate(TopMemoryContext, "athena_deferred flush entries",
											   ALLOCSET_DEFAULT_SIZES);
	flush_take.n = 0;
	if (out.schema)
		queue_take(&flush_take, max_entries);
	n = flush_take.n;
	entries = flush_take.entries;
	positions = flush_take.positions;
	if (n > 0)
	{
		Oid			shown_relid = InvalidOid;
		PartKeys	head = {0};
		PartKeys	next = {0};

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
			j = i + 1;
			if (batch_head(entries[i], &head))
			{
				int			done = 0;

				if (j < n && batchable(entries[i], &head, entries[j], &next))
					done = settle_batch_lazy(entries + i, Min(n - i, FLUSH_BATCH_ENTRIES),
											 &head, &out);
				if (done > 0)
				{
					j = i + done;
					continue;
				}
				while (j < n && j - i < FLUSH_BATCH_ENTRIES &&
					   batchable(entries[i], &head, entries[j], &next))
					j++;
				if (done < 0)
				{
					/* that batch failed as a whole already: on to its halves */
					settle_batch(entries + i, (j - i) / 2, &out);
					settle_batch(entries + i + (j - i) / 2, (j - i) - (j - i) / 2, &out);
					continue;
				}
			}
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
		queue_settle(&flush_take, out.applied, out.failed, out.dead, duration);
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
