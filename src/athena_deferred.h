/*-------------------------------------------------------------------------
 *
 * athena_deferred.h
 *		Shared definitions of athena_deferred: the entry format, the
 *		shared-memory queue and the lock that guards it, and the settings.
 *
 * The path of one mutation:
 *
 *	enqueue.c	deferred_insert() & co. validate the call, serialize the entry
 *				and account for its space in the queue (the only place a full
 *				queue makes a caller wait); at pre-commit the entries of the
 *				transaction get their queue positions, at commit they are
 *				published, on abort they are cancelled.
 *	queue.c		the shared ring of entries, and one slot per database that
 *				has entries in it.
 *	wal.c		the extension's own WAL; recovery.c replays it at start.
 *	launcher.c	the launcher: starts one worker per database with entries,
 *				and does the WAL's background work.
 *	worker.c	a database's worker: timer, size trigger, flush requests.
 *	flush.c		applies published entries through SPI as the queuing role,
 *				retries, dead letters, and records its progress in the same
 *				transaction.
 *	notify.c	one NOTIFY per table touched by a flush.
 *
 * Shared memory (DeferredShared) is one struct followed by the ring.  One
 * LWLock (DeferredShared->lock) guards every field below that is not
 * marked otherwise; entry bodies are written without the lock by the
 * backend that reserved them, while their state is RESERVED, and are
 * immutable once PUBLISHED.  That backend also publishes them without the
 * lock, at commit: a write barrier, then the one-byte state, with the
 * pending counters (atomics) raised first.  Only the worker changes a
 * published entry's state and attempts (under the lock, in queue_settle;
 * the launcher, too, for a dropped database's entries), and it reads the
 * entries it took for a flush where they lie in the ring, without the lock:
 * the ring's space is released only past settled entries (the launcher
 * discards entries only of a database without a worker), so those entries
 * stay in place until the worker settles them or exits.
 *
 *-------------------------------------------------------------------------
 */
#ifndef ATHENA_DEFERRED_H
#define ATHENA_DEFERRED_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "lib/stringinfo.h"
#include "nodes/pg_list.h"
#include "postmaster/bgworker.h"
#include "port/atomics.h"
#include "storage/condition_variable.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/spin.h"

#define ATHENA_EXTENSION_NAME	"athena_deferred"

/* Segments whose highest entry shared memory remembers (see wal.c) */
#define WAL_SEGMENT_SLOTS	1024

/* Values of athena_deferred.wal_sync */
typedef enum WalSyncMode
{
	WAL_SYNC_OFF,
	WAL_SYNC_BATCH,
	WAL_SYNC_ALWAYS
} WalSyncMode;

/* Operation of an entry */
typedef enum DeferredOp
{
	DEFERRED_INSERT = 1,
	DEFERRED_UPDATE = 2,
	DEFERRED_DELETE = 3
} DeferredOp;

/* Life of an entry in the ring */
typedef enum DeferredState
{
	ENTRY_RESERVED = 1,			/* positioned at pre-commit, not committed */
	ENTRY_PUBLISHED = 2,		/* committed, waiting for the worker */
	ENTRY_CANCELLED = 3,		/* its transaction aborted after pre-commit */
	ENTRY_DONE = 4,				/* applied */
	ENTRY_DEAD = 5,				/* moved to deferred_dead_letters */
	ENTRY_DISCARDED = 6			/* its database was dropped */
} DeferredState;

/* What deferred_wait() can learn about an entry id */
typedef enum EntryOutcome
{
	OUTCOME_UNKNOWN = 0,
	OUTCOME_PENDING,			/* in the queue, not settled */
	OUTCOME_APPLIED,
	OUTCOME_DEAD_LETTER,
	OUTCOME_ROLLED_BACK
} EntryOutcome;

/* Recent outcomes remembered for deferred_wait(), and failing entries' errors */
#define OUTCOME_SLOTS		8192
#define ERROR_SLOTS			64
#define ERROR_MESSAGE_LEN	256
#define FLUSH_HISTOGRAM		16	/* bucket k counts flushes under 2^k ms */

typedef struct OutcomeSlot
{
	int64		id;				/* unique within its database */
	Oid			dbid;
	uint8		outcome;		/* EntryOutcome */
} OutcomeSlot;

typedef struct ErrorSlot
{
	uint64		qseq;
	char		message[ERROR_MESSAGE_LEN];
} ErrorSlot;

/*
 * Header of one entry, as it lies in the ring and in a backend's staging
 * list.  The body follows: nparts parts, each a DeferredPart and its JSON
 * text (not NUL-terminated), padded to MAXALIGN, so that every part and
 * every entry starts MAXALIGNed (the ring's size is a multiple of it).  The
 * text is JsonbToCString() output of validated objects, so its keys are
 * exactly the columns the part names (see flush.c: part_keys); they are
 * not stored apart.  The ring is a byte stream: an entry may wrap around
 * its end, so it is read and written only through queue.c.
 *
 * The queuing transaction's xid is not here: only its WAL record needs it
 * (wal_append), and recovery keeps it beside the entries it rebuilds.
 */
typedef struct DeferredEntry
{
	uint32		size;			/* header + body, in bytes, MAXALIGNed */
	uint8		state;			/* DeferredState */
	uint8		op;				/* DeferredOp */
	uint16		nparts;
	uint16		attempts;		/* failed flush attempts so far, saturating
								 * at ENTRY_MAX_ATTEMPTS */
	uint16		unused;			/* zero */
	Oid			dbid;
	Oid			roleid;
	Oid			relid;
	int64		id;				/* user-visible entry id */
	uint64		qseq;			/* position in commit order, set at
								 * pre-commit */
	TimestampTz enqueued_at;
} DeferredEntry;

/*
 * attempts never goes beyond this.  athena_deferred.max_flush_attempts is
 * at most 1000; only an entry whose dead-lettering keeps failing is tried
 * more often than that, and its count stops here.
 */
#define ENTRY_MAX_ATTEMPTS	PG_UINT16_MAX

/* Kinds of part */
typedef enum DeferredPartKind
{
	PART_ROWS = 1,				/* insert: JSON array of rows, all with the
								 * same keys */
	PART_MATCH = 2,				/* update/delete: JSON object of conditions */
	PART_CHANGES = 3			/* update: JSON object of new values */
} DeferredPartKind;

typedef struct DeferredPart
{
	uint16		kind;			/* DeferredPartKind */
	uint16		unused;			/* zero */
	uint32		textlen;		/* bytes of the JSON text */
} DeferredPart;

StaticAssertDecl(sizeof(DeferredEntry) == 48 && sizeof(DeferredEntry) == MAXALIGN(sizeof(DeferredEntry)),
				 "the entry header is 48 bytes and keeps what follows it MAXALIGNed");
StaticAssertDecl(sizeof(DeferredPart) == 8 && sizeof(DeferredPart) == MAXALIGN(sizeof(DeferredPart)),
				 "the part header is 8 bytes and keeps its text MAXALIGNed");

/*
 * Databases that have entries in the queue, or a worker, at most this many
 * at a time
 */
#define DEFERRED_MAX_DATABASES	256

/*
 * One database with entries in the queue (queue.c).  A slot is taken by the
 * first call in a database and freed by the launcher once the database has
 * neither entries nor a worker.  Guarded by DeferredShared->lock, but for
 * pending (atomic), and worker_latch, which a committing backend reads
 * without the lock while its entries hold space in the slot.
 */
typedef struct DeferredDatabase
{
	Oid			dbid;			/* InvalidOid: slot free */
	Latch	   *worker_latch;	/* the database's worker, NULL if none */
	pg_atomic_uint64 pending;	/* published, not yet settled; atomic, so
								 * that a commit publishes without the lock */
	uint64		bytes;			/* accounted, reserved or pending: its share */
	TimestampTz waiting_since;	/* a caller last found no room, or 0 */
	uint64		flush_requested_qseq;	/* deferred_flush() wants entries
										 * below this settled */
	/* recovery: the worker reports from which qseq its entries may be pending */
	bool		progress_reported;
	uint64		keep_from;
} DeferredDatabase;

/* The shared state, followed in shared memory by the ring itself */
typedef struct DeferredShared
{
	LWLock	   *lock;

	/* ring positions are logical byte offsets that never wrap */
	uint64		head_pos;		/* first byte not yet released */
	uint64		reserve_pos;	/* next byte to be reserved */
	uint64		accounted;		/* bytes promised to open transactions */
	uint64		capacity;		/* ring size in bytes */

	uint64		next_qseq;		/* next commit-order sequence number */
	uint64		settled_qseq;	/* every entry below this is settled */


	/* counters for deferred_stats() */
	pg_atomic_uint64 pending;	/* published, not yet settled (atomic) */
	pg_atomic_uint64 enqueued;	/* (atomic) */
	int64		applied;
	int64		failed_attempts;
	int64		dead_lettered;
	int64		discarded;		/* entries of dropped databases */
	int64		flushes;
	TimestampTz last_flush_at;
	int64		last_flush_us;	/* duration of the latest flush */
	int64		last_flush_entries;
	int64		flush_histogram[FLUSH_HISTOGRAM];

	/* recent outcomes by entry id, and the last error of failing entries */
	uint64		outcomes_written;
	OutcomeSlot outcomes[OUTCOME_SLOTS];
	ErrorSlot	errors[ERROR_SLOTS];

	DeferredDatabase databases[DEFERRED_MAX_DATABASES];
	Latch	   *launcher_latch; /* NULL while the launcher is not running */
	bool		recovered;		/* the launcher has replayed the WAL; until
								 * then calls wait (queue_account) */

	/* recovery counters, set once by the worker */
	int64		recovered_entries;
	int64		torn_records;
	int64		corrupt_records;

	/*
	 * The WAL (wal.c).  wal_lock guards the insert position, the segment
	 * table and the write into the segment; wal_flush_lock is held by the one
	 * backend that fsyncs for a group of committers.
	 */
	LWLock	   *wal_lock;
	LWLock	   *wal_flush_lock;
	uint64		wal_insert_pos; /* next byte: segno * segment size + offset */
	pg_atomic_uint64 wal_flushed_pos;	/* fsynced up to here */
	TimestampTz wal_last_sync;	/* wal_flush_lock */
	uint64		wal_oldest_segno;	/* launcher only: oldest segment kept */
	int64		wal_bytes;		/* written since start */
	int64		wal_segments;	/* segment files in the directory */
	uint64		seg_segno[WAL_SEGMENT_SLOTS];	/* which segment a slot tracks */
	uint64		seg_max_qseq[WAL_SEGMENT_SLOTS];	/* highest entry in it */

	ConditionVariable space_cv; /* broadcast when ring space is released */
	ConditionVariable settled_cv;	/* broadcast after each flush */

	/* MAXALIGNed, as are entries' sizes: entries start MAXALIGNed */
	char		ring[FLEXIBLE_ARRAY_MEMBER] pg_attribute_aligned(MAXIMUM_ALIGNOF);
} DeferredShared;

/* Settings (athena_deferred.c) */
extern bool deferred_enabled;
extern int	deferred_batch_window_ms;
extern int	deferred_batch_max_size;
extern int	deferred_max_flush_attempts;
extern int	deferred_queue_size_kb;
extern int	deferred_enqueue_timeout_ms;
extern char *deferred_notify_channel;
extern bool deferred_skip_cache_invalidation;
extern char *deferred_database;
extern bool deferred_wal_enabled;
extern char *deferred_wal_dir;
extern int	deferred_wal_sync;
extern int	deferred_wal_segment_size_kb;
extern char *deferred_fault_point;
extern int	deferred_invalidation_ring_size;
extern int	deferred_lock_timeout_ms;
extern int	deferred_statement_timeout_ms;

/* athena_deferred.c */
extern DeferredShared *deferred_shared;

/* queue.c */
extern Size queue_shmem_size(void);
extern void queue_shmem_init(DeferredShared *shared, bool found);
extern void queue_account(Size size, int timeout_ms);
extern void queue_unaccount(Size size);
extern void queue_reserve(DeferredEntry **entries, uint64 *positions,
						  int nentries);
extern void queue_publish(const uint64 *positions, int nentries);
extern void queue_cancel(const uint64 *positions, int nentries);
extern int	queue_collect(DeferredEntry ***entries, uint64 **positions,
						  int max_entries);

/*
 * The worker's view of the entries it took for one flush (queue_take).
 * entries[i] points into the ring itself (a copy only for an entry that
 * wraps around the ring's end): read-only, and valid until queue_settle(),
 * since the ring's space is released only past settled entries and only
 * the worker settles its database's published entries.  What the flush
 * makes of an entry goes into states[i] (ENTRY_PUBLISHED: to retry,
 * ENTRY_DONE, ENTRY_DEAD) and attempts[i]; queue_settle() writes them to
 * the ring.  The arrays live in cxt and are kept from flush to flush.
 */
typedef struct QueueTake
{
	int			n;				/* entries taken */
	int			allocated;		/* room in the arrays */
	MemoryContext cxt;			/* where the arrays are allocated */
	DeferredEntry **entries;
	uint64	   *positions;		/* where each entry lies in the ring */
	uint8	   *states;
	uint32	   *attempts;
} QueueTake;

extern void queue_take(QueueTake *take, int max_entries);
extern void queue_settle(QueueTake *take, int64 applied, int64 failed,
						 int64 dead, int64 duration_us);
extern void queue_note_error(uint64 qseq, const char *message);
extern void queue_note_rolled_back(const int64 *ids, int nids);
extern EntryOutcome queue_outcome(int64 id, bool *too_old);
extern TimestampTz queue_oldest_pending(void);
extern List *queue_unsettled_below(uint64 from_pos, uint64 upto);
extern void queue_wake_launcher(void);
extern void queue_restore(DeferredEntry **entries, int nentries,
						  uint64 next_qseq);
extern uint64 queue_request_flush(void);
extern bool queue_flushed(uint64 target);
extern int64 queue_database_pending(uint64 *next_qseq);
extern DeferredDatabase *queue_database_slot(Oid dbid, bool create);
extern int64 queue_discard_database(Oid dbid);

/* wal.c */
extern uint64 wal_append(DeferredEntry **entries, int nentries,
						 TransactionId xid);
extern void wal_flush(uint64 upto);
extern void wal_flush_written(void);
extern void wal_append_abort(DeferredEntry **entries, int nentries);
extern void wal_append_database_settled(Oid dbid, uint64 upto);
extern void wal_append_abandoned(const uint64 *qseqs, int n);
extern long wal_sync_due_in(void);
extern void wal_remove_settled(uint64 settled_qseq);
extern void wal_prepare_segments(void);
extern char *wal_segment_path(uint64 segno);
extern bool wal_write_zeros(int fd, uint64 offset, uint64 len);
extern uint64 wal_segment_bytes(void);

/* recovery.c */
extern void recovery_scan(void);
extern List *recovery_databases(void);
extern void recovery_restore(void);
extern bool recovery_report_progress(void);
extern void recovery_reconcile(void);

/* flush.c; Progress is what deferred_progress says */
typedef struct Progress
{
	uint64		applied_upto;	/* entries below are settled ... */
	int			nretry;			/* ... except these, still to retry */
	uint64	   *retry_qseq;
	int32	   *retry_attempts;
} Progress;

extern uint64 flush_progress_upto;
extern char *flush_extension_schema(void);
extern int	flush_dead_lettered(const int64 *ids, int n, int64 **dead);
extern void flush_read_progress(const char *schema, Progress *p);
extern void flush_apply_entry(const DeferredEntry *entry, const char *relname,
							  int64 *rows);
extern int	flush_run(int max_entries, int *settled);

/* notify.c */
typedef struct NotifyTally NotifyTally;
/* One table touched by one flush, as deferred_invalidations() lists it */
typedef struct InvalidationSlot
{
	Oid			dbid;			/* listed only in this database */
	int64		flush;
	TimestampTz flushed_at;
	NameData	schema;
	NameData	table;
} InvalidationSlot;

extern Size notify_shmem_size(void);
extern int	notify_invalidations_since(int64 since, InvalidationSlot *out,
									   int64 *oldest, int64 *last);
extern void notify_shmem_init(void);
extern void notify_counters(int64 *notifications, int64 *latest_flush);
extern void notify_at_commit(void);
extern void notify_at_abort(void);
extern NotifyTally *notify_tally_create(void);
extern void notify_tally_add(NotifyTally *tally, Oid relid, DeferredOp op,
							 int64 entries, int64 rows);
extern void notify_tally_send(NotifyTally *tally);

/* enqueue.c */
extern bool enqueue_staged(int64 id);

/* launcher.c */
extern void deferred_register_launcher(void);
extern PGDLLEXPORT void deferred_launcher_main(Datum main_arg);

/* worker.c */
extern bool worker_start(Oid dbid, BackgroundWorkerHandle **handle);
extern PGDLLEXPORT void deferred_worker_main(Datum main_arg);

/*
 * The columns of one JSON object: names, and whether each value is null
 * (enqueue.c reads them from the call's arguments, flush.c from an
 * entry's text)
 */
typedef struct KeyList
{
	int			nkeys;
	char	  **names;
	bool	   *isnull;
} KeyList;

/* entry.c: building entries */
extern void entry_begin(StringInfo buf);
extern void entry_reset(StringInfo buf);
extern void entry_add_part(StringInfo buf, DeferredPartKind kind,
						   const char *text, int textlen);
extern char *entry_payload_json(const DeferredEntry *entry);

/* athena_deferred.c: helpers shared by enqueue.c and flush.c */
extern const char *deferred_op_name(DeferredOp op);
extern Oid	deferred_extension_schema(void);
extern void deferred_fault(const char *point);

static inline const DeferredPart *
entry_first_part(const DeferredEntry *entry)
{
	return (const DeferredPart *) ((const char *) entry + sizeof(DeferredEntry));
}

static inline const char *
part_text(const DeferredPart *part)
{
	return (const char *) part + sizeof(DeferredPart);
}

static inline const DeferredPart *
part_next(const DeferredPart *part)
{
	return (const DeferredPart *) (part_text(part) + MAXALIGN(part->textlen));
}

#endif							/* ATHENA_DEFERRED_H */
