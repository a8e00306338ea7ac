/*-------------------------------------------------------------------------
 *
 * enqueue.c
 *		The SQL entry points: validate a mutation, stage it in the calling
 *		transaction, and hand it to the queue when that transaction commits.
 *
 * Staging works like NOTIFY: a call validates its input, serializes the
 * entry and accounts for its queue space (so a full queue fails the call,
 * not the commit); the transaction's entries get their queue positions at
 * pre-commit and are published at commit, which cannot fail.  Rolling
 * back a transaction or a savepoint discards what it staged.
 *
 * This file never applies a deferred entry; with athena_deferred.enabled
 * off it applies the caller's mutation at once, in the caller's
 * transaction, through the same statements the worker uses.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/relation.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/catalog.h"
#include "catalog/pg_class.h"
#include "catalog/pg_sequence.h"
#include "commands/dbcommands.h"
#include "commands/sequence.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "parser/parse_relation.h"
#include "pgstat.h"
#include "storage/lmgr.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "athena_deferred.h"

PG_FUNCTION_INFO_V1(deferred_insert);
PG_FUNCTION_INFO_V1(deferred_update);
PG_FUNCTION_INFO_V1(deferred_delete);
PG_FUNCTION_INFO_V1(deferred_flush);

void		enqueue_init(void);

/* An entry staged by the current transaction */
typedef struct StagedEntry
{
	int			nestlevel;		/* (sub)transaction that queued it */
	DeferredEntry *entry;		/* serialized, in TopTransactionContext */
} StagedEntry;

/* Entries of the current transaction, in call order */
static List *staged = NIL;

/* Set at pre-commit: the staged entries, their ring positions, and whether
 * their WAL records were written */
static DeferredEntry **staged_entries = NULL;
static uint64 *staged_positions = NULL;
static int	staged_npositions = 0;
static bool staged_logged = false;

/* Cached per backend */
static Oid	allowed_database_oid = InvalidOid;
static Oid	id_sequence_oid = InvalidOid;

/*
 * Refuse calls the queue cannot serve: on a standby, in a read-only
 * transaction, or outside the database athena_deferred.database restricts
 * queuing to.
 */
static void
check_call_context(const char *fname)
{
	if (deferred_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("athena_deferred must be loaded via shared_preload_libraries"),
				 errhint("Add athena_deferred to shared_preload_libraries in postgresql.conf and restart the server.")));

	PreventCommandIfReadOnly(fname);
	PreventCommandDuringRecovery(fname);

	/* WAL records are JSON, which jansson writes only in UTF-8 */
	if (deferred_wal_enabled && GetDatabaseEncoding() != PG_UTF8 &&
		GetDatabaseEncoding() != PG_SQL_ASCII)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("athena_deferred needs a UTF8 database while athena_deferred.wal_enabled is on"),
				 errdetail("This database's encoding is %s.", GetDatabaseEncodingName())));

	if (deferred_database[0] != '\0')
	{
		if (!OidIsValid(allowed_database_oid))
			allowed_database_oid = get_database_oid(deferred_database, true);
		if (MyDatabaseId != allowed_database_oid)
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("deferred mutations can only be queued in database \"%s\"",
							deferred_database),
					 errhint("athena_deferred.database restricts queuing to one database; set it to an empty string to allow every database.")));
	}
}

/* Error for a NULL argument: the functions are not strict on purpose */
static void
check_not_null(FunctionCallInfo fcinfo, int argno, const char *argname)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("argument \"%s\" must not be null", argname)));
}

/*
 * What a call needs to know about its target table, cached per backend so
 * that a call neither opens the relation nor reads the catalogs, but for
 * the privilege check (which must see the privileges of the moment).
 *
 * A description is marked stale by the relcache invalidation of its table,
 * which every change a call depends on sends: ALTER TABLE (columns added,
 * dropped, renamed, made generated), GRANT and REVOKE, DROP, and the cache
 * resets that follow a lost invalidation.  Each call still locks the table
 * (which takes in what other sessions committed); the calling
 * transaction's own DDL reaches the callback at the next command and its
 * rollback at abort.  Targets are passed as regclass, so name
 * lookup (and search_path) is done before the call, by the caller's parser
 * or plan, and the cache is by OID.
 *
 * The callback only marks a description stale: invalidations are also
 * processed in the middle of a call (on any catalog access), and the call
 * keeps using what it looked up.  A stale description is rebuilt, and its
 * memory replaced, at the start of the next call on that table.
 */
typedef struct TargetColumn
{
	const char *name;			/* NUL-terminated */
	int			len;
	AttrNumber	attnum;
	bool		generated;
} TargetColumn;

typedef struct TargetDesc
{
	Oid			relid;			/* hash key */
	bool		valid;
	char		relkind;
	int			ncolumns;
	TargetColumn *columns;		/* sorted by name (length, then bytes) */
} TargetDesc;

/* The keys of one JSON object, with the columns they name */
typedef struct CallKeys
{
	KeyList		list;			/* names point into the TargetDesc */
	AttrNumber *attnums;
} CallKeys;

static HTAB *target_cache = NULL;
static MemoryContext target_cache_cxt = NULL;

static void
target_cache_invalidate(Datum arg pg_attribute_unused(), Oid relid)
{
	HASH_SEQ_STATUS status;
	TargetDesc *desc;

	if (target_cache == NULL)
		return;
	if (OidIsValid(relid))
	{
		desc = hash_search(target_cache, &relid, HASH_FIND, NULL);
		if (desc != NULL)
			desc->valid = false;
		return;
	}
	hash_seq_init(&status, target_cache);
	while ((desc = hash_seq_search(&status)) != NULL)
		desc->valid = false;
}

static int
target_column_cmp(const void *a, const void *b)
{
	const TargetColumn *ca = a;
	const TargetColumn *cb = b;

	if (ca->len != cb->len)
		return ca->len < cb->len ? -1 : 1;
	return memcmp(ca->name, cb->name, ca->len);
}

/* The name of relid for an error message, looked up only then */
static const char *
target_name(Oid relid)
{
	char	   *name = get_rel_name(relid);

	return name ? name : psprintf("%u", relid);
}

/*
 * Open the target and check that it is a table a user could write with
 * plain DML, and that the worker will be able to see; describe its columns
 * into desc.
 */
static void
target_describe(TargetDesc *desc)
{
	Relation	rel;
	char		relkind;
	TupleDesc	tupdesc;
	int			n = 0;
	Size		names = 0;
	TargetColumn *columns;
	char	   *p;

	rel = try_relation_open(desc->relid, NoLock);
	if (rel == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation with OID %u does not exist", desc->relid)));

	relkind = rel->rd_rel->relkind;
	if (relkind != RELKIND_RELATION && relkind != RELKIND_PARTITIONED_TABLE)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("cannot queue mutations for \"%s\"",
						RelationGetRelationName(rel)),
				 errdetail("Only ordinary and partitioned tables can be targets.")));
	if (IsCatalogRelation(rel))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("cannot queue mutations for system catalog \"%s\"",
						RelationGetRelationName(rel))));
	if (rel->rd_rel->relpersistence == RELPERSISTENCE_TEMP)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("cannot queue mutations for temporary table \"%s\"",
						RelationGetRelationName(rel)),
				 errdetail("The worker cannot see this session's temporary tables.")));

	/* the columns a call may name: not dropped, not system columns */
	tupdesc = RelationGetDescr(rel);
	for (int i = 0; i < tupdesc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(tupdesc, i);

		if (!att->attisdropped)
		{
			n++;
			names += strlen(NameStr(att->attname)) + 1;
		}
	}

	/* one chunk for the array and the names, so that a rebuild frees one */
	columns = MemoryContextAlloc(target_cache_cxt,
								 MAXALIGN(sizeof(TargetColumn) * Max(n, 1)) + names);
	p = (char *) columns + MAXALIGN(sizeof(TargetColumn) * Max(n, 1));
	n = 0;
	for (int i = 0; i < tupdesc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(tupdesc, i);
		int			len;

		if (att->attisdropped)
			continue;
		len = strlen(NameStr(att->attname));
		memcpy(p, NameStr(att->attname), len + 1);
		columns[n].name = p;
		columns[n].len = len;
		columns[n].attnum = att->attnum;
		columns[n].generated = (att->attgenerated != '\0');
		p += len + 1;
		n++;
	}
	qsort(columns, n, sizeof(TargetColumn), target_column_cmp);

	if (desc->columns != NULL)
		pfree(desc->columns);
	desc->columns = columns;
	desc->ncolumns = n;
	desc->relkind = relkind;
	relation_close(rel, NoLock);
}

/* The description of the target relid, up to date as of this call */
static TargetDesc *
target_lookup(Oid relid)
{
	TargetDesc *desc;
	bool		found;

	if (target_cache == NULL)
	{
		HASHCTL		ctl;

		target_cache_cxt = AllocSetContextCreate(CacheMemoryContext,
												 "athena_deferred targets",
												 ALLOCSET_SMALL_SIZES);
		ctl.keysize = sizeof(Oid);
		ctl.entrysize = sizeof(TargetDesc);
		ctl.hcxt = target_cache_cxt;
		target_cache = hash_create("athena_deferred targets", 16, &ctl,
								   HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}

	/*
	 * Held until the entry is staged, as when the call opened the table:
	 * the call waits for DDL in progress on it, and taking the lock takes
	 * in the invalidations of what other sessions committed.
	 */
	LockRelationOid(relid, AccessShareLock);

	desc = hash_search(target_cache, &relid, HASH_ENTER, &found);
	if (!found)
	{
		desc->valid = false;
		desc->columns = NULL;
		desc->ncolumns = 0;
	}
	while (!desc->valid)
	{
		/*
		 * Set before describing, so that an invalidation that arrives while
		 * the relation is read (opening it processes invalidations) makes us
		 * describe it again.
		 */
		desc->valid = true;
		PG_TRY();
		{
			target_describe(desc);
		}
		PG_CATCH();
		{
			/* not a table we can serve (or gone): forget it */
			if (desc->columns != NULL)
				pfree(desc->columns);
			(void) hash_search(target_cache, &relid, HASH_REMOVE, NULL);
			PG_RE_THROW();
		}
		PG_END_TRY();
	}
	return desc;
}

/* The column named name (len bytes, not NUL-terminated), or NULL */
static const TargetColumn *
target_column(const TargetDesc *desc, const char *name, int len)
{
	int			lo = 0;
	int			hi = desc->ncolumns - 1;

	while (lo <= hi)
	{
		int			mid = (lo + hi) / 2;
		const TargetColumn *col = &desc->columns[mid];
		int			cmp;

		if (col->len != len)
			cmp = col->len < len ? -1 : 1;
		else
			cmp = memcmp(col->name, name, len);
		if (cmp == 0)
			return col;
		if (cmp < 0)
			lo = mid + 1;
		else
			hi = mid - 1;
	}
	return NULL;
}

/* Check the caller's privilege on the table, or else on each column */
static void
check_privilege(const TargetDesc *desc, AclMode mode, const CallKeys *keys)
{
	Oid			userid = GetUserId();
	int			i;

	if (pg_class_aclcheck(desc->relid, userid, mode) == ACLCHECK_OK)
		return;
	if (keys == NULL)
		aclcheck_error(ACLCHECK_NO_PRIV, get_relkind_objtype(desc->relkind),
					   target_name(desc->relid));
	for (i = 0; i < keys->list.nkeys; i++)
	{
		AttrNumber	attnum = keys->attnums[i];

		if (pg_attribute_aclcheck(desc->relid, attnum, userid, mode) != ACLCHECK_OK)
			aclcheck_error(ACLCHECK_NO_PRIV, get_relkind_objtype(desc->relkind),
						   target_name(desc->relid));
	}
}

/*
 * Read the keys of one JSON object and check that each names a column of
 * the target that the operation may write (assigning) or compare.  The
 * names point into desc.
 */
static void
read_keys(JsonbContainer *obj, const TargetDesc *desc, bool assigning,
		  CallKeys *keys)
{
	JsonbIterator *it = JsonbIteratorInit(obj);
	JsonbValue	v;
	JsonbIteratorToken tok;
	int			n = 0;
	int			max = Max(JsonContainerSize(obj), 1);
	const TargetColumn *col = NULL;

	keys->list.names = palloc(sizeof(char *) * max);
	keys->list.isnull = NULL;	/* the flush reads them from the text */
	keys->attnums = palloc(sizeof(AttrNumber) * max);

	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
		{
			col = target_column(desc, v.val.string.val, v.val.string.len);
			if (col == NULL)
				ereport(ERROR,
						(errcode(ERRCODE_UNDEFINED_COLUMN),
						 errmsg("column \"%s\" of relation \"%s\" does not exist",
								pnstrdup(v.val.string.val, v.val.string.len),
								target_name(desc->relid))));
			if (assigning && col->generated)
				ereport(ERROR,
						(errcode(ERRCODE_GENERATED_ALWAYS),
						 errmsg("column \"%s\" of relation \"%s\" is a generated column",
								col->name, target_name(desc->relid)),
						 errdetail("Generated columns cannot be written.")));
			/* names the cached description's; they outlive the call */
			keys->list.names[n] = (char *) col->name;
			keys->attnums[n] = col->attnum;
			n++;
		}
	}
	keys->list.nkeys = n;
}

static bool
keylists_equal(const KeyList *a, const KeyList *b)
{
	if (a->nkeys != b->nkeys)
		return false;
	for (int i = 0; i < a->nkeys; i++)
		if (strcmp(a->names[i], b->names[i]) != 0)
			return false;
	return true;
}

/* An object argument: a non-empty JSON object */
static JsonbContainer *
object_argument(Jsonb *jb, const char *argname)
{
	if (!JB_ROOT_IS_OBJECT(jb))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"%s\" must be a JSON object", argname)));
	if (JB_ROOT_COUNT(jb) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"%s\" must not be an empty object", argname)));
	return &jb->root;
}

/*
 * Next entry id.  Ids come from the database's deferred_entry_id_seq in
 * blocks of its increment (1024 since version 0.2.0), handed out one by one
 * by the backend that took the block: one nextval -- which WAL-logs now and
 * then, and so takes an xid and a WAL flush at commit -- per block rather
 * than per call.  Ids are unique within the database; across backends they
 * are not in call order.  A block's start is durable before any of its ids
 * is acknowledged: a transaction with an xid flushes PostgreSQL's WAL
 * before writing ours (pre-commit).
 */
static int64
next_entry_id(void)
{
	static int64 next_id = 0;
	static int64 id_limit = 0;
	HeapTuple	seqtuple;
	int64		increment;

	if (next_id < id_limit)
		return next_id++;

	if (!OidIsValid(id_sequence_oid) ||
		!SearchSysCacheExists1(RELOID, ObjectIdGetDatum(id_sequence_oid)))
	{
		id_sequence_oid = get_relname_relid("deferred_entry_id_seq",
											deferred_extension_schema());
		if (!OidIsValid(id_sequence_oid))
			elog(ERROR, "sequence deferred_entry_id_seq of athena_deferred is missing");
	}
	seqtuple = SearchSysCache1(SEQRELID, ObjectIdGetDatum(id_sequence_oid));
	if (!HeapTupleIsValid(seqtuple))
		elog(ERROR, "cache lookup failed for sequence %u", id_sequence_oid);
	increment = Max(((Form_pg_sequence) GETSTRUCT(seqtuple))->seqincrement, 1);
	ReleaseSysCache(seqtuple);

	next_id = nextval_internal(id_sequence_oid, false);
	id_limit = next_id + increment;
	return next_id++;
}

/*
 * Buffers a call builds its entry in, kept from call to call: the entry
 * (header, parts) and the JSON text of the part being built.  A call
 * copies the finished entry out before anything can call us again (a
 * trigger, in immediate mode).
 */
static StringInfo call_entry = NULL;
static StringInfo call_text = NULL;

static void
call_buffers_reset(void)
{
	if (call_entry == NULL)
	{
		MemoryContext oldcxt = MemoryContextSwitchTo(TopMemoryContext);

		call_entry = makeStringInfo();
		call_text = makeStringInfo();
		MemoryContextSwitchTo(oldcxt);
	}
	entry_reset(call_entry);
	resetStringInfo(call_text);
}

/* After a large entry, give its memory back rather than keep it */
static void
call_buffers_trim(void)
{
	const int	large = 1024 * 1024;

	if (call_entry->maxlen > large || call_text->maxlen > large)
	{
		pfree(call_entry->data);
		pfree(call_text->data);
		pfree(call_entry);
		pfree(call_text);
		call_entry = call_text = NULL;
	}
}

/*
 * Finish the entry in call_entry and either apply it at once (enabled =
 * off, returns NULL) or stage it in the current transaction (returns its
 * id).
 */
static Datum
entry_finish(FunctionCallInfo fcinfo, const TargetDesc *desc, DeferredOp op,
			 int nparts)
{
	DeferredEntry hdr;
	Size		size = call_entry->len;

	memset(&hdr, 0, sizeof(hdr));
	hdr.size = size;
	hdr.op = op;
	hdr.nparts = nparts;
	hdr.dbid = MyDatabaseId;
	hdr.roleid = GetUserId();
	hdr.relid = desc->relid;
	hdr.enqueued_at = GetCurrentTimestamp();

	if (!deferred_enabled)
	{
		NotifyTally *tally = notify_tally_create();
		Oid			nspid = get_rel_namespace(hdr.relid);
		char	   *relname = quote_qualified_identifier(get_namespace_name(nspid),
														 get_rel_name(hdr.relid));
		DeferredEntry *entry = palloc(size);
		int64		rows;

		UnlockRelationOid(hdr.relid, AccessShareLock);

		/* the statement may call us again, from a trigger */
		memcpy(entry, call_entry->data, size);
		memcpy(entry, &hdr, sizeof(hdr));
		call_buffers_trim();
		SPI_connect();
		flush_apply_entry(entry, relname, &rows);
		SPI_finish();
		notify_tally_add(tally, hdr.relid, op, 1, rows);
		notify_tally_send(tally);
		PG_RETURN_NULL();
	}
	else
	{
		StagedEntry *se;

		UnlockRelationOid(hdr.relid, AccessShareLock);
		hdr.id = next_entry_id();

		queue_account(size, deferred_enqueue_timeout_ms);

		/* the space is ours until the entry is staged: give it back on failure */
		PG_TRY();
		{
			MemoryContext oldcxt = MemoryContextSwitchTo(TopTransactionContext);

			/* one chunk for both, freed with the transaction */
			se = palloc(MAXALIGN(sizeof(StagedEntry)) + size);
			se->nestlevel = GetCurrentTransactionNestLevel();
			se->entry = (DeferredEntry *) ((char *) se + MAXALIGN(sizeof(StagedEntry)));
			memcpy(se->entry, call_entry->data, size);
			memcpy(se->entry, &hdr, sizeof(hdr));
			staged = lappend(staged, se);
			MemoryContextSwitchTo(oldcxt);
		}
		PG_CATCH();
		{
			queue_unaccount(size);
			PG_RE_THROW();
		}
		PG_END_TRY();
		call_buffers_trim();

		PG_RETURN_INT64(hdr.id);
	}
}

/*
 * deferred_insert(target regclass, rows jsonb) RETURNS bigint
 *
 * rows is one object or a non-empty array of objects.  Consecutive rows
 * with the same keys form one part, inserted by one statement.
 */
Datum
deferred_insert(PG_FUNCTION_ARGS)
{
	TargetDesc *desc;
	Jsonb	   *rows;
	StringInfo	text;
	CallKeys	group = {0};
	int			nparts = 0;
	int			nrows = 0;
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;

	check_call_context("deferred_insert()");
	check_not_null(fcinfo, 0, "target");
	check_not_null(fcinfo, 1, "rows");
	desc = target_lookup(PG_GETARG_OID(0));
	rows = PG_GETARG_JSONB_P(1);

	if (JB_ROOT_IS_SCALAR(rows) || !(JB_ROOT_IS_OBJECT(rows) || JB_ROOT_IS_ARRAY(rows)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"rows\" must be a JSON object or a non-empty array of objects")));
	if (JB_ROOT_IS_ARRAY(rows) && JB_ROOT_COUNT(rows) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"rows\" must not be an empty array")));

	call_buffers_reset();
	text = call_text;

	/* an object is one row; an array is walked element by element */
	if (JB_ROOT_IS_OBJECT(rows))
	{
		v.type = jbvBinary;
		v.val.binary.data = &rows->root;
		it = NULL;
		tok = WJB_ELEM;
	}
	else
	{
		it = JsonbIteratorInit(&rows->root);
		tok = JsonbIteratorNext(&it, &v, true);		/* WJB_BEGIN_ARRAY */
		tok = JsonbIteratorNext(&it, &v, true);
	}

	for (; tok == WJB_ELEM; tok = it ? JsonbIteratorNext(&it, &v, true) : WJB_DONE)
	{
		CallKeys	keys;

		if (v.type != jbvBinary || !JsonContainerIsObject(v.val.binary.data))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("element %d of argument \"rows\" is not a JSON object", nrows + 1)));
		if (JsonContainerSize(v.val.binary.data) == 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("element %d of argument \"rows\" is an empty object", nrows + 1),
					 errhint("Name at least one column; absent columns take their defaults.")));

		read_keys(v.val.binary.data, desc, true, &keys);
		if (nrows > 0 && !keylists_equal(&keys.list, &group.list))
		{
			if (nparts + 1 >= PG_UINT16_MAX)
				ereport(ERROR,
						(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
						 errmsg("argument \"rows\" changes its set of columns too often"),
						 errdetail("Rows are grouped into runs with the same columns; at most %d runs fit in one entry.",
								   PG_UINT16_MAX - 1),
						 errhint("Sort the rows by the columns they name, or split them into several calls.")));
			appendStringInfoChar(text, ']');
			entry_add_part(call_entry, PART_ROWS, text->data, text->len);
			nparts++;
			resetStringInfo(text);
		}
		if (text->len == 0)
		{
			check_privilege(desc, ACL_INSERT, &keys);
			group = keys;
			appendStringInfoChar(text, '[');
		}
		else
			appendStringInfoChar(text, ',');
		(void) JsonbToCString(text, v.val.binary.data, 64);
		nrows++;
	}
	appendStringInfoChar(text, ']');
	entry_add_part(call_entry, PART_ROWS, text->data, text->len);
	nparts++;

	return entry_finish(fcinfo, desc, DEFERRED_INSERT, nparts);
}

/* Add a match or changes part: an object argument whose keys name columns */
static void
add_object_part(const TargetDesc *desc, Jsonb *arg, const char *argname,
				DeferredPartKind kind, AclMode mode)
{
	JsonbContainer *obj = object_argument(arg, argname);
	CallKeys	keys;

	read_keys(obj, desc, kind == PART_CHANGES, &keys);
	check_privilege(desc, mode, &keys);
	resetStringInfo(call_text);
	(void) JsonbToCString(call_text, obj, VARSIZE(arg));
	entry_add_part(call_entry, kind, call_text->data, call_text->len);
}

/* deferred_update(target regclass, match jsonb, changes jsonb) RETURNS bigint */
Datum
deferred_update(PG_FUNCTION_ARGS)
{
	TargetDesc *desc;

	check_call_context("deferred_update()");
	check_not_null(fcinfo, 0, "target");
	check_not_null(fcinfo, 1, "match");
	check_not_null(fcinfo, 2, "changes");
	desc = target_lookup(PG_GETARG_OID(0));

	call_buffers_reset();
	add_object_part(desc, PG_GETARG_JSONB_P(1), "match", PART_MATCH, ACL_SELECT);
	add_object_part(desc, PG_GETARG_JSONB_P(2), "changes", PART_CHANGES, ACL_UPDATE);

	return entry_finish(fcinfo, desc, DEFERRED_UPDATE, 2);
}

/* deferred_delete(target regclass, match jsonb) RETURNS bigint */
Datum
deferred_delete(PG_FUNCTION_ARGS)
{
	TargetDesc *desc;

	check_call_context("deferred_delete()");
	check_not_null(fcinfo, 0, "target");
	check_not_null(fcinfo, 1, "match");
	desc = target_lookup(PG_GETARG_OID(0));
	check_privilege(desc, ACL_DELETE, NULL);

	call_buffers_reset();
	add_object_part(desc, PG_GETARG_JSONB_P(1), "match", PART_MATCH, ACL_SELECT);

	return entry_finish(fcinfo, desc, DEFERRED_DELETE, 1);
}

/*
 * deferred_flush(timeout_ms integer) RETURNS bigint
 *
 * Wakes the worker and waits until every entry committed before the call is
 * applied or dead-lettered.  Returns how many entries were applied
 * meanwhile.
 */
Datum
deferred_flush(PG_FUNCTION_ARGS)
{
	DeferredShared *q = deferred_shared;
	int			timeout_ms = PG_ARGISNULL(0) ? 30000 : PG_GETARG_INT32(0);
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), timeout_ms);
	uint64		target = 0;
	int64		applied_before;
	int64		applied_after;

	check_call_context("deferred_flush()");

	applied_before = q->applied;

	for (;;)
	{
		bool		settled;
		long		remaining;

		/*
		 * Before recovery, entries committed before a restart are not in
		 * the queue yet: the target is taken once they are.
		 */
		if (target == 0)
			target = queue_request_flush();
		settled = target != 0 && queue_flushed(target);
		applied_after = q->applied;
		if (settled)
			break;

		remaining = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);
		if (remaining <= 0)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("deferred flush did not finish within %d ms", timeout_ms),
					 errhint("Check that the athena_deferred worker is running and what it logs.")));
		ConditionVariableTimedSleep(&q->settled_cv, Min(remaining, 1000),
									PG_WAIT_EXTENSION);
	}
	ConditionVariableCancelSleep();

	PG_RETURN_INT64(applied_after - applied_before);
}

/* Forget the staged entries; their memory goes with the transaction */
static void
staged_reset(void)
{
	staged = NIL;
	staged_entries = NULL;
	staged_positions = NULL;
	staged_npositions = 0;
	staged_logged = false;
}

/* Is id among the entries the current transaction has staged? */
bool
enqueue_staged(int64 id)
{
	ListCell   *lc;

	foreach(lc, staged)
	{
		if (((StagedEntry *) lfirst(lc))->entry->id == id)
			return true;
	}
	return false;
}

/* Tell deferred_wait() that these staged entries will never be applied */
static void
note_rolled_back(List *entries)
{
	int64	   *ids = palloc(sizeof(int64) * Max(list_length(entries), 1));
	int			n = 0;
	ListCell   *lc;

	foreach(lc, entries)
		ids[n++] = ((StagedEntry *) lfirst(lc))->entry->id;
	queue_note_rolled_back(ids, n);
	pfree(ids);
}

static Size
staged_bytes(List *entries)
{
	Size		total = 0;
	ListCell   *lc;

	foreach(lc, entries)
		total += ((StagedEntry *) lfirst(lc))->entry->size;
	return total;
}

/*
 * At pre-commit the transaction's entries take their places in the queue;
 * at commit they are published; on abort they are withdrawn.
 */
static void
enqueue_xact_callback(XactEvent event, void *arg pg_attribute_unused())
{
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
			if (staged != NIL)
			{
				int			n = list_length(staged);
				TransactionId xid = GetTopTransactionIdIfAny();
				int			i = 0;
				ListCell   *lc;
				uint64		wal_end;

				staged_entries = MemoryContextAlloc(TopTransactionContext, sizeof(DeferredEntry *) * n);
				staged_positions = MemoryContextAlloc(TopTransactionContext, sizeof(uint64) * n);
				foreach(lc, staged)
					staged_entries[i++] = ((StagedEntry *) lfirst(lc))->entry;
				queue_reserve(staged_entries, staged_positions, n);
				staged_npositions = n;

				/*
				 * A transaction that also wrote has an xid, and recovery asks
				 * the commit log about it: its records must be in
				 * PostgreSQL's WAL first, or after a crash the xid could be
				 * handed out again and look committed.
				 */
				if (TransactionIdIsValid(xid) && XactLastRecEnd != 0)
					XLogFlush(XactLastRecEnd);

				/*
				 * Logged, and durable per wal_sync, before the commit
				 * returns.  If the write fails part way, the abort writes a
				 * marker for whatever reached the log.
				 */
				deferred_fault("before_wal_write");
				staged_logged = deferred_wal_enabled;
				wal_end = wal_append(staged_entries, n, xid);
				if (wal_end != 0 && deferred_wal_sync == WAL_SYNC_ALWAYS)
					wal_flush(wal_end);
				deferred_fault("after_wal_write");
			}
			break;

		case XACT_EVENT_PRE_PREPARE:
			if (staged != NIL)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("cannot PREPARE a transaction that has queued deferred mutations")));
			break;

		case XACT_EVENT_COMMIT:
			if (staged_npositions > 0)
				queue_publish(staged_positions, staged_npositions);
			staged_reset();
			notify_at_commit();
			break;

		case XACT_EVENT_ABORT:
			{
				/* forget first: if anything below fails, the next abort has nothing to redo */
				List	   *entries = staged;
				DeferredEntry **logged = staged_logged ? staged_entries : NULL;
				uint64	   *positions = staged_positions;
				int			npositions = staged_npositions;

				staged_reset();
				notify_at_abort();
				if (entries != NIL)
					note_rolled_back(entries);
				if (logged != NULL)
					wal_append_abort(logged, npositions);
				if (npositions > 0)
					queue_cancel(positions, npositions);
				else if (entries != NIL)
					queue_unaccount(staged_bytes(entries));
			}
			break;

		default:
			break;
	}
}

/* Savepoints: a rolled-back one discards what it staged */
static void
enqueue_subxact_callback(SubXactEvent event,
						 SubTransactionId mySubid pg_attribute_unused(),
						 SubTransactionId parentSubid pg_attribute_unused(),
						 void *arg pg_attribute_unused())
{
	int			level = GetCurrentTransactionNestLevel();
	ListCell   *lc;
	Size		dropped = 0;

	if (staged == NIL)
		return;

	if (event == SUBXACT_EVENT_ABORT_SUB)
	{
		List	   *discarded = NIL;

		foreach(lc, staged)
		{
			StagedEntry *se = lfirst(lc);

			if (se->nestlevel >= level)
			{
				dropped += se->entry->size;
				discarded = lappend(discarded, se);
				staged = foreach_delete_current(staged, lc);
			}
		}
		if (dropped > 0)
		{
			queue_unaccount(dropped);
			note_rolled_back(discarded);
		}
	}
	else if (event == SUBXACT_EVENT_COMMIT_SUB)
	{
		foreach(lc, staged)
		{
			StagedEntry *se = lfirst(lc);

			if (se->nestlevel >= level)
				se->nestlevel = level - 1;
		}
	}
}

/* Called from _PG_init */
void
enqueue_init(void)
{
	CacheRegisterRelcacheCallback(target_cache_invalidate, (Datum) 0);
	RegisterXactCallback(enqueue_xact_callback, NULL);
	RegisterSubXactCallback(enqueue_subxact_callback, NULL);
}
