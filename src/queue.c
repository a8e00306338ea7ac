/*-------------------------------------------------------------------------
 *
 * queue.c
 *		The shared-memory queue: a ring of entries in commit order.
 *
 * Space is handled in two steps so that a commit never fails because of
 * the queue: a call accounts for its entry's bytes (waiting for room if it
 * must, and failing while the transaction can still abort), pre-commit
 * turns those bytes into ring positions, commit publishes them.  The
 * worker reads published entries from the head; it stops at the first
 * entry still RESERVED so that entries are applied in commit order.
 *
 * Each database with entries has a slot (DeferredDatabase): its worker
 * reads only its own database's entries, in commit order, and its share of
 * the ring is capped at half while another database has entries or waits
 * for room, so that one busy database cannot take the whole queue.  The
 * ring itself is released in commit order: a database whose oldest entry
 * keeps failing holds the space behind it until that entry is retried to a
 * dead letter.
 *
 * This file knows nothing of SQL or files.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/mman.h>

#include "miscadmin.h"
#include "pgstat.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "athena_deferred.h"

/*
 * The slot of the database of this backend's latest queue_account(): its
 * transaction's entries are published there (queue_publish).
 */
static DeferredDatabase *account_slot = NULL;

static inline Size
ring_offset(uint64 pos)
{
	return (Size) (pos % deferred_shared->capacity);
}

/* Copy len bytes into the ring at logical position pos, wrapping */
static void
ring_write(uint64 pos, const void *src, Size len)
{
	Size		off = ring_offset(pos);
	Size		first = Min(len, deferred_shared->capacity - off);

	memcpy(deferred_shared->ring + off, src, first);
	if (first < len)
		memcpy(deferred_shared->ring, (const char *) src + first, len - first);
}

/* Copy len bytes out of the ring from logical position pos, wrapping */
static void
ring_read(uint64 pos, void *dst, Size len)
{
	Size		off = ring_offset(pos);
	Size		first = Min(len, deferred_shared->capacity - off);

	memcpy(dst, deferred_shared->ring + off, first);
	if (first < len)
		memcpy((char *) dst + first, deferred_shared->ring, len - first);
}

static void
ring_set_state(uint64 pos, uint8 state)
{
	ring_write(pos + offsetof(DeferredEntry, state), &state, sizeof(state));
}

/*
 * Entries start MAXALIGNed in the ring (the ring is aligned, entry sizes
 * are multiples of MAXALIGN), so reading their headers in place is safe
 * anywhere; it is done only on the platforms it was tested on, and entries
 * are copied elsewhere.
 */
#if defined(__x86_64__) || defined(__i386__) || defined(__aarch64__)
#define RING_READ_IN_PLACE true
#else
#define RING_READ_IN_PLACE false
#endif

/*
 * The header of the entry at ring offset off: where it lies in the ring,
 * or, if it wraps around the ring's end, a copy in *buf.  Loops over the
 * ring keep the offset themselves rather than divide (ring_offset) at each
 * entry.
 */
static inline const DeferredEntry *
ring_header_at(Size off, DeferredEntry *buf)
{
	if (RING_READ_IN_PLACE && off + sizeof(DeferredEntry) <= deferred_shared->capacity)
		return (const DeferredEntry *) (deferred_shared->ring + off);
	ring_read(off, buf, sizeof(DeferredEntry));
	return buf;
}

/*
 * A hint to the CPU that the ring memory at addr is read (or written) next.
 * The flush walks tens of megabytes of entries in order, several times:
 * fetching a few entries ahead turns one cache miss per entry into a
 * stream.
 */
#if defined(__GNUC__) || defined(__clang__)
#define ring_prefetch(addr, write)	__builtin_prefetch((addr), (write))
#else
#define ring_prefetch(addr, write)	((void) 0)
#endif
#define RING_PREFETCH_AHEAD	1024	/* bytes: about eight small entries */

/* Ring offset off moved on by size bytes */
static inline Size
ring_offset_add(Size off, Size size)
{
	off += size;
	return off >= deferred_shared->capacity ? off - deferred_shared->capacity : off;
}

/*
 * Mapping the ring.
 *
 * A process maps shared memory page by page, on first touch (fork does not
 * copy the page tables of shared mappings), and the ring moves on through
 * pages a process has not touched yet all the time: most reservations
 * would take a page fault writing an entry header -- a few microseconds in
 * a VM, the costliest part of queue_reserve(), and under the queue lock --
 * and the worker would take one every few entries it reads.
 *
 * So the ring's memory is allocated once, at start (ring_allocate), and a
 * process maps the part it is about to touch before taking the lock
 * (ring_map_range): reading one byte of a 64 kB region makes the kernel map
 * the whole region, since it maps the neighbours of a faulting page that
 * are in memory ("fault-around"), writable in shared memory.  A process
 * probes each region once.  Where either does not work, pages fault in one
 * by one as before.
 */
#define RING_MAP_CHUNK	(64 * 1024)

static void
ring_allocate(DeferredShared *shared)
{
#ifdef MADV_POPULATE_WRITE
	uintptr_t	from = (uintptr_t) shared->ring & ~((uintptr_t) 4095);
	uintptr_t	to = (uintptr_t) shared->ring + shared->capacity;

	/*
	 * Changes no byte.  Before Linux 5.14 it fails (EINVAL) and pages are
	 * allocated as they are first touched; without the memory, it fails
	 * (ENOMEM) or the OOM killer acts, as it would later.
	 */
	(void) madvise((void *) from, TYPEALIGN(4096, to) - from, MADV_POPULATE_WRITE);
#endif
}

/*
 * Map the regions of the ring that bytes from logical position pos on lie
 * in into this process.  The probe reads the last page of a region, which
 * the process is least likely to have touched already: a read of a page
 * already mapped maps nothing around it.
 */
static void
ring_map_range(uint64 pos, uint64 bytes)
{
	static uint8 *mapped = NULL;	/* one bit per region of the ring */
	DeferredShared *q = deferred_shared;
	uintptr_t	ring_start = (uintptr_t) q->ring;
	uintptr_t	ring_end = ring_start + q->capacity;
	uintptr_t	base = ring_start & ~((uintptr_t) RING_MAP_CHUNK - 1);
	Size		nregions = (ring_end - base + RING_MAP_CHUNK - 1) / RING_MAP_CHUNK;
	Size		first = (ring_start + ring_offset(pos) - base) / RING_MAP_CHUNK;
	Size		last;

	if (mapped == NULL)
		mapped = MemoryContextAllocZero(TopMemoryContext, nregions / 8 + 1);

	if (bytes >= q->capacity - RING_MAP_CHUNK)
		last = (first + nregions - 1) % nregions;	/* all of them */
	else
		last = (ring_start + ring_offset(pos + bytes) - base) / RING_MAP_CHUNK;

	for (Size region = first;; region = (region + 1) % nregions)
	{
		if (!(mapped[region / 8] & (1 << (region % 8))))
		{
			uintptr_t	probe = Min(base + (region + 1) * RING_MAP_CHUNK, ring_end) - 1;

			/* a read of a byte someone may be writing: its value is unused */
			(void) *(volatile char *) probe;
			mapped[region / 8] |= 1 << (region % 8);
		}
		if (region == last)
			break;
	}
}

/* A ring position (head_pos, reserve_pos) read without the lock, as a hint */
static inline uint64
pos_hint(const uint64 *pos)
{
	return *(const volatile uint64 *) pos;
}

/* Shared memory needed for the queue */
Size
queue_shmem_size(void)
{
	return add_size(MAXALIGN(offsetof(DeferredShared, ring)),
					(Size) deferred_queue_size_kb * 1024);
}

/* Initialize the queue when its shared memory was just created */
void
queue_shmem_init(DeferredShared *shared, bool found)
{
	if (found)
		return;
	memset(shared, 0, offsetof(DeferredShared, ring));
	shared->capacity = (uint64) deferred_queue_size_kb * 1024;
	shared->next_qseq = 1;
	shared->settled_qseq = 1;
	pg_atomic_init_u64(&shared->wal_flushed_pos, 0);
	pg_atomic_init_u64(&shared->pending, 0);
	pg_atomic_init_u64(&shared->enqueued, 0);
	for (int i = 0; i < DEFERRED_MAX_DATABASES; i++)
		pg_atomic_init_u64(&shared->databases[i].pending, 0);
	ConditionVariableInit(&shared->space_cv);
	ConditionVariableInit(&shared->settled_cv);
	ring_allocate(shared);
}

/*
 * The slot of database dbid, or NULL if it has none; with create, a free
 * slot is taken for it if needed (NULL if there is none).  Caller holds
 * the lock, exclusively to create.
 */
DeferredDatabase *
queue_database_slot(Oid dbid, bool create)
{
	DeferredDatabase *free_slot = NULL;

	for (int i = 0; i < DEFERRED_MAX_DATABASES; i++)
	{
		DeferredDatabase *db = &deferred_shared->databases[i];

		if (db->dbid == dbid)
			return db;
		if (db->dbid == InvalidOid && free_slot == NULL)
			free_slot = db;
	}
	if (!create || free_slot == NULL)
		return NULL;
	memset(free_slot, 0, sizeof(DeferredDatabase));
	pg_atomic_init_u64(&free_slot->pending, 0);
	free_slot->dbid = dbid;
	return free_slot;
}

/*
 * May database db take size more bytes?  Not beyond half of the ring while
 * another database holds entries or has waited for room within the last
 * second.  Caller holds the lock.
 */
static bool
within_share(const DeferredDatabase *db, Size size, TimestampTz now)
{
	DeferredShared *q = deferred_shared;

	if (db->bytes + size <= q->capacity / 2)
		return true;
	for (int i = 0; i < DEFERRED_MAX_DATABASES; i++)
	{
		const DeferredDatabase *other = &q->databases[i];

		if (other != db && other->dbid != InvalidOid &&
			(other->bytes > 0 ||
			 (other->waiting_since != 0 && TimestampDifferenceMilliseconds(other->waiting_since, now) < 1000)))
			return false;
	}
	return true;
}

/*
 * Room is wanted: ask every database's worker to flush what is queued (the
 * timer may be off), and wake the launcher to start missing workers.
 */
static void
wake_all(void)
{
	DeferredShared *q = deferred_shared;

	LWLockAcquire(q->lock, LW_EXCLUSIVE);
	for (int i = 0; i < DEFERRED_MAX_DATABASES; i++)
	{
		DeferredDatabase *db = &q->databases[i];

		if (db->dbid == InvalidOid || pg_atomic_read_u64(&db->pending) == 0)
			continue;
		db->flush_requested_qseq = Max(db->flush_requested_qseq, q->next_qseq);
		if (db->worker_latch != NULL)
			SetLatch(db->worker_latch);
	}
	LWLockRelease(q->lock);
	queue_wake_launcher();
}

/*
 * Promise size bytes of the ring to the calling transaction, waiting up to
 * timeout_ms for the workers to make room.
 */
void
queue_account(Size size, int timeout_ms)
{
	DeferredShared *q = deferred_shared;
	TimestampTz deadline = 0;

	if (size > q->capacity)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("deferred entry of %zu bytes does not fit in the queue", size),
				 errdetail("athena_deferred.queue_size is %llu bytes.",
						   (unsigned long long) q->capacity),
				 errhint("Split the mutation into smaller calls or increase athena_deferred.queue_size.")));

	for (;;)
	{
		bool		done = false;
		bool		recovered;
		bool		fair = true;
		long		remaining;
		TimestampTz now = GetCurrentTimestamp();
		DeferredDatabase *db;

		/* slots are taken only once recovery has made the ones it needs */
		LWLockAcquire(q->lock, LW_EXCLUSIVE);
		recovered = q->recovered;
		db = recovered ? queue_database_slot(MyDatabaseId, true) : NULL;
		if (db != NULL && q->reserve_pos - q->head_pos + q->accounted + size <= q->capacity)
		{
			fair = within_share(db, size, now);
			if (fair)
			{
				q->accounted += size;
				db->bytes += size;
				db->waiting_since = 0;
				account_slot = db;
				done = true;
			}
		}
		if (db != NULL && !done)
			db->waiting_since = now;
		LWLockRelease(q->lock);
		if (done)
			break;

		/* no room, or recovery pending: make sure the workers are on it, wait */
		wake_all();
		if (deadline == 0)
			deadline = TimestampTzPlusMilliseconds(now, timeout_ms);
		remaining = TimestampDifferenceMilliseconds(now, deadline);
		if (remaining <= 0 && !recovered)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("athena_deferred has not finished recovering its queue"),
					 errdetail("The launcher replays the WAL of pending entries when the server starts; no entry is accepted before that."),
					 errhint("Check that the athena_deferred launcher and workers are running, and what they log.")));
		if (remaining <= 0 && db == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
					 errmsg("too many databases have entries in the deferred queue"),
					 errdetail("At most %d databases can have entries queued at the same time.",
							   DEFERRED_MAX_DATABASES),
					 errhint("Retry when the other databases' entries have been applied.")));
		if (remaining <= 0 && !fair)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_RESOURCES),
					 errmsg("deferred queue is full for this database"),
					 errdetail("This database holds half of the queue while other databases have entries; no room was made for %zu bytes within athena_deferred.enqueue_timeout_ms (%d ms).",
							   size, timeout_ms),
					 errhint("Increase athena_deferred.queue_size, or make the worker flush more often.")));
		if (remaining <= 0)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_RESOURCES),
					 errmsg("deferred queue is full"),
					 errdetail("No room was made for %zu bytes within athena_deferred.enqueue_timeout_ms (%d ms).",
							   size, timeout_ms),
					 errhint("Increase athena_deferred.queue_size, or make the worker flush more often.")));
		ConditionVariableTimedSleep(&q->space_cv, Min(remaining, 100),
									PG_WAIT_EXTENSION);
	}
	ConditionVariableCancelSleep();
}

/* Give back bytes promised by queue_account() */
void
queue_unaccount(Size size)
{
	DeferredShared *q = deferred_shared;
	DeferredDatabase *db;

	LWLockAcquire(q->lock, LW_EXCLUSIVE);
	db = queue_database_slot(MyDatabaseId, false);
	Assert(q->accounted >= size && db != NULL && db->bytes >= size);
	q->accounted -= size;
	if (db != NULL)
		db->bytes -= size;
	LWLockRelease(q->lock);
	ConditionVariableBroadcast(&q->space_cv);
}

/*
 * Give accounted entries their places in commit order and copy them in.
 * The headers go in under the lock, marked RESERVED; the bodies after it,
 * since nobody reads a RESERVED entry's body.
 */
void
queue_reserve(DeferredEntry **entries, uint64 *positions, int nentries)
{
	DeferredShared *q = deferred_shared;
	Size		total = 0;
	int			i;

	for (i = 0; i < nentries; i++)
		total += entries[i]->size;
	/* and the next region too, before anyone writes into it */
	ring_map_range(pos_hint(&q->reserve_pos), Min(total, 1024 * 1024) + RING_MAP_CHUNK);

	LWLockAcquire(q->lock, LW_EXCLUSIVE);
	for (i = 0; i < nentries; i++)
	{
		DeferredEntry *e = entries[i];

		e->qseq = q->next_qseq++;
		e->state = ENTRY_RESERVED;
		positions[i] = q->reserve_pos;
		q->reserve_pos += e->size;
		Assert(q->accounted >= e->size);
		q->accounted -= e->size;
		ring_write(positions[i], e, sizeof(DeferredEntry));
	}
	LWLockRelease(q->lock);

	for (i = 0; i < nentries; i++)
		ring_write(positions[i] + sizeof(DeferredEntry),
				   (char *) entries[i] + sizeof(DeferredEntry),
				   entries[i]->size - sizeof(DeferredEntry));
}

/*
 * Move the head past settled entries, so their space can be reused.
 * Caller holds the lock exclusively.
 */
static void
queue_advance_head_locked(void)
{
	DeferredShared *q = deferred_shared;
	DeferredEntry buf;
	Size		off = ring_offset(q->head_pos);

	while (q->head_pos < q->reserve_pos)
	{
		const DeferredEntry *hdr = ring_header_at(off, &buf);

		if (hdr->state == ENTRY_RESERVED || hdr->state == ENTRY_PUBLISHED)
		{
			q->settled_qseq = hdr->qseq;
			return;
		}
		q->head_pos += hdr->size;
		off = ring_offset_add(off, hdr->size);
	}
	q->settled_qseq = q->next_qseq;
}

/*
 * The same, but not past the entry at upto, and without setting
 * settled_qseq: false if the head stopped before that entry (at an entry
 * not settled, which stays so while the caller holds the lock).  *head_off
 * is the head's ring offset, kept by the caller from call to call.
 */
static bool
queue_advance_head_upto_locked(uint64 upto, Size *head_off)
{
	DeferredShared *q = deferred_shared;
	DeferredEntry buf;

	Assert(upto < q->reserve_pos && *head_off == ring_offset(q->head_pos));
	while (q->head_pos <= upto)
	{
		const DeferredEntry *hdr = ring_header_at(*head_off, &buf);

		if (hdr->state == ENTRY_RESERVED || hdr->state == ENTRY_PUBLISHED)
			return false;
		q->head_pos += hdr->size;
		*head_off = ring_offset_add(*head_off, hdr->size);
	}
	return true;
}

/*
 * Make reserved entries visible to the worker: called at commit.  Wakes the
 * database's worker when batch_max_size entries are pending, and the
 * launcher when the database has no worker yet.
 *
 * Without the lock: what the worker reads of an entry (its header, set
 * under the lock at reserve time, and its body) is written before its state
 * changes, and the state is one byte.  The database's slot is the one the
 * transaction accounted its entries in, which cannot be freed while they
 * hold space in it.  The counters go up first, so that they never count
 * fewer entries than a worker can see and settle.
 */
void
queue_publish(const uint64 *positions, int nentries)
{
	DeferredShared *q = deferred_shared;
	DeferredDatabase *db = account_slot;
	uint64		pending;
	Latch	   *worker;
	Latch	   *wake = NULL;

	Assert(db != NULL && db->dbid == MyDatabaseId);
	pg_atomic_fetch_add_u64(&q->pending, nentries);
	pg_atomic_fetch_add_u64(&q->enqueued, nentries);
	pending = pg_atomic_add_fetch_u64(&db->pending, nentries);

	/*
	 * Whom to wake is read before the entries are published: until then
	 * their bytes keep the slot ours (a worker leaves it, and the launcher
	 * frees it, only when the database has none in the queue).  A worker
	 * that exits on an error meanwhile leaves a latch nobody waits on, and
	 * wakes the launcher itself.
	 */
	worker = *(Latch *volatile *) &db->worker_latch;
	if (worker == NULL)
		wake = *(Latch *volatile *) &q->launcher_latch;
	else if (deferred_batch_max_size > 0 && pending >= (uint64) deferred_batch_max_size)
		wake = worker;

	pg_write_barrier();
	for (int i = 0; i < nentries; i++)
		ring_set_state(positions[i], ENTRY_PUBLISHED);

	if (wake != NULL)
		SetLatch(wake);
}

/* Withdraw reserved entries whose transaction aborted after pre-commit */
void
queue_cancel(const uint64 *positions, int nentries)
{
	DeferredShared *q = deferred_shared;
	DeferredDatabase *db;
	DeferredEntry hdr;

	LWLockAcquire(q->lock, LW_EXCLUSIVE);
	db = queue_database_slot(MyDatabaseId, false);
	for (int i = 0; i < nentries; i++)
	{
		ring_read(positions[i], &hdr, sizeof(hdr));
		ring_set_state(positions[i], ENTRY_CANCELLED);
		if (db != NULL)
			db->bytes -= hdr.size;
	}
	queue_advance_head_locked();
	LWLockRelease(q->lock);
	ConditionVariableBroadcast(&q->space_cv);
}

/*
 * Copy up to max_entries published entries of the current database, oldest
 * first, into the current memory context, under the lock (the worker may
 * release their space as soon as it is released).  Stops at the database's
 * first entry whose transaction has not yet committed, so that nothing
 * overtakes it.  Returns how many were copied.
 */
int
queue_collect(DeferredEntry ***entries, uint64 **positions, int max_entries)
{
	DeferredShared *q = deferred_shared;
	DeferredEntry hdr;
	uint64		pos;
	int			n = 0;
	int			allocated = 64;

	*positions = palloc(sizeof(uint64) * allocated);
	*entries = palloc(sizeof(DeferredEntry *) * allocated);

	LWLockAcquire(q->lock, LW_SHARED);
	for (pos = q->head_pos; pos < q->reserve_pos && n < max_entries; pos += hdr.size)
	{
		ring_read(pos, &hdr, sizeof(hdr));
		if (hdr.size < sizeof(DeferredEntry) || hdr.size > q->capacity)
			elog(PANIC, "athena_deferred: corrupt queue entry of %u bytes at %llu",
				 hdr.size, (unsigned long long) pos);
		if (hdr.dbid != MyDatabaseId)
			continue;
		if (hdr.state == ENTRY_RESERVED)
			break;
		if (hdr.state != ENTRY_PUBLISHED)
			continue;
		if (n == allocated)
		{
			allocated *= 2;
			*positions = repalloc(*positions, sizeof(uint64) * allocated);
			*entries = repalloc(*entries, sizeof(DeferredEntry *) * allocated);
		}
		(*positions)[n] = pos;
		(*entries)[n] = palloc(hdr.size);
		pg_read_barrier();		/* published without the lock: body first */
		ring_read(pos, (*entries)[n], hdr.size);
		n++;
	}
	LWLockRelease(q->lock);
	return n;
}

/* Make room for at least one more entry in take's arrays */
static void
take_grow(QueueTake *take)
{
	int			allocated = Max(take->allocated * 2, 1024);

	if (take->allocated == 0)
	{
		take->entries = MemoryContextAllocHuge(take->cxt, sizeof(DeferredEntry *) * allocated);
		take->positions = MemoryContextAllocHuge(take->cxt, sizeof(uint64) * allocated);
		take->states = MemoryContextAllocHuge(take->cxt, sizeof(uint8) * allocated);
		take->attempts = MemoryContextAllocHuge(take->cxt, sizeof(uint32) * allocated);
	}
	else
	{
		take->entries = repalloc_huge(take->entries, sizeof(DeferredEntry *) * allocated);
		take->positions = repalloc_huge(take->positions, sizeof(uint64) * allocated);
		take->states = repalloc_huge(take->states, sizeof(uint8) * allocated);
		take->attempts = repalloc_huge(take->attempts, sizeof(uint32) * allocated);
	}
	take->allocated = allocated;
}

/*
 * Worker: take up to max_entries published entries of the current
 * database, oldest first, for a flush (see QueueTake).  Stops at the
 * database's first entry whose transaction has not yet committed, so that
 * nothing overtakes it.  An entry that wraps around the ring's end is
 * copied, after the lock is released, into the current memory context.
 */
void
queue_take(QueueTake *take, int max_entries)
{
	DeferredShared *q = deferred_shared;
	DeferredEntry hdrbuf;
	const DeferredEntry *hdr;
	uint64		pos;
	int			n = 0;
	Size		off;
	uint64		head = pos_hint(&q->head_pos);

	Assert(take->cxt != NULL);
	ring_map_range(head, Min(pos_hint(&q->reserve_pos) - head, 64 * 1024 * 1024));
	LWLockAcquire(q->lock, LW_SHARED);
	off = ring_offset(q->head_pos);
	for (pos = q->head_pos; pos < q->reserve_pos && n < max_entries;
		 pos += hdr->size, off = ring_offset_add(off, hdr->size))
	{
		hdr = ring_header_at(off, &hdrbuf);
		ring_prefetch(q->ring + ring_offset_add(off, RING_PREFETCH_AHEAD), 0);
		if (hdr->size < sizeof(DeferredEntry) || hdr->size > q->capacity)
			elog(PANIC, "athena_deferred: corrupt queue entry of %u bytes at %llu",
				 hdr->size, (unsigned long long) pos);
		if (hdr->dbid != MyDatabaseId)
			continue;
		if (hdr->state == ENTRY_RESERVED)
			break;
		if (hdr->state != ENTRY_PUBLISHED)
			continue;
		if (n == take->allocated)
			take_grow(take);
		take->positions[n] = pos;
		take->entries[n] = (RING_READ_IN_PLACE && off + hdr->size <= q->capacity) ?
			(DeferredEntry *) (q->ring + off) : NULL;
		take->states[n] = ENTRY_PUBLISHED;
		take->attempts[n] = hdr->attempts;
		n++;
	}
	LWLockRelease(q->lock);
	take->n = n;

	/*
	 * Published entries do not change, and only this worker releases them;
	 * releasing the lock was a full barrier, so the bodies of entries seen
	 * published (without the lock, queue_publish) are visible.
	 */
	for (int i = 0; i < n; i++)
	{
		if (take->entries[i] == NULL)
		{
			ring_read(take->positions[i], &hdrbuf, sizeof(hdrbuf));
			take->entries[i] = palloc(hdrbuf.size);
			ring_read(take->positions[i], take->entries[i], hdrbuf.size);
		}
	}
}

/*
 * Worker: headers of the database's published entries from from_pos on with
 * a qseq below upto (those a flush did not collect but its progress record
 * covers).
 */
List *
queue_unsettled_below(uint64 from_pos, uint64 upto)
{
	DeferredShared *q = deferred_shared;
	List	   *result = NIL;
	DeferredEntry hdr;

	LWLockAcquire(q->lock, LW_SHARED);
	for (uint64 pos = from_pos; pos < q->reserve_pos; pos += hdr.size)
	{
		ring_read(pos, &hdr, sizeof(hdr));
		if (hdr.qseq >= upto)
			break;
		if (hdr.dbid == MyDatabaseId &&
			(hdr.state == ENTRY_PUBLISHED || hdr.state == ENTRY_RESERVED))
		{
			DeferredEntry *copy = palloc(sizeof(DeferredEntry));

			memcpy(copy, &hdr, sizeof(hdr));
			result = lappend(result, copy);
		}
	}
	LWLockRelease(q->lock);
	return result;
}

/*
 * Remember an entry's outcome for deferred_wait(), for the current
 * database (ids are unique only within one); caller holds the lock
 */
static void
note_outcome_locked(int64 id, EntryOutcome outcome)
{
	OutcomeSlot *slot = &deferred_shared->outcomes[deferred_shared->outcomes_written++ % OUTCOME_SLOTS];

	slot->id = id;
	slot->dbid = MyDatabaseId;
	slot->outcome = outcome;
}

/*
 * Record the outcome of a flush: each entry taken is either settled
 * (ENTRY_DONE or ENTRY_DEAD), its space released, or still PUBLISHED with
 * a new attempt count.  take's entries must not be read after this.
 */
void
queue_settle(QueueTake *take, int64 applied, int64 failed, int64 dead,
			 int64 duration_us)
{
	DeferredShared *q = deferred_shared;
	DeferredDatabase *db;
	int			nentries = take->n;
	int			bucket = 0;
	bool		advancing = true;
	Size		head_off;
	int64		settled = 0;
	int			i;

	LWLockAcquire(q->lock, LW_EXCLUSIVE);
	head_off = ring_offset(q->head_pos);
	db = queue_database_slot(MyDatabaseId, false);
	Assert(db != NULL || nentries == 0);
	for (i = 0; i < nentries; i++)
	{
		DeferredEntry *e = take->entries[i];
		uint8		state = take->states[i];
		bool		in_ring = ((char *) e >= q->ring && (char *) e < q->ring + q->capacity);

		if (i + 8 < nentries)
			ring_prefetch(take->entries[i + 8], 1);

		if (take->attempts[i] != e->attempts)
		{
			DeferredEntry changed;

			changed.attempts = take->attempts[i];
			if (in_ring)
				e->attempts = changed.attempts;
			else
				ring_write(take->positions[i] + offsetof(DeferredEntry, attempts),
						   &changed.attempts, sizeof(changed.attempts));
		}
		if (state == ENTRY_DONE || state == ENTRY_DEAD)
		{
			note_outcome_locked(e->id, state == ENTRY_DONE ? OUTCOME_APPLIED : OUTCOME_DEAD_LETTER);
			settled++;
			db->bytes -= e->size;
			if (in_ring)
				e->state = state;
			else
				ring_set_state(take->positions[i], state);
		}
		/* release the space up to here while the entry is in the cache */
		if (advancing)
			advancing = queue_advance_head_upto_locked(take->positions[i], &head_off);
	}
	if (settled > 0)
	{
		pg_atomic_fetch_sub_u64(&q->pending, settled);
		pg_atomic_fetch_sub_u64(&db->pending, settled);
	}
	q->applied += applied;
	q->failed_attempts += failed;
	q->dead_lettered += dead;
	/* a negative duration: settled without a flush (recovery_reconcile) */
	if (nentries > 0 && duration_us >= 0)
	{
		q->flushes++;
		q->last_flush_at = GetCurrentTimestamp();
		q->last_flush_us = duration_us;
		q->last_flush_entries = nentries;
		while (bucket < FLUSH_HISTOGRAM - 1 && (INT64CONST(1000) << bucket) <= duration_us)
			bucket++;
		q->flush_histogram[bucket]++;
	}
	queue_advance_head_locked();
	LWLockRelease(q->lock);
	take->n = 0;

	ConditionVariableBroadcast(&q->space_cv);
	ConditionVariableBroadcast(&q->settled_cv);
}

/* Keep the last error of a failing entry, for deferred_pending() */
void
queue_note_error(uint64 qseq, const char *message)
{
	ErrorSlot  *slot = &deferred_shared->errors[qseq % ERROR_SLOTS];

	LWLockAcquire(deferred_shared->lock, LW_EXCLUSIVE);
	slot->qseq = qseq;
	strlcpy(slot->message, message ? message : "unknown error", ERROR_MESSAGE_LEN);
	LWLockRelease(deferred_shared->lock);
}

/* Remember that these entries' transaction rolled back */
void
queue_note_rolled_back(const int64 *ids, int nids)
{
	LWLockAcquire(deferred_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < nids; i++)
		note_outcome_locked(ids[i], OUTCOME_ROLLED_BACK);
	LWLockRelease(deferred_shared->lock);
	ConditionVariableBroadcast(&deferred_shared->settled_cv);
}

/*
 * What is known of entry id: pending in the queue, or a recent outcome.
 * OUTCOME_UNKNOWN with *too_old set means the id is older than every
 * outcome remembered; without it, the entry may not have committed yet.
 */
EntryOutcome
queue_outcome(int64 id, bool *too_old)
{
	DeferredShared *q = deferred_shared;
	EntryOutcome result = OUTCOME_UNKNOWN;
	int64		oldest = PG_INT64_MAX;
	DeferredEntry hdr;
	uint64		n;

	LWLockAcquire(q->lock, LW_SHARED);
	n = Min(q->outcomes_written, OUTCOME_SLOTS);
	for (uint64 i = 0; i < n && result == OUTCOME_UNKNOWN; i++)
	{
		if (q->outcomes[i].dbid != MyDatabaseId)
			continue;
		if (q->outcomes[i].id == id)
			result = q->outcomes[i].outcome;
		oldest = Min(oldest, q->outcomes[i].id);
	}
	for (uint64 pos = q->head_pos; pos < q->reserve_pos && result == OUTCOME_UNKNOWN; pos += hdr.size)
	{
		ring_read(pos, &hdr, sizeof(hdr));
		if (hdr.id == id && hdr.dbid == MyDatabaseId &&
			(hdr.state == ENTRY_RESERVED || hdr.state == ENTRY_PUBLISHED))
			result = OUTCOME_PENDING;
	}
	*too_old = (result == OUTCOME_UNKNOWN && q->outcomes_written > OUTCOME_SLOTS && id < oldest);
	LWLockRelease(q->lock);
	return result;
}

/* Enqueue time of the oldest pending entry, or 0 if none */
TimestampTz
queue_oldest_pending(void)
{
	DeferredShared *q = deferred_shared;
	DeferredEntry hdr;
	TimestampTz oldest = 0;

	LWLockAcquire(q->lock, LW_SHARED);
	for (uint64 pos = q->head_pos; pos < q->reserve_pos; pos += hdr.size)
	{
		ring_read(pos, &hdr, sizeof(hdr));
		if (hdr.state == ENTRY_PUBLISHED)
		{
			oldest = hdr.enqueued_at;
			break;
		}
	}
	LWLockRelease(q->lock);
	return oldest;
}

/*
 * Recovery: put entries replayed from the WAL, sorted by qseq, into the
 * empty queue as published, and let calls in.  Their databases have slots
 * (the launcher made them).
 */
void
queue_restore(DeferredEntry **entries, int nentries, uint64 next_qseq)
{
	DeferredShared *q = deferred_shared;
	uint64		total = 0;
	int			i;

	for (i = 0; i < nentries; i++)
		total += entries[i]->size;

	LWLockAcquire(q->lock, LW_EXCLUSIVE);
	if (q->reserve_pos - q->head_pos + q->accounted + total > q->capacity)
	{
		LWLockRelease(q->lock);
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_RESOURCES),
				 errmsg("%d recovered entries (%llu bytes) do not fit in the queue",
						nentries, (unsigned long long) total),
				 errhint("Increase athena_deferred.queue_size to at least the size it had before the restart.")));
	}
	for (i = 0; i < nentries; i++)
	{
		DeferredDatabase *db = queue_database_slot(entries[i]->dbid, false);

		entries[i]->state = ENTRY_PUBLISHED;
		ring_write(q->reserve_pos, entries[i], entries[i]->size);
		q->reserve_pos += entries[i]->size;
		pg_atomic_fetch_add_u64(&db->pending, 1);
		db->bytes += entries[i]->size;
		/* recovered entries are applied at once, whatever the timer */
		db->flush_requested_qseq = Max(db->flush_requested_qseq, entries[i]->qseq + 1);
	}
	pg_atomic_fetch_add_u64(&q->pending, nentries);
	q->next_qseq = Max(q->next_qseq, next_qseq);
	queue_advance_head_locked();
	q->recovered = true;
	LWLockRelease(q->lock);

	ConditionVariableBroadcast(&q->space_cv);
	ConditionVariableBroadcast(&q->settled_cv);
}

/* Wake the database's worker, or the launcher to start one */
static void
wake_worker(Oid dbid)
{
	DeferredShared *q = deferred_shared;
	DeferredDatabase *db;
	Latch	   *latch;

	LWLockAcquire(q->lock, LW_SHARED);
	db = queue_database_slot(dbid, false);
	latch = (db != NULL && db->worker_latch != NULL) ? db->worker_latch : q->launcher_latch;
	LWLockRelease(q->lock);
	if (latch != NULL)
		SetLatch(latch);
}

/* Wake the launcher, if it is running */
void
queue_wake_launcher(void)
{
	Latch	   *latch = deferred_shared->launcher_latch;

	if (latch != NULL)
		SetLatch(latch);
}

/*
 * deferred_flush(): ask for every entry of this database committed so far
 * to be settled; returns the qseq to wait for with queue_flushed(), or 0
 * while the queue is not recovered yet.
 */
uint64
queue_request_flush(void)
{
	DeferredShared *q = deferred_shared;
	DeferredDatabase *db;
	uint64		target;

	LWLockAcquire(q->lock, LW_EXCLUSIVE);
	if (!q->recovered)
	{
		LWLockRelease(q->lock);
		queue_wake_launcher();
		return 0;
	}
	target = q->next_qseq;
	db = queue_database_slot(MyDatabaseId, false);
	if (db != NULL && db->flush_requested_qseq < target)
		db->flush_requested_qseq = target;
	LWLockRelease(q->lock);
	wake_worker(MyDatabaseId);
	return target;
}

/* Is every entry of this database below target settled (and the queue recovered)? */
bool
queue_flushed(uint64 target)
{
	DeferredShared *q = deferred_shared;
	DeferredEntry hdr;
	bool		flushed;

	LWLockAcquire(q->lock, LW_SHARED);
	flushed = q->recovered;
	for (uint64 pos = q->head_pos; flushed && pos < q->reserve_pos; pos += hdr.size)
	{
		ring_read(pos, &hdr, sizeof(hdr));
		if (hdr.qseq >= target)
			break;
		if (hdr.dbid == MyDatabaseId &&
			(hdr.state == ENTRY_RESERVED || hdr.state == ENTRY_PUBLISHED))
			flushed = false;
	}
	LWLockRelease(q->lock);
	return flushed;
}

/*
 * Entries of the current database in the queue: pending ones, plus one if
 * open transactions hold space for more.  *next_qseq is the number the
 * next entry will get.  An ERROR before recovery has restored the queue.
 */
int64
queue_database_pending(uint64 *next_qseq)
{
	DeferredDatabase *db;
	int64		n = 0;

	LWLockAcquire(deferred_shared->lock, LW_SHARED);
	/* before recovery the queue does not yet hold what the WAL does */
	if (!deferred_shared->recovered)
	{
		LWLockRelease(deferred_shared->lock);
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("athena_deferred has not finished recovering its queue"),
				 errdetail("The launcher replays the WAL of pending entries when the server starts; until then it cannot tell whether this database has entries queued."),
				 errhint("Retry in a moment.")));
	}
	*next_qseq = deferred_shared->next_qseq;
	db = queue_database_slot(MyDatabaseId, false);
	if (db != NULL)
	{
		n = (int64) pg_atomic_read_u64(&db->pending);
		if (n == 0 && db->bytes > 0)
			n = 1;
	}
	LWLockRelease(deferred_shared->lock);
	return n;
}

/*
 * Launcher: settle every entry of a database that no longer exists, so
 * that it is neither retried forever nor holds its space.  Returns how many.
 * Never while the database's worker is attached: it may be reading the
 * entries in place (queue_take), and DROP DATABASE cannot have committed
 * while it was connected.
 */
int64
queue_discard_database(Oid dbid)
{
	DeferredShared *q = deferred_shared;
	DeferredDatabase *db;
	DeferredEntry hdr;
	int64		n = 0;

	LWLockAcquire(q->lock, LW_EXCLUSIVE);
	db = queue_database_slot(dbid, false);
	if (db != NULL && db->worker_latch != NULL)
	{
		LWLockRelease(q->lock);
		return 0;
	}
	for (uint64 pos = q->head_pos; pos < q->reserve_pos; pos += hdr.size)
	{
		ring_read(pos, &hdr, sizeof(hdr));
		if (hdr.dbid == dbid && hdr.state == ENTRY_PUBLISHED)
		{
			ring_set_state(pos, ENTRY_DISCARDED);
			n++;
		}
	}
	if (db != NULL)
	{
		pg_atomic_write_u64(&db->pending, 0);
		db->bytes = 0;
		db->flush_requested_qseq = 0;
	}
	pg_atomic_fetch_sub_u64(&q->pending, n);
	q->discarded += n;
	queue_advance_head_locked();
	LWLockRelease(q->lock);
	ConditionVariableBroadcast(&q->space_cv);
	ConditionVariableBroadcast(&q->settled_cv);
	return n;
}
