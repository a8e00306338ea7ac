/*-------------------------------------------------------------------------
 *
 * wal_format.h
 *		The framing of athena_deferred's WAL records, and the segment reader.
 *
 * A segment is a pre-allocated, zero-filled file.  Records follow each
 * other at 8-byte boundaries:
 *
 *	uint32 magic		WAL_RECORD_MAGIC
 *	uint32 len			bytes of the JSON payload
 *	uint32 crc			CRC32C of the payload
 *	uint32 hcrc			CRC32C of the three fields above
 *	char   payload[len]	one JSON object (written with jansson)
 *	zero padding to the next multiple of 8
 *
 * Zeros are never a record (magic and len are non-zero), so the reader
 * tells padding and unwritten space from records, and the header CRC lets
 * it look for the next record after damage without checksumming garbage.
 *
 * This file and wal_format.c depend only on c.h, pg_crc32c and jansson, so
 * that the reader can be fuzzed outside the server (fuzz/).
 *
 *-------------------------------------------------------------------------
 */
#ifndef ATHENA_WAL_FORMAT_H
#define ATHENA_WAL_FORMAT_H

#include <jansson.h>

#define WAL_RECORD_MAGIC	0x57444441	/* "ADDW" */
#define WAL_RECORD_HEADER	16
#define WAL_RECORD_ALIGN(len)	(((len) + 7) & ~((size_t) 7))

/* Bytes a record with a payload of len bytes takes in a segment */
static inline size_t
wal_record_size(size_t len)
{
	return WAL_RECORD_ALIGN(WAL_RECORD_HEADER + len);
}

/* Write the record for payload into dst (wal_record_size(len) bytes) */
extern void wal_record_frame(char *dst, const char *payload, uint32 len);

/*
 * The same for a payload already in place at dst + WAL_RECORD_HEADER (a
 * writer that dumps its JSON straight into the record saves a copy)
 */
extern void wal_record_seal(char *dst, uint32 len);

/* What the reader found in one segment */
typedef struct WalScanStats
{
	uint64		records;		/* valid records handed to the callback */
	uint64		torn;			/* torn tails (damage with nothing valid after) */
	uint64		corrupt;		/* damaged stretches followed by valid records */
	uint64		bad_bytes;		/* bytes in torn or damaged stretches */
} WalScanStats;

/* Called for each valid record; the callback owns rec */
typedef void (*wal_record_cb) (void *arg, json_t *rec, size_t offset);

/* Called for each damaged stretch: torn (at the end) or corrupt (middle) */
typedef void (*wal_damage_cb) (void *arg, bool torn, size_t offset, size_t len);

extern void wal_scan_segment(const char *buf, size_t len, bool last_segment,
							 wal_record_cb on_record, wal_damage_cb on_damage,
							 void *arg, WalScanStats *stats);

#endif							/* ATHENA_WAL_FORMAT_H */
