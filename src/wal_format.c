/*-------------------------------------------------------------------------
 *
 * wal_format.c
 *		Framing WAL records and reading them back from a segment.
 *
 * The reader must accept any byte sequence: it never reads outside the
 * buffer, never allocates more than jansson needs for a payload that
 * passed its checksums, and makes progress on every iteration.
 *
 *-------------------------------------------------------------------------
 */
#include "c.h"

#include "port/pg_crc32c.h"

#include "wal_format.h"

/* payload bytes a scan may checksum in vain, per byte of the segment */
#define WAL_SCAN_BUDGET		16

static pg_crc32c
crc_of(const void *data, size_t len)
{
	pg_crc32c	crc;

	INIT_CRC32C(crc);
	COMP_CRC32C(crc, data, len);
	FIN_CRC32C(crc);
	return crc;
}

void
wal_record_frame(char *dst, const char *payload, uint32 len)
{
	memcpy(dst + WAL_RECORD_HEADER, payload, len);
	wal_record_seal(dst, len);
}

void
wal_record_seal(char *dst, uint32 len)
{
	uint32		hdr[4];
	size_t		total = wal_record_size(len);

	hdr[0] = WAL_RECORD_MAGIC;
	hdr[1] = len;
	hdr[2] = crc_of(dst + WAL_RECORD_HEADER, len);
	hdr[3] = crc_of(hdr, 3 * sizeof(uint32));
	memcpy(dst, hdr, WAL_RECORD_HEADER);
	memset(dst + WAL_RECORD_HEADER + len, 0, total - WAL_RECORD_HEADER - len);
}

/*
 * Does a whole, undamaged record start at off?  Sets *len to its payload.
 *
 * *budget is how many more payload bytes may be checksummed for headers
 * whose payload then fails its checksum.  Damage can hold any number of
 * headers that pass their own CRC (copies of one, say), each claiming a
 * long payload; checking every one of them would take time quadratic in
 * the segment size.  Real damage wastes about the segment size at most (a
 * header's claimed payload is its own record, or stale bytes of a failed
 * write that the next write went over), so the budget is a multiple of it;
 * once it is spent no record is recognised any more: the rest of the
 * segment is damage.
 */
static bool
record_at(const char *buf, size_t size, size_t off, uint32 *len, size_t *budget)
{
	uint32		hdr[4];

	if (size - off < WAL_RECORD_HEADER)
		return false;
	memcpy(hdr, buf + off, WAL_RECORD_HEADER);
	if (hdr[0] != WAL_RECORD_MAGIC || hdr[1] == 0)
		return false;
	if (crc_of(hdr, 3 * sizeof(uint32)) != hdr[3])
		return false;
	if (hdr[1] > size - off - WAL_RECORD_HEADER || *budget == 0)
		return false;
	if (crc_of(buf + off + WAL_RECORD_HEADER, hdr[1]) != hdr[2])
	{
		*budget -= Min(*budget, hdr[1]);
		return false;
	}
	*len = hdr[1];
	return true;
}

static bool
zero_word_at(const char *buf, size_t off)
{
	uint64		word;

	memcpy(&word, buf + off, sizeof(word));
	return word == 0;
}

/*
 * Read the records of one segment.  Zero words are padding or space not
 * yet written.  Damage is reported and skipped up to the next valid record;
 * damage with no valid record after it in the last segment is a torn tail
 * (a write cut short by a crash), anywhere else it is corruption.
 */
void
wal_scan_segment(const char *buf, size_t size, bool last_segment,
				 wal_record_cb on_record, wal_damage_cb on_damage,
				 void *arg, WalScanStats *stats)
{
	size_t		off = 0;
	size_t		budget = size > SIZE_MAX / WAL_SCAN_BUDGET ? SIZE_MAX : size * WAL_SCAN_BUDGET;

	while (off + 8 <= size)
	{
		uint32		len;
		size_t		next;
		json_t	   *rec;
		json_error_t err;

		if (zero_word_at(buf, off))
		{
			off += 8;
			continue;
		}

		if (record_at(buf, size, off, &len, &budget))
		{
			size_t		rsize = Min(wal_record_size(len), size - off);

			rec = json_loadb(buf + off + WAL_RECORD_HEADER, len, JSON_REJECT_DUPLICATES, &err);
			if (rec != NULL && json_is_object(rec))
			{
				stats->records++;
				on_record(arg, rec, off);
			}
			else
			{
				/* checksums match but it is not ours: count it as damage */
				json_decref(rec);
				stats->corrupt++;
				stats->bad_bytes += rsize;
				on_damage(arg, false, off, rsize);
			}
			off += rsize;
			continue;
		}

		/* damage: look for the next record that checks out */
		for (next = off + 8; next + WAL_RECORD_HEADER <= size; next += 8)
		{
			if (record_at(buf, size, next, &len, &budget))
				break;
		}
		if (next + WAL_RECORD_HEADER > size)
		{
			bool		torn = last_segment;

			/* trailing zeros after the damage are not part of it */
			next = size;
			while (next >= off + 16 && zero_word_at(buf, next - 8))
				next -= 8;
			if (torn)
				stats->torn++;
			else
				stats->corrupt++;
			stats->bad_bytes += next - off;
			on_damage(arg, torn, off, next - off);
			off = size;
			break;
		}
		stats->corrupt++;
		stats->bad_bytes += next - off;
		on_damage(arg, false, off, next - off);
		off = next;
	}

	/* a few stray bytes at the very end (never in a real segment) */
	if (off < size)
	{
		size_t		i;

		for (i = off; i < size && buf[i] == 0; i++)
			;
		if (i < size)
		{
			if (last_segment)
				stats->torn++;
			else
				stats->corrupt++;
			stats->bad_bytes += size - off;
			on_damage(arg, last_segment, off, size - off);
		}
	}
}
