/*-------------------------------------------------------------------------
 *
 * recovery.c
 *		Replay the WAL into a fresh queue, exactly once, when the worker
 *		starts.
 *
 * After a server start or crash the shared queue is empty.  The launcher
 * (launcher.c), connected to no database, reads every segment and keeps
 * the entries that are neither abandoned by an abort marker nor from a
 * transaction that did not commit (recovery_scan).  Which of them a flush
 * already applied only the database they belong to can tell: its
 * deferred_progress row, written by each flush in the same transaction as
 * its mutations, says that every entry below applied_upto is settled
 * except those listed for retry.  So the launcher starts a worker in each
 * database found in the WAL, each reports from which entry on its entries
 * may be pending (recovery_report_progress), and the launcher puts those
 * back in the queue in commit order (recovery_restore).  Calls wait until
 * then (queue_account), so new entries always come after recovered ones.
 * Each worker then settles the few restored entries its progress row says
 * were applied and gives the retried ones their attempt counts back
 * (recovery_reconcile).
 *
 * The same reconciliation runs when only a worker restarted (shared memory
 * intact): entries that a committed flush applied but that its worker did
 * not get to release are settled from the same record.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "access/transam.h"
#include "access/xact.h"
#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "athena_deferred.h"
#include "wal_format.h"

/* State of one replay */
typedef struct Replay
{
	const char *segment;		/* file being read, for messages */
	uint64		seg_max_qseq;
	uint64		max_qseq;
	List	   *entries;		/* ScannedEntry *, not yet filtered */
	List	   *write;			/* entries of the multi-entry write being read */
	int			write_n;		/* how many records that write has (0: none) */
	uint64		write_base;		/* its first entry's number (they are consecutive) */
	uint64	   *cut;			/* numbers of entries abandoned: their write was
								 * cut short or their transaction did not commit */
	int			ncut;
	int			cut_size;
	const char *torn_segment;	/* where the torn tail is, if any */
	size_t		torn_offset;
	size_t		torn_len;
	List	   *aborted;		/* qseqs abandoned after pre-commit */
	List	   *dropped;		/* DROP EXTENSION markers: DatabaseSettled */
} Replay;

/* An entry read from the WAL, with the xid of the transaction that queued it */
typedef struct ScannedEntry
{
	DeferredEntry *entry;
	TransactionId xid;
} ScannedEntry;

/* A DROP EXTENSION marker: the database's entries below upto are settled */
typedef struct DatabaseSettled
{
	Oid			dbid;
	uint64		upto;
} DatabaseSettled;

/*
 * Launcher: what recovery_scan() found, kept until recovery_restore(), in
 * recovery_context
 */
static MemoryContext recovery_context = NULL;
static List *scanned_entries = NIL; /* committed, in commit order */
static uint64 scanned_next_qseq = 1;
static int	scanned_segments = 0;
static WalScanStats scanned_stats;

/* Worker: its database's progress row, read at start */
static Progress worker_progress;
static bool worker_installed = false;

/* Index of qseq in the retry list, or -1 */
static int
retry_index(const Progress *p, uint64 qseq)
{
	for (int i = 0; i < p->nretry; i++)
		if (p->retry_qseq[i] == qseq)
			return i;
	return -1;
}

/*
 * Rebuild an entry from its WAL record, and the xid of the transaction that
 * queued it; NULL if the record is malformed.  Parts of records written by
 * version 0.3.0 and before also have "c" and "n" (the column names and null
 * flags, which the text holds too): they are ignored.
 */
static DeferredEntry *
entry_from_record(json_t *rec, TransactionId *xid_out)
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
		json_t	   *text;
		const char *j;
		size_t		len;

		if (json_unpack(part, "{s:i, s:o}", "k", &kind, "j", &text) != 0 ||
			!json_is_string(text))
			return NULL;
		if (kind != (op == DEFERRED_INSERT ? PART_ROWS : (i == 0 ? PART_MATCH : PART_CHANGES)))
			return NULL;

		/* an array of rows, or an object: entry_payload_json() relies on it */
		j = json_string_value(text);
		len = json_string_length(text);
		if (len < 2 ||
			j[0] != (kind == PART_ROWS ? '[' : '{') ||
			j[len - 1] != (kind == PART_ROWS ? ']' : '}'))
			return NULL;
		entry_add_part(&buf, kind, j, len);
	}

	memset(&hdr, 0, sizeof(hdr));
	hdr.size = buf.len;
	hdr.state = ENTRY_PUBLISHED;
	hdr.op = op;
	hdr.nparts = json_array_size(parts);
	hdr.attempts = (uint16) Min(Max(att, 0), ENTRY_MAX_ATTEMPTS);
	hdr.dbid = (Oid) db;
	hdr.roleid = (Oid) role;
	hdr.relid = (Oid) rel;
	hdr.id = id;
	hdr.qseq = (uint64) qseq;
	hdr.enqueued_at = (TimestampTz) at;
	memcpy(buf.data, &hdr, sizeof(hdr));
	*xid_out = (TransactionId) xid;
	return (DeferredEntry *) buf.data;
}

/*
 * The records of a transaction that queued several entries are written
 * together, each with their number and its place among them, and follow
 * each other in the log (a write may go on at the start of the next
 * segment); the entries' numbers are consecutive.  Their entries are taken
 * once the last of them is read, or once another record follows: records
 * lost in between, to damage or to an OS crash that wrote later pages and
 * not earlier ones, cost only their own entries, as before.  A write still
 * unfinished at the end of the log was cut short by a crash: unless its
 * transaction has an xid, whose commit the commit log then decides, it was
 * never acknowledged, and none of it is applied, now or at any later
 * recovery (recovery_scan logs them as abandoned).
 */
static void
replay_write_done(Replay *r)
{
	r->entries = list_concat(r->entries, r->write);
	r->write = NIL;
	r->write_n = 0;
}

/* Take an entry: the index-th of its write's n (n is 0 for a single entry) */
static void
replay_entry(Replay *r, ScannedEntry *se, int n, int index)
{
	if (n > 1 && (index < 0 || index >= n))
		n = 0;					/* not a place in a write: take it alone */
	/* another write begins */
	if (r->write_n != 0 &&
		(n != r->write_n || se->entry->qseq - index != r->write_base ||
		 index < list_length(r->write)))
		replay_write_done(r);
	if (n <= 1)
	{
		r->entries = lappend(r->entries, se);
		return;
	}
	r->write_n = n;
	r->write_base = se->entry->qseq - index;
	r->write = lappend(r->write, se);
	if (index == n - 1)
		replay_write_done(r);
}

/* Remember an entry that is not applied, to log it as abandoned */
static void
replay_abandon(Replay *r, uint64 qseq)
{
	if (r->ncut == r->cut_size)
	{
		r->cut_size = Max(64, r->cut_size * 2);
		r->cut = r->cut == NULL ? palloc(sizeof(uint64) * r->cut_size)
			: repalloc(r->cut, sizeof(uint64) * r->cut_size);
	}
	r->cut[r->ncut++] = qseq;
}

/* At the end of the log: a write still unfinished is dropped */
static void
replay_write_cut_short(Replay *r)
{
	ListCell   *lc;

	if (r->write_n == 0)
		return;
	if (TransactionIdIsNormal(((ScannedEntry *) linitial(r->write))->xid))
	{
		ereport(WARNING,
				(errmsg("athena_deferred: the last %d records of a transaction's write are missing at the end of the WAL (segment %s)",
						r->write_n - list_length(r->write), r->segment),
				 errdetail("If its transaction committed, its other %d entries are applied; the missing ones were lost in a crash.",
						   list_length(r->write))));
		replay_write_done(r);
		return;
	}
	foreach(lc, r->write)
		replay_abandon(r, ((ScannedEntry *) lfirst(lc))->entry->qseq);
	ereport(LOG,
			(errmsg("athena_deferred: the last records of a transaction's write are missing at the end of the WAL (segment %s): none of the %d of its entries read is applied",
					r->segment, list_length(r->write)),
			 errdetail("A write was cut short by a crash; its transaction was never acknowledged.")));
	r->write = NIL;
	r->write_n = 0;
}

static void
replay_record(void *arg, json_t *rec, size_t offset)
{
	Replay	   *r = arg;
	const char *type = json_string_value(json_object_get(rec, "t"));

	/* a write is never interrupted by another kind of record */
	if (type == NULL || strcmp(type, "e") != 0)
		replay_write_done(r);

	if (type != NULL && strcmp(type, "e") == 0)
	{
		TransactionId xid;
		DeferredEntry *e = entry_from_record(rec, &xid);

		if (e == NULL)
			ereport(WARNING,
					(errmsg("athena_deferred: malformed entry record in WAL segment %s at offset %zu skipped",
							r->segment, offset)));
		else
		{
			ScannedEntry *se = palloc(sizeof(ScannedEntry));
			int			n = (int) json_integer_value(json_object_get(rec, "n"));
			int			index = (int) json_integer_value(json_object_get(rec, "i"));

			se->entry = e;
			se->xid = xid;
			r->seg_max_qseq = Max(r->seg_max_qseq, e->qseq);
			r->max_qseq = Max(r->max_qseq, e->qseq);
			replay_entry(r, se, n, index);
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
	else if (type != NULL && strcmp(type, "d") == 0)
	{
		json_int_t	db,
					upto;

		if (json_unpack(rec, "{s:I, s:I}", "db", &db, "upto", &upto) == 0)
		{
			DatabaseSettled *d = palloc(sizeof(DatabaseSettled));

			d->dbid = (Oid) db;
			d->upto = (uint64) upto;
			r->dropped = lappend(r->dropped, d);
			r->max_qseq = Max(r->max_qseq, d->upto);
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
	{
		ereport(LOG,
				(errmsg("athena_deferred: torn record at the end of WAL segment %s (offset %zu, %zu bytes) ignored",
						r->segment, offset, len),
				 errdetail("A write was cut short by a crash; its transaction was never acknowledged. New records go to a new segment.")));
		r->torn_segment = r->segment;
		r->torn_offset = offset;
		r->torn_len = len;
	}
	else
		ereport(WARNING,
				(errmsg("athena_deferred: corrupt data in WAL segment %s at offset %zu (%zu bytes) skipped",
						r->segment, offset, len),
				 errdetail("Entries stored in the damaged bytes cannot be recovered; the records around them are.")));
}

/*
 * Overwrite a torn tail with zeros, durably.  New records go to a new
 * segment, so this one will not be the last one holding data at the next
 * recovery, which would then take the torn bytes for corruption.  A
 * failure costs only that false alarm.
 */
static void
erase_torn_tail(const char *path, size_t offset, size_t len)
{
	int			fd = BasicOpenFile(path, O_RDWR | PG_BINARY);

	if (fd < 0 || !wal_write_zeros(fd, offset, len) || pg_fsync(fd) != 0)
		ereport(LOG,
				(errcode_for_file_access(),
				 errmsg("could not erase the torn record in athena_deferred WAL file \"%s\": %m", path),
				 errdetail("The next recovery will report it as corrupt data.")));
	if (fd >= 0)
		close(fd);
}

static int
compare_entries(const ListCell *a, const ListCell *b)
{
	uint64		qa = ((ScannedEntry *) lfirst(a))->entry->qseq;
	uint64		qb = ((ScannedEntry *) lfirst(b))->entry->qseq;

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

/*
 * Did the transaction xid that queued an entry commit?  Entries without an
 * xid committed at pre-commit.
 */
static bool
entry_committed(TransactionId xid)
{
	if (!TransactionIdIsNormal(xid))
		return true;
	/* an xid the server has not reached again was never committed */
	if (!TransactionIdPrecedes(xid, XidFromFullTransactionId(ShmemVariableCache->nextXid)))
		return false;
	/* a status older than the commit log keeps is no longer known: it committed long ago */
	if (TransactionIdPrecedes(xid, ShmemVariableCache->oldestClogXid))
		return true;
	return TransactionIdDidCommit(xid);
}

/*
 * Launcher, at server start: read the WAL, keep the committed entries that
 * no abort marker abandoned, and make new writes go to a fresh segment.
 */
void
recovery_scan(void)
{
	DeferredShared *q = deferred_shared;
	Replay		r;
	int			nsegs;
	uint64	   *segnos;
	uint64		segsize = wal_segment_bytes();
	ListCell   *lc;
	uint64		last_qseq = 0;
	int			last_written = -1;
	MemoryContext oldcxt;

	recovery_context = AllocSetContextCreate(TopMemoryContext, "athena_deferred recovery",
											 ALLOCSET_DEFAULT_SIZES);
	StartTransactionCommand();	/* for the commit log lookups */
	oldcxt = MemoryContextSwitchTo(recovery_context);

	memset(&r, 0, sizeof(r));
	memset(&scanned_stats, 0, sizeof(scanned_stats));
	segnos = list_segments(&nsegs);

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
		r.seg_max_qseq = 0;
		wal_scan_segment(buf, size, i >= last_written, replay_record, replay_damage, &r, &scanned_stats);
		pfree(buf);

		q->seg_segno[slot] = segnos[i];
		q->seg_max_qseq[slot] = r.seg_max_qseq;
		if (i == 0)
			deferred_fault("mid_recovery");
	}

	replay_write_cut_short(&r);
	if (r.torn_segment != NULL)
		erase_torn_tail(r.torn_segment, r.torn_offset, r.torn_len);

	/* keep what is committed and not abandoned; once each, in order */
	list_sort(r.entries, compare_entries);
	foreach(lc, r.entries)
	{
		ScannedEntry *se = lfirst(lc);
		DeferredEntry *e = se->entry;
		bool		abandoned = false;
		ListCell   *alc;

		if (e->qseq == last_qseq)
			continue;
		last_qseq = e->qseq;
		foreach(alc, r.aborted)
			abandoned |= (*(uint64 *) lfirst(alc) == e->qseq);
		foreach(alc, r.dropped)
		{
			DatabaseSettled *d = lfirst(alc);

			abandoned |= (d->dbid == e->dbid && e->qseq < d->upto);
		}
		if (abandoned)
			continue;
		if (!entry_committed(se->xid))
		{
			/*
			 * Final now that every transaction from before the restart has
			 * ended; logged below, as the verdict could change later (an
			 * xid that wrote no WAL of PostgreSQL's can be handed out again).
			 */
			replay_abandon(&r, e->qseq);
			continue;
		}
		scanned_entries = lappend(scanned_entries, e);
	}
	/*
	 * Entry numbers go on from the server start time in microseconds, so
	 * that they keep growing across restarts even when the WAL no longer
	 * holds the last ones (all segments settled and removed, or the WAL
	 * turned off): progress records compare them.
	 */
	scanned_next_qseq = Max(r.max_qseq + 1, (uint64) GetCurrentTimestamp());
	scanned_segments = nsegs;
	LWLockAcquire(q->lock, LW_EXCLUSIVE);
	q->next_qseq = Max(q->next_qseq, scanned_next_qseq);	/* calls still wait */
	LWLockRelease(q->lock);
	MemoryContextSwitchTo(oldcxt);
	CommitTransactionCommand();

	/* new writes go to a fresh segment: nothing old is appended to */
	LWLockAcquire(q->wal_lock, LW_EXCLUSIVE);
	q->wal_insert_pos = nsegs > 0 ? (segnos[nsegs - 1] + 1) * segsize : 0;
	pg_atomic_write_u64(&q->wal_flushed_pos, q->wal_insert_pos);
	q->wal_oldest_segno = nsegs > 0 ? segnos[0] : 0;
	LWLockRelease(q->wal_lock);

	/*
	 * What was dropped stays dropped: the records of a write cut short
	 * would look whole once a newer record follows them, and the commit log
	 * could later say otherwise of an xid.  Logged durably before any call
	 * is let in; if that fails (a full disk), recovery goes on all the same.
	 */
	if (r.ncut > 0)
		wal_append_abandoned(r.cut, r.ncut);
}

/* Launcher: the databases that recovery_scan() found entries of */
List *
recovery_databases(void)
{
	List	   *dbids = NIL;
	ListCell   *lc;

	foreach(lc, scanned_entries)
		dbids = list_append_unique_oid(dbids, ((DeferredEntry *) lfirst(lc))->dbid);
	return dbids;
}

/*
 * Launcher, once every database found in the WAL has reported its progress
 * (or no longer exists): put back the entries that may be pending, in
 * commit order, and let calls in.
 */
void
recovery_restore(void)
{
	DeferredShared *q = deferred_shared;
	DeferredEntry **entries;
	int			n = 0;
	int			gone = 0;
	ListCell   *lc;

	entries = MemoryContextAlloc(recovery_context,
								 sizeof(DeferredEntry *) * Max(list_length(scanned_entries), 1));
	foreach(lc, scanned_entries)
	{
		DeferredEntry *e = lfirst(lc);
		DeferredDatabase *db = queue_database_slot(e->dbid, false);

		if (db == NULL || !db->progress_reported)
			gone++;				/* the database was dropped */
		else if (e->qseq >= db->keep_from)
			entries[n++] = e;
	}

	LWLockAcquire(q->lock, LW_EXCLUSIVE);
	q->wal_segments = scanned_segments;
	q->torn_records = scanned_stats.torn;
	q->corrupt_records = scanned_stats.corrupt;
	q->recovered_entries = n;
	q->discarded += gone;
	LWLockRelease(q->lock);

	queue_restore(entries, n, scanned_next_qseq);

	if (gone > 0)
		ereport(LOG,
				(errmsg("athena_deferred: %d entries in the WAL belong to databases that no longer exist and were discarded",
						gone)));
	ereport(LOG,
			(errmsg("athena_deferred: recovered %d entries from %d WAL segments (%llu records, %llu torn, %llu corrupt)",
					n, scanned_segments, (unsigned long long) scanned_stats.records,
					(unsigned long long) scanned_stats.torn, (unsigned long long) scanned_stats.corrupt)));

	MemoryContextDelete(recovery_context);
	recovery_context = NULL;
	scanned_entries = NIL;
}

/*
 * Worker, at start: read this database's progress row and, while the
 * launcher recovers, tell it from which entry on this database's entries
 * may be pending.  Returns false if the extension is not installed here
 * (then everything the WAL holds for this database is kept).
 */
bool
recovery_report_progress(void)
{
	DeferredShared *q = deferred_shared;
	DeferredDatabase *db;
	char	   *schema;
	uint64		keep_from = 0;
	uint64		next_qseq;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());

	schema = flush_extension_schema();
	worker_installed = (schema != NULL);
	if (worker_installed)
	{
		MemoryContext oldcxt = MemoryContextSwitchTo(TopMemoryContext);

		flush_read_progress(schema, &worker_progress);
		MemoryContextSwitchTo(oldcxt);

		/*
		 * Progress beyond every entry number handed out can only come from
		 * a clock that went back while the WAL was lost: none of this
		 * database's entries in the queue is covered by it.  Start the
		 * record over.
		 */
		LWLockAcquire(q->lock, LW_SHARED);
		next_qseq = q->next_qseq;
		LWLockRelease(q->lock);
		if (worker_progress.applied_upto > next_qseq)
		{
			ereport(LOG,
					(errmsg("athena_deferred: progress record of database \"%s\" is ahead of the entry numbers handed out and starts over",
							get_database_name(MyDatabaseId)),
					 errdetail("It says entries below %llu were applied; the next entry is %llu.",
							   (unsigned long long) worker_progress.applied_upto,
							   (unsigned long long) next_qseq)));
			worker_progress.applied_upto = 0;
			worker_progress.nretry = 0;
		}
		flush_progress_upto = worker_progress.applied_upto;
		keep_from = worker_progress.applied_upto;
		for (int i = 0; i < worker_progress.nretry; i++)
			keep_from = Min(keep_from, worker_progress.retry_qseq[i]);
	}

	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();

	LWLockAcquire(q->lock, LW_EXCLUSIVE);
	db = queue_database_slot(MyDatabaseId, false);
	if (db != NULL && !q->recovered)
	{
		db->keep_from = keep_from;
		db->progress_reported = true;
	}
	LWLockRelease(q->lock);
	queue_wake_launcher();
	return worker_installed;
}

static int
int64_cmp(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return (x > y) - (x < y);
}

/*
 * Worker, once the queue is recovered: settle this database's entries that
 * a committed flush applied or dead-lettered (restored because a retried
 * entry came before them, or left behind by a worker that exited between
 * its commit and releasing them), and give retried entries their attempt
 * counts back.  Which of them were dead-lettered, deferred_dead_letters
 * says: so that deferred_wait() reports them as such.
 */
void
recovery_reconcile(void)
{
	QueueTake	take = {0};
	int64		done = 0;
	int64		dead = 0;
	int64	   *settled_ids;
	bool	   *settled;
	int64	   *dead_ids = NULL;
	int			nsettled = 0;
	int			ndead = 0;
	MemoryContext cxt;
	MemoryContext oldcxt;

	if (!worker_installed)
		return;
	cxt = AllocSetContextCreate(TopMemoryContext, "athena_deferred reconcile",
								ALLOCSET_DEFAULT_SIZES);
	oldcxt = MemoryContextSwitchTo(cxt);
	take.cxt = cxt;
	queue_take(&take, INT_MAX);
	settled_ids = palloc(sizeof(int64) * Max(take.n, 1));
	settled = palloc0(sizeof(bool) * Max(take.n, 1));
	for (int i = 0; i < take.n; i++)
	{
		const DeferredEntry *e = take.entries[i];
		int			ri = retry_index(&worker_progress, e->qseq);

		if (ri >= 0)
			take.attempts[i] = Max(e->attempts,
								   Min(Max(worker_progress.retry_attempts[ri], 0), ENTRY_MAX_ATTEMPTS));
		else if (e->qseq < worker_progress.applied_upto)
		{
			settled[i] = true;
			settled_ids[nsettled++] = e->id;
		}
	}
	if (nsettled > 0)
		ndead = flush_dead_lettered(settled_ids, nsettled, &dead_ids);
	for (int i = 0; i < take.n; i++)
	{
		const DeferredEntry *e = take.entries[i];

		if (!settled[i])
			continue;
		if (ndead > 0 && bsearch(&e->id, dead_ids, ndead, sizeof(int64), int64_cmp) != NULL)
		{
			take.states[i] = ENTRY_DEAD;
			dead++;
		}
		else
		{
			take.states[i] = ENTRY_DONE;
			done++;
		}
	}
	if (take.n > 0)
		queue_settle(&take, done, 0, dead, -1);
	if (done + dead > 0)
		ereport(LOG,
				(errmsg("athena_deferred: " INT64_FORMAT " entries had been applied and " INT64_FORMAT " dead-lettered by a flush before the restart",
						done, dead)));
	MemoryContextSwitchTo(oldcxt);
	MemoryContextDelete(cxt);
}
