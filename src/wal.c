/*-------------------------------------------------------------------------
 *
 * wal.c
 *		athena_deferred's own write-ahead log: every entry is written here
 *		before its transaction's commit returns.
 *
 * The log is a series of pre-allocated, zero-filled segment files in
 * athena_deferred.wal_dir, named by segment number.  A committing
 * transaction frames all its entries into one buffer (one JSON record per
 * entry, see wal_format.h) and writes it at a position taken under
 * wal_lock; then, with wal_sync = always, waits until an fsync covers it.
 * Concurrent committers share that fsync: whoever gets wal_flush_lock
 * syncs everything written so far, the others wake up to find their
 * records already durable (as XLogFlush does).
 *
 * How the records reach the file depends on wal_sync.  With batch and off,
 * each backend maps the segment it writes into (MAP_SHARED) and copies
 * them in: they are then in the kernel's page cache, as after a write(),
 * without a system call per commit (fdatasync() writes out pages dirtied
 * through a mapping like any others).  With always, it uses one pwrite():
 * each fsync write-protects the pages of every mapping again, and the
 * page faults that follow on the next commits cost more than the pwrite().
 *
 * A copy into a mapping cannot fail and say so.  The segment's blocks were
 * allocated and zeroed when it was created, so on a filesystem that
 * overwrites in place the copy needs no new space; a device error while
 * the kernel reads a page back in ends the process with SIGBUS, and the
 * postmaster restarts the server, as after a PANIC.  The transaction was
 * not acknowledged, and recovery takes a record cut short for a torn tail.
 *
 * Files are only ever appended to at the insert position, which moves to a
 * fresh segment after a restart; a segment is removed by the worker once
 * every entry in it is settled and the flush that settled it has committed.
 * Nothing is truncated; nothing is rewritten but a torn tail, which the
 * recovery that finds it overwrites with zeros (recovery.c).
 *
 * This file knows nothing of SQL.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <jansson.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "miscadmin.h"
#include "pgstat.h"
#include "storage/fd.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "athena_deferred.h"
#include "wal_format.h"

/* A segment open for writing, and mapped unless base is NULL */
typedef struct WalSegment
{
	uint64		segno;
	int			fd;
	char	   *base;
} WalSegment;

/*
 * The segments this backend has open: the first is the one it wrote into
 * last, kept between commits; the others are those of a write that spans
 * segments, closed when it is done (or by the next write, when an error
 * cut it short).
 */
static WalSegment *wal_segs = NULL;
static int	wal_nsegs = 0;
static int	wal_segs_size = 0;

/*
 * The first entry of this backend's latest wal_append(), and whether any of
 * its bytes may be in the log.  An abort after a write that failed cleanly
 * (nothing written) needs no abort marker; on a full disk it could not
 * write one anyway.
 */
static uint64 append_first_qseq = 0;
static bool append_in_log = false;

/*
 * Whether athena_deferred.fault_point names point: for the points that make
 * an I/O call fail rather than kill the process (deferred_fault() kills), a
 * device error cannot be had otherwise in a test, and for those that must
 * do something before deferred_fault() kills.  Set per session, so only
 * that session's calls fail.
 */
static bool
fault_armed(const char *point)
{
	return deferred_fault_point != NULL && strcmp(deferred_fault_point, point) == 0;
}

uint64
wal_segment_bytes(void)
{
	return (uint64) deferred_wal_segment_size_kb * 1024;
}

/*
 * Write len zero bytes at offset of fd.  False on failure, with errno set
 * (ENOSPC for a short write, which sets none).
 */
bool
wal_write_zeros(int fd, uint64 offset, uint64 len)
{
	static const char zeros[65536];

	for (uint64 done = 0; done < len;)
	{
		Size		n = Min(len - done, sizeof(zeros));

		errno = ENOSPC;
		if (pg_pwrite(fd, zeros, n, (off_t) (offset + done)) != (ssize_t) n)
			return false;
		done += n;
	}
	return true;
}

/* Path of a segment (palloc'd) */
char *
wal_segment_path(uint64 segno)
{
	return psprintf("%s/%016llX", deferred_wal_dir, (unsigned long long) segno);
}

/*
 * Create a segment: zero-fill a temporary file, fsync it, then link it into
 * place.  link() fails if the segment exists, so two creators cannot
 * replace a segment someone already writes into.  Returns false (having
 * reported at elevel) on failure.
 */
static bool
wal_create_segment(uint64 segno, int elevel)
{
	char	   *path = wal_segment_path(segno);
	char	   *tmppath = psprintf("%s/tmp.%d", deferred_wal_dir, MyProcPid);
	uint64		size = wal_segment_bytes();
	int			fd;
	bool		filled;
	bool		linked;

	(void) MakePGDirectory(deferred_wal_dir);
	unlink(tmppath);
	fd = BasicOpenFilePerm(tmppath, O_RDWR | O_CREAT | O_EXCL | PG_BINARY, S_IRUSR | S_IWUSR);
	if (fd < 0)
	{
		ereport(elevel,
				(errcode_for_file_access(),
				 errmsg("could not create athena_deferred WAL file \"%s\": %m", tmppath)));
		return false;
	}
	/*
	 * A failed fsync here loses nothing: the file is thrown away, and the
	 * next attempt writes a new one rather than trusting a second fsync of
	 * this one.  So this is not a reason to PANIC.
	 */
	filled = wal_write_zeros(fd, 0, size);
	if (!filled || pg_fsync(fd) != 0)
	{
		int			save_errno = errno;

		close(fd);
		unlink(tmppath);
		errno = save_errno;
		ereport(elevel,
				(errcode_for_file_access(),
				 filled ? errmsg("could not fsync athena_deferred WAL file \"%s\": %m", tmppath)
				 : errmsg("could not zero-fill athena_deferred WAL file \"%s\": %m", tmppath)));
		return false;
	}
	close(fd);

	linked = (link(tmppath, path) == 0);
	if (!linked && errno != EEXIST)
	{
		int			save_errno = errno;

		unlink(tmppath);
		errno = save_errno;
		ereport(elevel,
				(errcode_for_file_access(),
				 errmsg("could not link athena_deferred WAL file \"%s\" to \"%s\": %m", tmppath, path)));
		return false;
	}
	unlink(tmppath);

	/*
	 * The directory entry of a segment that may already hold records: as
	 * for PostgreSQL's own files, a failed fsync is not retried blindly
	 * (data_sync_retry).
	 */
	if (fsync_fname_ext(deferred_wal_dir, true, false, data_sync_elevel(elevel)) != 0)
		return false;

	if (linked)
	{
		LWLockAcquire(deferred_shared->lock, LW_EXCLUSIVE);
		deferred_shared->wal_segments++;
		LWLockRelease(deferred_shared->lock);
	}
	return true;
}

static void
wal_close_segment(WalSegment *seg)
{
	if (seg->base != NULL && munmap(seg->base, wal_segment_bytes()) != 0)
		elog(LOG, "could not unmap athena_deferred WAL segment %016llX: %m",
			 (unsigned long long) seg->segno);
	close(seg->fd);
}

/* Close the segments this backend has open, but keep (if open), as the first */
static void
wal_close_all_but(uint64 keep)
{
	int			kept = 0;

	for (int i = 0; i < wal_nsegs; i++)
	{
		if (wal_segs[i].segno == keep)
			wal_segs[kept++] = wal_segs[i];
		else
			wal_close_segment(&wal_segs[i]);
	}
	wal_nsegs = kept;
}

/*
 * A segment to write into: opened (created if need be) unless this backend
 * has it open already, and mapped if map.  NULL after reporting a failure
 * at elevel.
 */
static WalSegment *
wal_open_segment(uint64 segno, bool map, int elevel)
{
	WalSegment *seg = NULL;
	char	   *path;

	for (int i = 0; i < wal_nsegs && seg == NULL; i++)
	{
		if (wal_segs[i].segno == segno)
			seg = &wal_segs[i];
	}
	if (seg != NULL && (seg->base != NULL || !map))
		return seg;

	path = wal_segment_path(segno);
	if (seg == NULL)
	{
		int			fd;

		/* room first: an error after the open would lose the descriptor */
		if (wal_nsegs == wal_segs_size)
		{
			wal_segs_size = Max(4, wal_segs_size * 2);
			wal_segs = wal_segs == NULL
				? MemoryContextAlloc(TopMemoryContext, sizeof(WalSegment) * wal_segs_size)
				: repalloc(wal_segs, sizeof(WalSegment) * wal_segs_size);
		}
		fd = BasicOpenFile(path, O_RDWR | PG_BINARY);

		if (fd < 0 && errno == ENOENT)
		{
			if (!wal_create_segment(segno, elevel))
				return NULL;	/* reported */
			fd = BasicOpenFile(path, O_RDWR | PG_BINARY);
		}
		if (fd < 0)
		{
			ereport(elevel,
					(errcode_for_file_access(),
					 errmsg("could not open athena_deferred WAL file \"%s\": %m", path)));
			return NULL;
		}
		seg = &wal_segs[wal_nsegs++];
		seg->segno = segno;
		seg->fd = fd;
		seg->base = NULL;
	}
	if (map && seg->base == NULL)
	{
		void	   *base = MAP_FAILED;

		errno = EIO;			/* what the fault point reports */
		if (!fault_armed("wal_write"))
			base = mmap(NULL, wal_segment_bytes(), PROT_READ | PROT_WRITE, MAP_SHARED, seg->fd, 0);
		if (base == MAP_FAILED)
		{
			ereport(elevel,
					(errcode_for_file_access(),
					 errmsg("could not map athena_deferred WAL file \"%s\": %m", path)));
			return NULL;
		}
		seg->base = base;
	}
	pfree(path);
	return seg;
}

/* Bytes of the whole records at the start of data that fit in room */
static Size
records_fitting(const char *data, Size len, Size room)
{
	Size		off = 0;

	while (off < len)
	{
		uint32		reclen;
		Size		size;

		memcpy(&reclen, data + off + sizeof(uint32), sizeof(uint32));
		size = wal_record_size(reclen);
		if (off + size > room)
			break;
		off += size;
	}
	return off;
}

/*
 * The next piece of a write: how many of the records at data + done go to
 * the segment of *pos, after moving *pos to the start of the next segment
 * if not even the first record fits where it is.  0 if that record does not
 * fit in an empty segment either.
 */
static Size
next_chunk(const char *data, Size len, Size done, uint64 *pos)
{
	uint64		segsize = wal_segment_bytes();
	Size		chunk;

	chunk = records_fitting(data + done, len - done, segsize - *pos % segsize);
	if (chunk == 0 && *pos % segsize != 0)
	{
		*pos += segsize - *pos % segsize;
		chunk = records_fitting(data + done, len - done, segsize);
	}
	return chunk;
}

/*
 * Put len bytes of records at offset off of a segment: copied into its
 * mapping if map, else written with pwrite(), which can fail half-way (a
 * fault point does that).  Returns how many bytes went in, -1 on an error.
 */
static ssize_t
wal_put(WalSegment *seg, bool map, const char *data, Size len, off_t off)
{
	ssize_t		written;

	if (map)
	{
		memcpy(seg->base + off, data, len);
		return len;
	}
	errno = 0;
	pgstat_report_wait_start(PG_WAIT_EXTENSION);
	if (fault_armed("wal_write"))
	{
		written = pg_pwrite(seg->fd, data, len / 2, off);
		errno = EIO;
	}
	else
		written = pg_pwrite(seg->fd, data, len, off);
	pgstat_report_wait_end();
	return written;
}

/*
 * Overwrite [from, upto) with zeros, which readers skip: the bytes a failed
 * write may have put there.  Caller holds wal_lock.  Returns false if some
 * could not be overwritten.
 */
static bool
wal_erase(uint64 from, uint64 upto)
{
	uint64		segsize = wal_segment_bytes();

	while (from < upto)
	{
		Size		n = Min(upto - from, segsize - from % segsize);
		WalSegment *seg = wal_open_segment(from / segsize, false, LOG);

		if (seg == NULL || !wal_write_zeros(seg->fd, from % segsize, n))
			return false;
		from += n;
	}
	return true;
}

/*
 * Write framed records at the insert position: as many whole records as
 * fit in the current segment, the rest from the start of the next ones.
 * Returns the position just past them, or 0 after reporting a failure at
 * elevel.  *in_log tells whether any of the records may be in the log,
 * also when the write failed.
 */
static uint64
wal_write(const char *data, Size len, uint64 max_qseq, int elevel, bool *in_log)
{
	DeferredShared *q = deferred_shared;
	uint64		segsize = wal_segment_bytes();
	bool		map = (deferred_wal_sync != WAL_SYNC_ALWAYS);
	uint64		first = 0;
	uint64		pos;
	Size		done;

	*in_log = false;
	LWLockAcquire(q->wal_lock, LW_EXCLUSIVE);

	/*
	 * Open (creating them if need be) all the segments the records go to
	 * before writing any.  Creating a segment is what fails on a full disk
	 * or in an unwritable directory, and then nothing of this write must be
	 * in the log: records written in part look committed to recovery unless
	 * an abort marker follows them, and on a full disk the marker cannot be
	 * written either.
	 */
	pos = q->wal_insert_pos;
	for (done = 0; done < len;)
	{
		Size		chunk = next_chunk(data, len, done, &pos);

		if (chunk == 0)
		{
			LWLockRelease(q->wal_lock);
			ereport(elevel,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("deferred entry too large for a WAL segment"),
					 errhint("Queue smaller entries, or increase athena_deferred.wal_segment_size.")));
			return 0;
		}
		if (done == 0)
			first = pos;
		if (wal_open_segment(pos / segsize, map, elevel) == NULL)
		{
			LWLockRelease(q->wal_lock);
			return 0;
		}
		pos += chunk;
		done += chunk;
	}

	pos = q->wal_insert_pos;
	for (done = 0; done < len;)
	{
		Size		chunk = next_chunk(data, len, done, &pos);
		uint64		segno = pos / segsize;
		int			slot = segno % WAL_SEGMENT_SLOTS;

		/* opened above: this only looks it up */
		WalSegment *seg = wal_open_segment(segno, map, PANIC);
		ssize_t		written;

		/* a crash half-way through the write leaves a torn record (test point) */
		if (fault_armed("mid_wal_write"))
		{
			(void) wal_put(seg, map, data + done, chunk / 2, (off_t) (pos % segsize));
			deferred_fault("mid_wal_write");
		}

		written = wal_put(seg, map, data + done, chunk, (off_t) (pos % segsize));
		if (written != (ssize_t) chunk)
		{
			/*
			 * Only a device error or a filesystem that allocates on overwrite
			 * gets here: the segments exist.  Erase what this write put in
			 * the log; the insert position stays where it was, so the next
			 * write goes over it.  If even that fails, records of a
			 * transaction that is about to fail may stay in the log, and
			 * recovery would take them for committed: as PostgreSQL does when
			 * it cannot write its WAL, PANIC, so that the outcome is in doubt
			 * for the client rather than reported as an error.
			 */
			int			save_errno = errno ? errno : ENOSPC;
			uint64		upto = pos + (written > 0 ? written : 0);

			*in_log = !wal_erase(first, upto);
			LWLockRelease(q->wal_lock);
			errno = save_errno;
			ereport(*in_log && elevel >= ERROR ? PANIC : elevel,
					(errcode_for_file_access(),
					 errmsg("could not write to athena_deferred WAL segment %016llX: %m",
							(unsigned long long) segno)));
			return 0;
		}
		*in_log = true;

		if (q->seg_segno[slot] != segno)
		{
			q->seg_segno[slot] = segno;
			q->seg_max_qseq[slot] = 0;
		}
		q->seg_max_qseq[slot] = Max(q->seg_max_qseq[slot], max_qseq);
		pos += chunk;
		done += chunk;
		q->wal_bytes += chunk;
	}
	q->wal_insert_pos = pos;
	LWLockRelease(q->wal_lock);

	if (wal_nsegs > 1)
		wal_close_all_but((pos - 1) / segsize);
	return pos;
}

/* Frame one JSON record and append it to buf; false (reported at elevel) on failure */
static bool
append_record(StringInfo buf, json_t *rec, int elevel)
{
	char	   *payload = rec ? json_dumps(rec, JSON_COMPACT) : NULL;
	size_t		len;
	size_t		size;

	json_decref(rec);
	if (payload == NULL)
	{
		ereport(elevel,
				(errcode(ERRCODE_UNTRANSLATABLE_CHARACTER),
				 errmsg("could not write an athena_deferred WAL record"),
				 errdetail("Names and values must be valid UTF-8.")));
		return false;
	}
	len = strlen(payload);
	size = wal_record_size(len);
	enlargeStringInfo(buf, size);
	wal_record_frame(buf->data + buf->len, payload, len);
	buf->len += size;
	free(payload);
	return true;
}

/*
 * An entry as a WAL record: everything needed to queue it again.
 *
 * {"t":"e","id":..,"q":..,"db":..,"role":..,"rel":..,"op":..,"xid":..,
 *  "at":..,"att":..,"p":[{"k":..,"j":"text"},..]}
 *
 * When a transaction queued more than one entry, each of its records also
 * has "n", their number, and "i", its place among them (after "att"):
 * recovery does not apply a write cut short by a crash in part.
 *
 * (Records of version 0.3.0 and before also have "c", the part's column
 * names, and "n", whether each value is null, in each part; recovery
 * ignores them: the text has the same names.)
 *
 * jansson writes each part's text, as a JSON string.  The numbers, and the
 * punctuation between the pieces, are put here: jansson formats each
 * integer with snprintf(), and the nine of a record cost more than
 * everything else in it.  The result is what json_dumpb(.., JSON_COMPACT)
 * of the whole record gives.
 */

/* A jansson string holding the part text at hand, to be dumped */
static json_t *record_text = NULL;

/* The framed records of one commit, kept between commits */
static char *record_buf = NULL;
static Size record_buf_size = 0;

/* Make record_buf at least size bytes long, keeping its contents */
static void
record_buf_reserve(Size size)
{
	Size		newsize;

	if (size <= record_buf_size)
		return;
	newsize = Max(record_buf_size, 8192);
	while (newsize < size)
		newsize *= 2;
	if (record_buf == NULL)
		record_buf = MemoryContextAllocHuge(TopMemoryContext, newsize);
	else
		record_buf = repalloc_huge(record_buf, newsize);
	record_buf_size = newsize;
}

/* jansson fails to build values only when out of memory */
pg_attribute_noreturn()
static void
record_oom(void)
{
	ereport(ERROR,
			(errcode(ERRCODE_OUT_OF_MEMORY),
			 errmsg("out of memory building an athena_deferred WAL record")));
}

pg_attribute_noreturn()
static void
record_not_utf8(void)
{
	ereport(ERROR,
			(errcode(ERRCODE_UNTRANSLATABLE_CHARACTER),
			 errmsg("could not write an athena_deferred WAL record"),
			 errdetail("Names and values must be valid UTF-8.")));
}

static json_t *
json_checked(json_t *value)
{
	if (value == NULL)
		record_oom();
	return value;
}

/*
 * Append "key":value to the record being built at *off of record_buf, with
 * a comma before it unless it is the first.  Room was reserved.
 */
static void
record_put_int(Size *off, const char *key, int64 value)
{
	char	   *p = record_buf + *off;
	char		digits[20];
	int			ndigits = 0;
	uint64		u;

	*p++ = ',';
	*p++ = '"';
	while (*key)
		*p++ = *key++;
	*p++ = '"';
	*p++ = ':';
	if (value < 0)
		*p++ = '-';
	u = value < 0 ? -(uint64) value : (uint64) value;
	do
		digits[ndigits++] = '0' + u % 10;
	while ((u /= 10) != 0);
	while (ndigits > 0)
		*p++ = digits[--ndigits];
	*off = p - record_buf;
}

static void
record_put(Size *off, const char *bytes, Size len)
{
	record_buf_reserve(*off + len);
	memcpy(record_buf + *off, bytes, len);
	*off += len;
}

/* After a large entry, give its copies back rather than keep them */
static void
record_forget_large(void)
{
	const Size	large = 1024 * 1024;

	if (record_text != NULL && json_string_length(record_text) > large / 16)
		(void) json_string_setn_nocheck(record_text, "", 0);
	if (record_buf_size > large)
	{
		pfree(record_buf);
		record_buf = NULL;
		record_buf_size = 0;
	}
}

/*
 * Write entry e, queued by transaction xid, as a framed record at offset off
 * of record_buf, growing it as needed: the index-th of the transaction's n
 * records.  Returns the record's size.
 */
static Size
record_append(const DeferredEntry *e, TransactionId xid, int index, int n, Size off)
{
	const DeferredPart *part = entry_first_part(e);
	Size		start = off + WAL_RECORD_HEADER;
	Size		pos = start;
	Size		len;

	if (record_text == NULL)
		record_text = json_checked(json_string_nocheck(""));

	/* the fixed keys: eleven numbers of at most 20 bytes, with their names */
	record_buf_reserve(pos + 384);
	memcpy(record_buf + pos, "{\"t\":\"e\"", 8);
	pos += 8;
	record_put_int(&pos, "id", e->id);
	record_put_int(&pos, "q", (int64) e->qseq);
	record_put_int(&pos, "db", e->dbid);
	record_put_int(&pos, "role", e->roleid);
	record_put_int(&pos, "rel", e->relid);
	record_put_int(&pos, "op", e->op);
	record_put_int(&pos, "xid", xid);
	record_put_int(&pos, "at", e->enqueued_at);
	record_put_int(&pos, "att", e->attempts);
	if (n > 1)
	{
		record_put_int(&pos, "n", n);
		record_put_int(&pos, "i", index);
	}
	record_put(&pos, ",\"p\":[", 6);

	for (int i = 0; i < e->nparts; i++, part = part_next(part))
	{
		char		head[] = ",{\"k\":0,\"j\":";
		size_t		n;

		/* the part's kind, one digit, and a comma before all but the first */
		Assert(part->kind >= PART_ROWS && part->kind <= PART_CHANGES);
		head[6] = '0' + part->kind;
		record_put(&pos, head + (i == 0), sizeof(head) - 1 - (i == 0));

		/* the text, escaped by jansson: most fit at the first try */
		if (json_string_setn_nocheck(record_text, part_text(part), part->textlen) != 0)
			record_oom();
		record_buf_reserve(pos + 2 * (Size) part->textlen + 16);
		n = json_dumpb(record_text, record_buf + pos, record_buf_size - pos,
					   JSON_COMPACT | JSON_ENCODE_ANY);
		if (n > record_buf_size - pos)
		{
			record_buf_reserve(pos + n);
			n = json_dumpb(record_text, record_buf + pos, record_buf_size - pos,
						   JSON_COMPACT | JSON_ENCODE_ANY);
		}
		if (n == 0 || n > record_buf_size - pos)
			record_not_utf8();
		pos += n;
		record_put(&pos, "}", 1);
	}
	record_put(&pos, "]}", 2);

	len = pos - start;
	if (len > PG_UINT32_MAX - 64)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("deferred entry too large for a WAL record")));

	/* room for the padding, which the seal zeroes */
	record_buf_reserve(off + wal_record_size(len));
	wal_record_seal(record_buf + off, (uint32) len);
	return wal_record_size(len);
}

/*
 * Log a committing transaction's entries (already given their qseq) with
 * one write; xid is the transaction's, if it has one.  Returns the
 * position the log must be flushed to for them to be durable, or 0 when the
 * log is disabled.
 */
uint64
wal_append(DeferredEntry **entries, int nentries, TransactionId xid)
{
	uint64		max_qseq = 0;
	Size		len = 0;
	uint64		end;

	if (!deferred_wal_enabled)
		return 0;

	for (int i = 0; i < nentries; i++)
	{
		len += record_append(entries[i], xid, i, nentries, len);
		max_qseq = Max(max_qseq, entries[i]->qseq);
	}
	append_first_qseq = entries[0]->qseq;
	end = wal_write(record_buf, len, max_qseq, ERROR, &append_in_log);
	record_forget_large();
	return end;
}

/* fdatasync(), or one that reports a device error (fault point) */
static int
wal_fdatasync(int fd)
{
	if (fault_armed("wal_fsync"))
	{
		errno = EIO;
		return -1;
	}
	return pg_fdatasync(fd);
}

/*
 * Make the log durable up to upto, sharing the fsync with whoever else is
 * committing.  A failed fsync is not retried blindly: as for PostgreSQL's
 * own files, data_sync_retry decides between ERROR and PANIC.
 */
void
wal_flush(uint64 upto)
{
	DeferredShared *q = deferred_shared;
	uint64		segsize = wal_segment_bytes();

	while (pg_atomic_read_u64(&q->wal_flushed_pos) < upto)
	{
		uint64		from;
		uint64		target;

		/* if someone else is syncing, wait for them and look again */
		if (!LWLockAcquireOrWait(q->wal_flush_lock, LW_EXCLUSIVE))
			continue;

		from = pg_atomic_read_u64(&q->wal_flushed_pos);
		LWLockAcquire(q->wal_lock, LW_SHARED);
		target = q->wal_insert_pos;
		LWLockRelease(q->wal_lock);

		if (from < upto)
		{
			for (uint64 segno = from / segsize; segno <= (target - 1) / segsize; segno++)
			{
				char	   *path = wal_segment_path(segno);
				/* mostly the segment this backend has just written to */
				bool		own = (wal_nsegs > 0 && wal_segs[0].segno == segno);
				int			fd = own ? wal_segs[0].fd : BasicOpenFile(path, O_RDWR | PG_BINARY);

				/* a segment removed meanwhile no longer matters */
				if (fd < 0 && errno == ENOENT)
					continue;
				if (fd < 0)
					ereport(ERROR,
							(errcode_for_file_access(),
							 errmsg("could not open athena_deferred WAL file \"%s\": %m", path)));
				pgstat_report_wait_start(PG_WAIT_EXTENSION);
				if (wal_fdatasync(fd) != 0)
				{
					int			save_errno = errno;

					if (!own)
						close(fd);
					errno = save_errno;
					ereport(data_sync_elevel(ERROR),
							(errcode_for_file_access(),
							 errmsg("could not fsync athena_deferred WAL file \"%s\": %m", path)));
				}
				pgstat_report_wait_end();
				if (!own)
					close(fd);
				pfree(path);
			}
			pg_atomic_write_u64(&q->wal_flushed_pos, target);
			q->wal_last_sync = GetCurrentTimestamp();
		}
		LWLockRelease(q->wal_flush_lock);
	}
}

/*
 * Append records saying that entries were abandoned, {"t":"a","q":[..]},
 * at most 1000 entries each, which fits in the smallest segment.  False
 * (reported at elevel) on failure.
 */
static bool
append_abandoned(StringInfo buf, const uint64 *qseqs, int n, int elevel)
{
	for (int from = 0; from < n; from += 1000)
	{
		json_t	   *array = json_array();

		for (int i = from; i < Min(n, from + 1000); i++)
			json_array_append_new(array, json_integer((json_int_t) qseqs[i]));
		if (!append_record(buf, json_pack("{s:s, s:o}", "t", "a", "q", array), elevel))
			return false;
	}
	return true;
}

/*
 * Log that entries already written were abandoned: their transaction
 * aborted after pre-commit.  Runs during abort, so it reports failures as
 * WARNINGs and does not fsync (the next commit's fsync covers it); if it is
 * lost, the entries' xid (when they have one) still keeps recovery from
 * applying them.
 */
void
wal_append_abort(DeferredEntry **entries, int nentries)
{
	uint64	   *qseqs;
	StringInfoData buf;
	bool		in_log;

	if (!deferred_wal_enabled || nentries == 0)
		return;
	/* their write failed and left nothing behind */
	if (entries[0]->qseq == append_first_qseq && !append_in_log)
		return;
	qseqs = palloc(sizeof(uint64) * nentries);
	for (int i = 0; i < nentries; i++)
		qseqs[i] = entries[i]->qseq;
	initStringInfo(&buf);
	if (append_abandoned(&buf, qseqs, nentries, WARNING))
		(void) wal_write(buf.data, buf.len, 0, WARNING, &in_log);
}

/*
 * Recovery: log, durably, that entries were abandoned.  Failures are
 * WARNINGs: recovery goes on without the records.
 */
void
wal_append_abandoned(const uint64 *qseqs, int n)
{
	StringInfoData buf;
	bool		in_log;
	uint64		end;

	if (!deferred_wal_enabled)
		return;
	initStringInfo(&buf);
	if (!append_abandoned(&buf, qseqs, n, WARNING))
		return;
	end = wal_write(buf.data, buf.len, 0, WARNING, &in_log);
	if (end != 0)
		wal_flush(end);
	/* the launcher writes nothing else: do not keep the segment open */
	wal_close_all_but(PG_UINT64_MAX);
	pfree(buf.data);
}

/*
 * DROP EXTENSION, with nothing of this database queued: log, durably, that
 * every entry of the database below upto is settled.  Recovery then skips
 * the database's entries still in the WAL, which a progress table created
 * again (or none) could not tell apart from pending ones.
 */
void
wal_append_database_settled(Oid dbid, uint64 upto)
{
	StringInfoData buf;
	bool		in_log;
	uint64		end;

	if (!deferred_wal_enabled)
		return;
	initStringInfo(&buf);
	(void) append_record(&buf, json_pack("{s:s, s:I, s:I}", "t", "d", "db", (json_int_t) dbid,
										 "upto", (json_int_t) upto), ERROR);
	end = wal_write(buf.data, buf.len, 0, ERROR, &in_log);
	wal_flush(end);
	pfree(buf.data);
}

/* Make everything written so far durable (the batch-mode background sync) */
void
wal_flush_written(void)
{
	uint64		written;

	LWLockAcquire(deferred_shared->wal_lock, LW_SHARED);
	written = deferred_shared->wal_insert_pos;
	LWLockRelease(deferred_shared->wal_lock);
	wal_flush(written);
}

/*
 * With wal_sync = batch, milliseconds until the next background fsync is
 * due (0: now), or -1 when nothing waits to be synced.
 */
long
wal_sync_due_in(void)
{
	DeferredShared *q = deferred_shared;
	long		interval = deferred_batch_window_ms > 0 ? deferred_batch_window_ms : 1000;
	uint64		written;

	if (!deferred_wal_enabled || deferred_wal_sync != WAL_SYNC_BATCH)
		return -1;
	LWLockAcquire(q->wal_lock, LW_SHARED);
	written = q->wal_insert_pos;
	LWLockRelease(q->wal_lock);
	if (pg_atomic_read_u64(&q->wal_flushed_pos) >= written)
		return -1;
	return Max(0, interval - TimestampDifferenceMilliseconds(q->wal_last_sync, GetCurrentTimestamp()));
}

/*
 * Worker: create the segment being written and the one after it ahead of
 * need, so that committers rarely pay for zero-filling one.
 */
void
wal_prepare_segments(void)
{
	uint64		current;

	if (!deferred_wal_enabled)
		return;
	LWLockAcquire(deferred_shared->wal_lock, LW_SHARED);
	current = deferred_shared->wal_insert_pos / wal_segment_bytes();
	LWLockRelease(deferred_shared->wal_lock);

	for (uint64 segno = current; segno <= current + 1; segno++)
	{
		char	   *path = wal_segment_path(segno);
		struct stat st;

		if (stat(path, &st) != 0 && errno == ENOENT)
			(void) wal_create_segment(segno, LOG);
		pfree(path);
	}
}

static void
max_qseq_of_record(void *arg, json_t *rec, size_t offset pg_attribute_unused())
{
	uint64	   *max = arg;
	json_t	   *q = json_object_get(rec, "q");

	if (json_is_integer(q))
		*max = Max(*max, (uint64) json_integer_value(q));
	json_decref(rec);
}

static void
ignore_damage(void *arg pg_attribute_unused(), bool torn pg_attribute_unused(),
			  size_t offset pg_attribute_unused(), size_t len pg_attribute_unused())
{
}

/*
 * Highest entry in a segment, read from the file: for segments whose slot
 * in shared memory a newer one took (more than WAL_SEGMENT_SLOTS kept).
 */
static uint64
segment_max_qseq(uint64 segno)
{
	char	   *path = wal_segment_path(segno);
	int			fd = BasicOpenFile(path, O_RDONLY | PG_BINARY);
	uint64		size = wal_segment_bytes();
	char	   *buf;
	uint64		max = 0;
	WalScanStats stats = {0};
	ssize_t		got;

	if (fd < 0)
		return 0;				/* gone: nothing to keep */
	buf = palloc_extended(size, MCXT_ALLOC_HUGE);
	got = pg_pread(fd, buf, size, 0);
	close(fd);
	if (got < 0)
		max = PG_UINT64_MAX;	/* unreadable: keep it */
	else
		wal_scan_segment(buf, got, false, max_qseq_of_record, ignore_damage, &max, &stats);
	pfree(buf);
	pfree(path);
	return max;
}

/*
 * Worker, after a flush has committed: remove the segments, oldest first,
 * whose entries are all settled.  The segment being written is kept.
 */
void
wal_remove_settled(uint64 settled_qseq)
{
	DeferredShared *q = deferred_shared;
	uint64		current;

	LWLockAcquire(q->wal_lock, LW_SHARED);
	current = q->wal_insert_pos / wal_segment_bytes();
	LWLockRelease(q->wal_lock);

	while (q->wal_oldest_segno < current)
	{
		uint64		segno = q->wal_oldest_segno;
		int			slot = segno % WAL_SEGMENT_SLOTS;
		bool		settled;
		char	   *path;

		uint64		max_qseq;
		bool		known;

		LWLockAcquire(q->wal_lock, LW_SHARED);
		known = (q->seg_segno[slot] == segno);
		max_qseq = q->seg_max_qseq[slot];
		/* a slot never used for this segment: nothing was written to it */
		if (q->seg_segno[slot] < segno)
		{
			known = true;
			max_qseq = 0;
		}
		LWLockRelease(q->wal_lock);
		/* a slot taken over by a newer segment: read the segment itself */
		if (!known)
			max_qseq = segment_max_qseq(segno);
		settled = max_qseq < settled_qseq;
		if (!settled)
			break;

		path = wal_segment_path(segno);
		if (unlink(path) == 0)
		{
			LWLockAcquire(q->lock, LW_EXCLUSIVE);
			q->wal_segments--;
			LWLockRelease(q->lock);
			deferred_fault("segment_removal");
		}
		else if (errno != ENOENT)
		{
			ereport(LOG,
					(errcode_for_file_access(),
					 errmsg("could not remove athena_deferred WAL file \"%s\": %m", path)));
			break;
		}
		pfree(path);
		q->wal_oldest_segno++;
	}
}
