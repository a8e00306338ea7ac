/*-------------------------------------------------------------------------
 *
 * recovery.c
 *		Replay the WAL into a fresh queue, exactly once, when the worker
 *		starts.
 *
 * After a server start or crash the shared queue is empty.  The worker
 * reads deferred_progress (written by each flush in the same transaction
 * as its mutations): every entry below applied_upto is settled except
 * those listed for retry.  It then reads every segment, keeps the entries
 * that are neither settled, nor abandoned by an abort marker, nor from a
 * transaction that did not commit, and puts them back in the queue in
 * commit order, with their attempt counts.  Calls wait until this is done
 * (queue_account), so new entries always come after recovered ones.
 *
 * When only the worker restarted (shared memory intact), nothing is read
 * from files: entries that a committed flush applied but that its worker
 * did not get to release are marked settled from the same record.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "access/transam.h"
#include "access/xact.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "athena_deferred.h"
#include "wal_format.h"

/* State of one replay */
typedef struct Replay
{
	const char *segment;		/* file being read, for messages */
	uint64		segno;
	uint64		seg_max_qseq;
	uint64		max_qseq;
	List	   *entries;		/* DeferredEntry *, not yet filtered */
	List	   *aborted;		/* qseqs abandoned after pre-commit */
	Progress   *progress;
} Replay;

/* Index of qseq in the retry list, or -1 */
static int
retry_index(const Progress *p, uint64 qseq)
{
	for (int i = 0; i < p->nretry; i++)
		if (p->retry_qseq[i] == qseq)
			return i;
	return -1;
}

/* Rebuild an entry from its WAL record; NULL if the record is malformed */
static DeferredEntry *
entry_from_record(json_t *rec)
{
	DeferredEntry hdr;
	StringInfoData buf;
	json_int_t	id,
				qseq,
				db,
				role,
				rel,
				xid,
				at,
				att;
	int			op;
	json_t	   *parts;
	size_t		i;
	json_t	   *part;

	if (json_unpack(rec, "{s:I, s:I, s:I, s:I, s:I, s:i, s:I, s:I, s:I, s:o}",
					"id", &id, "q", &qseq, "db", &db, "role", &role, "rel", &rel,
					"op", &op, "xid", &xid, "at", &at, "att", &att, "p", &parts) != 0)
		return NULL;
	if (op < DEFERRED_INSERT || op > DEFERRED_DELETE || !json_is_array(parts) ||
		json_array_size(parts) == 0 || json_array_size(parts) > PG_UINT16_MAX ||
		qseq <= 0 || id <= 0)
		return NULL;
	if ((op == DEFERRED_UPDATE && json_array_size(parts) != 2) ||
		(op == DEFERRED_DELETE && json_array_size(parts) != 1))
		return NULL;

	entry_begin(&buf);
	json_array_foreach(parts, i, part)
	{
		int			kind;
		json_t	   *cols;
		const char *nulls;
		json_t	   *text;
		KeyList		keys;
		size_t		c;
		json_t	   *col;

		if (json_unpack(part, "{s:i, s:o, s:s, s:o}", "k", &kind, "c", &cols, "n", &nulls, "j", &text) != 0 ||
			!json_is_array(cols) || !json_is_string(text) ||
			strlen(nulls) != json_array_size(cols) || json_array_size(cols) == 0 ||
			json_array_size(cols) > PG_UINT16_MAX)
			return NULL;
		if (kind != (op == DEFERRED_INSERT ? PART_ROWS : (i == 0 ? PART_MATCH : PART_CHANGES)))
			return NULL;

		keys.nkeys = json_array_size(cols);
		keys.names = palloc(sizeof(char *) * keys.nkeys);
		keys.isnull = palloc(sizeof(bool) * keys.nkeys);
		json_array_foreach(cols, c, col)
		{
			if (!json_is_string(col) || strlen(json_string_value(col)) != json_string_length(col) ||
				json_string_length(col) == 0 || (nulls[c] != 'n' && nulls[c] != 'v'))
				return NULL;
			keys.names[c] = pstrdup(json_string_value(col));
			keys.isnull[c] = (nulls[c] == 'n');
		}
		entry_add_part(&buf, kind, &keys, json_string_value(text), json_string_length(text));
	}

	memset(&hdr, 0, sizeof(hdr));
	hdr.size = buf.len;
	hdr.state = ENTRY_PUBLISHED;
	hdr.op = op;
	hdr.nparts = json_array_size(parts);
	hdr.attempts = (uint32) Max(att, 0);
	hdr.dbid = (Oid) db;
	hdr.roleid = (Oid) role;
	hdr.relid = (Oid) rel;
	hdr.xid = (TransactionId) xid;
	hdr.id = id;
	hdr.qseq = (uint64) qseq;
	hdr.enqueued_at = (TimestampTz) at;
	memcpy(buf.data, &hdr, sizeof(hdr));
	return (DeferredEntry *) buf.data;
}

static void
replay_record(void *arg, json_t *rec, size_t offset)
{
	Replay	   *r = arg;
	const char *type = json_string_value(json_object_get(rec, "t"));

	if (type != NULL && strcmp(type, "e") == 0)
	{
		DeferredEntry *e = entry_from_record(rec);

		if (e == NULL)
			ereport(WARNING,
					(errmsg("athena_deferred: malformed entry record in WAL segment %s at offset %zu skipped",
							r->segment, offset)));
		else
		{
			r->seg_max_qseq = Max(r->seg_max_qseq, e->qseq);
			r->max_qseq = Max(r->max_qseq, e->qseq);
			if (e->qseq >= r->progress->applied_upto || retry_index(r->progress, e->qseq) >= 0)
				r->entries = lappend(r->entries, e);
		}
	}
	else if (type != NULL && strcmp(type, "a") == 0)
	{
		json_t	   *qseqs = json_object_get(rec, "q");
		size_t		i;
		json_t	   *v;

		json_array_foreach(qseqs, i, v)
		{
			uint64	   *q = palloc(sizeof(uint64));

			*q = (uint64) json_integer_value(v);
			r->aborted = lappend(r->aborted, q);
			/* numbers of abandoned entries are used up too */
			r->max_qseq = Max(r->max_qseq, *q);
		}
	}
	else
		ereport(WARNING,
				(errmsg("athena_deferred: unknown record in WAL segment %s at offset %zu skipped",
						r->segment, offset)));
	json_decref(rec);
}

static void
replay_damage(void *arg, bool torn, size_t offset, size_t len)
{
	Replay	   *r = arg;

	if (torn)
		ereport(LOG,
				(errmsg("athena_deferred: torn record at the end of WAL segment %s (offset %zu, %zu bytes) ignored",
						r->segment, offset, len),
				 errdetail("A write was cut short by a crash; its transaction was never acknowledged. New records go to a new segment.")));
	else
		ereport(WARNING,
				(errmsg("athena_deferred: corrupt data in WAL segment %s at offset %zu (%zu bytes) skipped",
						r->segment, offset, len),
				 errdetail("Entries stored in the damaged bytes cannot be recovered; the records around them are.")));
}

static int
compare_entries(const ListCell *a, const ListCell *b)
{
	uint64		qa = ((DeferredEntry *) lfirst(a))->qseq;
	uint64		qb = ((DeferredEntry *) lfirst(b))->qseq;

	return qa < qb ? -1 : (qa > qb ? 1 : 0);
}

static int
compare_segnos(const void *a, const void *b)
{
	uint64		sa = *(const uint64 *) a;
	uint64		sb = *(const uint64 *) b;

	return sa < sb ? -1 : (sa > sb ? 1 : 0);
}

/* The segment numbers in the WAL directory, sorted */
static uint64 *
list_segments(int *nsegs)
{
	DIR		   *dir;
	struct dirent *de;
	uint64	   *segnos = palloc(sizeof(uint64) * 16);
	int			n = 0,
				allocated = 16;

	dir = AllocateDir(deferred_wal_dir);
	if (dir == NULL && errno == ENOENT)
	{
		*nsegs = 0;
		return segnos;
	}
	while ((de = ReadDir(dir, deferred_wal_dir)) != NULL)
	{
		/* half-made segments of creators that crashed */
		if (strncmp(de->d_name, "tmp.", 4) == 0)
			unlink(psprintf("%s/%s", deferred_wal_dir, de->d_name));
		if (strlen(de->d_name) != 16 || strspn(de->d_name, "0123456789ABCDEF") != 16)
			continue;
		if (n == allocated)
			segnos = repalloc(segnos, sizeof(uint64) * (allocated *= 2));
		segnos[n++] = strtoull(de->d_name, NULL, 16);
	}
	FreeDir(dir);
	qsort(segnos, n, sizeof(uint64), compare_segnos);
	*nsegs = n;
	return segnos;
}

/* Read a whole segment file into memory */
static char *
read_segment(const char *path, size_t *size)
{
	int			fd = BasicOpenFile(path, O_RDONLY | PG_BINARY);
	struct stat st;
	char	   *buf;
	size_t		done = 0;

	if (fd < 0 || fstat(fd, &st) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open athena_deferred WAL file \"%s\": %m", path)));
	buf = palloc_extended(Max(st.st_size, 1), MCXT_ALLOC_HUGE);
	while (done < (size_t) st.st_size)
	{
		ssize_t		n = read(fd, buf + done, st.st_size - done);

		if (n <= 0)
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("could not read athena_deferred WAL file \"%s\": %m", path)));
		done += n;
	}
	close(fd);
	*size = done;
	return buf;
}

/* Did the entry's transaction commit?  Entries without an xid committed at pre-commit. */
static bool
entry_committed(const DeferredEntry *e)
{
	if (!TransactionIdIsNormal(e->xid))
		return true;
	/* an xid the server has not reached again was never committed */
	if (!TransactionIdPrecedes(e->xid, XidFromFullTransactionId(ShmemVariableCache->nextXid)))
		return false;
	/* a status older than the commit log keeps is no longer known: it committed long ago */
	if (TransactionIdPrecedes(e->xid, ShmemVariableCache->oldestClogXid))
		return true;
	return TransactionIdDidCommit(e->xid);
}

/* Replay the WAL into the empty queue */
static void
replay_wal(Progress *progress)
{
	DeferredShared *q = deferred_shared;
	Replay		r;
	WalScanStats stats;
	int			nsegs;
	uint64	   *segnos = list_segments(&nsegs);
	uint64		segsize = wal_segment_bytes();
	List	   *keep = NIL;
	DeferredEntry **entries;
	int			n = 0;
	ListCell   *lc;
	uint64		last_qseq = 0;
	int			other_db = 0;

	int			last_written = -1;

	memset(&r, 0, sizeof(r));
	memset(&stats, 0, sizeof(stats));
	r.progress = progress;

	/*
	 * Damage at the end of the last segment holding data is a torn tail;
	 * segments after it are pre-allocated and empty.
	 */
	for (int i = nsegs - 1; i >= 0 && last_written < 0; i--)
	{
		size_t		size;
		char	   *buf = read_segment(wal_segment_path(segnos[i]), &size);

		for (size_t b = 0; b < size; b++)
		{
			if (buf[b] != 0)
			{
				last_written = i;
				break;
			}
		}
		pfree(buf);
	}

	for (int i = 0; i < nsegs; i++)
	{
		char	   *path = wal_segment_path(segnos[i]);
		size_t		size;
		char	   *buf = read_segment(path, &size);
		int			slot = segnos[i] % WAL_SEGMENT_SLOTS;

		r.segment = path;
		r.segno = segnos[i];
		r.seg_max_qseq = 0;
		wal_scan_segment(buf, size, i >= last_written, replay_record, replay_damage, &r, &stats);
		pfree(buf);

		q->seg_segno[slot] = segnos[i];
		q->seg_max_qseq[slot] = r.seg_max_qseq;
		if (i == 0)
			deferred_fault("mid_recovery");
	}

	/* keep what is committed, not abandoned, not settled; once each, in order */
	list_sort(r.entries, compare_entries);
	foreach(lc, r.entries)
	{
		DeferredEntry *e = lfirst(lc);
		bool		abandoned = false;
		ListCell   *alc;
		int			ri;

		if (e->qseq == last_qseq)
			continue;
		last_qseq = e->qseq;
		if (e->dbid != MyDatabaseId)
		{
			other_db++;
			continue;
		}
		foreach(alc, r.aborted)
			abandoned |= (*(uint64 *) lfirst(alc) == e->qseq);
		if (abandoned || !entry_committed(e))
			continue;
		ri = retry_index(progress, e->qseq);
		if (ri >= 0)
			e->attempts = Max(e->attempts, (uint32) progress->retry_attempts[ri]);
		keep = lappend(keep, e);
	}

	entries = palloc(sizeof(DeferredEntry *) * Max(list_length(keep), 1));
	foreach(lc, keep)
		entries[n++] = lfirst(lc);

	/* new writes go to a fresh segment: nothing old is appended to */
	LWLockAcquire(q->wal_lock, LW_EXCLUSIVE);
	q->wal_insert_pos = nsegs > 0 ? (segnos[nsegs - 1] + 1) * segsize : 0;
	pg_atomic_write_u64(&q->wal_flushed_pos, q->wal_insert_pos);
	q->wal_oldest_segno = nsegs > 0 ? segnos[0] : 0;
	LWLockRelease(q->wal_lock);

	LWLockAcquire(q->lock, LW_EXCLUSIVE);
	q->wal_segments = nsegs;
	q->torn_records = stats.torn;
	q->corrupt_records = stats.corrupt;
	q->recovered_entries = n;
	LWLockRelease(q->lock);

	queue_restore(entries, n, Max(Max(r.max_qseq + 1, progress->applied_upto), 1));

	if (other_db > 0)
		ereport(WARNING,
				(errmsg("athena_deferred: %d pending entries in the WAL belong to another database and were not recovered",
						other_db),
				 errdetail("athena_deferred.database was changed, or the database was dropped and created again, while they were pending."),
				 errhint("Their payloads are in the WAL segment files in athena_deferred.wal_dir.")));

	ereport(LOG,
			(errmsg("athena_deferred: recovered %d pending entries from %d WAL segments (%llu records, %llu torn, %llu corrupt)",
					n, nsegs, (unsigned long long) stats.records,
					(unsigned long long) stats.torn, (unsigned long long) stats.corrupt)));
}

/*
 * Worker restarted with shared memory intact: settle what a committed flush
 * applied before its worker could release it.
 */
static void
reconcile_queue(Progress *progress)
{
	DeferredEntry **entries;
	uint64	   *positions;
	int			n = queue_collect(&entries, &positions, INT_MAX, true);
	int64		done = 0;

	for (int i = 0; i < n; i++)
	{
		if (entries[i]->qseq < progress->applied_upto && retry_index(progress, entries[i]->qseq) < 0)
		{
			entries[i]->state = ENTRY_DONE;
			done++;
		}
	}
	if (done > 0)
	{
		ereport(LOG,
				(errmsg("athena_deferred: " INT64_FORMAT " entries were applied by a flush whose worker exited before releasing them",
						done)));
		queue_settle(positions, entries, n, done, 0, 0, 0);
	}
}

/*
 * Bring the queue up to date with what has been applied.  Returns false if
 * the extension is not installed in this database yet.
 */
bool
recovery_run(void)
{
	bool		installed = false;
	MemoryContext cxt = AllocSetContextCreate(TopMemoryContext, "athena_deferred recovery",
											  ALLOCSET_DEFAULT_SIZES);
	MemoryContext oldcxt;
	char	   *schema;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	oldcxt = MemoryContextSwitchTo(cxt);

	schema = flush_extension_schema();
	if (schema != NULL)
	{
		Progress	progress;

		installed = true;
		flush_read_progress(schema, &progress);
		deferred_shared->progress_upto = progress.applied_upto;
		if (!deferred_shared->recovered)
			replay_wal(&progress);
		else
			reconcile_queue(&progress);
	}

	MemoryContextSwitchTo(oldcxt);
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextDelete(cxt);
	return installed;
}
