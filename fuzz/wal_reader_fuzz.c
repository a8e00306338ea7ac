/*-------------------------------------------------------------------------
 *
 * wal_reader_fuzz.c
 *		libFuzzer targets for the WAL segment reader (src/wal_format.c).
 *
 * The spec: any byte sequence must be rejected or recovered without a
 * crash, a hang or unbounded allocation.  Crashes and memory errors are
 * AddressSanitizer's and UBSan's to find, hangs and allocation libFuzzer's
 * (-timeout, -rss_limit_mb, -malloc_limit_mb: see scripts/fuzz.sh).  The
 * callbacks and the checks after each scan add what the reader promises
 * beyond not crashing; a broken promise is an abort() with a message.
 *
 * This file builds two targets:
 *
 *	wal_reader_fuzz		(default) the input is a segment, as read from disk.
 *
 *	wal_framed_fuzz		(-DWAL_FUZZ_FRAMED) the input describes a segment
 *						built with wal_record_frame(): records with valid
 *						checksums (raw payloads, entries and abort markers
 *						shaped like src/wal.c's), zeros, garbage, bare
 *						headers (torn writes), byte flips, copies and a cut
 *						at the end.  Checksums stop a byte-level mutator from
 *						getting far past the framing; this target reaches
 *						json_loadb with any payload and checks that every
 *						record that is still intact is found (an oracle).
 *
 * Every input is scanned twice, as the last segment and as an earlier one.
 *
 * Checks (their names are what WAL_FUZZ_SKIP takes, comma-separated, to
 * keep fuzzing past a known finding: WAL_FUZZ_SKIP=range,torn):
 *	record	 a record handed over is an object at an 8-aligned offset where a
 *			 whole record with valid checksums starts
 *	range	 a damaged stretch lies within the buffer
 *	damage	 a damaged stretch starts 8-aligned, on a non-zero byte
 *	order	 records and damaged stretches come in order, without overlap
 *	stats	 the WalScanStats counters match what the callbacks were told
 *	bytes	 bytes of records + bad_bytes <= input length
 *	coverage every non-zero byte is in a record or a damaged stretch
 *			 (nothing is skipped silently)
 *	torn	 only the last segment has a torn tail, only one, at its end
 *	same	 both scans find the same records and stretches
 *	work	 the reader checksums at most 32 bytes per input byte (+4096):
 *			 its time is linear in the segment size (fuzz/crc32c.c counts;
 *			 a linear reader checksums each byte a few times, plus whatever
 *			 it lets itself waste on headers whose payload fails its CRC)
 *	oracle	 (framed) every intact record is found where it was written
 *
 *-------------------------------------------------------------------------
 */
#include "c.h"

#include "port/pg_crc32c.h"

#include "wal_format.h"

#include <stdarg.h>

/* port.h maps these to libpgport's pg_* versions; the C library's will do */
#undef fprintf
#undef vfprintf
#undef snprintf

int			LLVMFuzzerInitialize(int *argc, char ***argv);
int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* fuzz/crc32c.c: its CRC-32C, and the bytes COMP_CRC32C has checksummed */
extern uint32_t fuzz_crc32c(uint32_t crc, const void *data, size_t len);
extern size_t fuzz_crc32c_bytes;

/*
 * The harness's own loops over every byte are not instrumented for coverage
 * (they would take most of the time and guide the fuzzer towards nothing).
 */
#define NO_COVERAGE __attribute__((no_sanitize("coverage")))

/* bytes the reader may checksum for a segment of size bytes */
#define WORK_LIMIT(size)	(32 * (uint64) (size) + 4096)

/* ---------------------------------------------------------------- checks */

static char skip_list[256];

static bool
check_skipped(const char *name)
{
	const char *p = skip_list;
	size_t		n = strlen(name);

	while ((p = strstr(p, name)) != NULL)
	{
		if ((p == skip_list || p[-1] == ',') && (p[n] == ',' || p[n] == '\0'))
			return true;
		p += n;
	}
	return false;
}

static void
check_failed(const char *name, const char *fmt,...)
{
	va_list		ap;

	if (check_skipped(name))
		return;
	fprintf(stderr, "\n*** wal_reader_fuzz: check \"%s\" failed: ", name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	abort();
}

#define CHECK(name, cond, ...) \
	do { if (!(cond)) check_failed((name), __VA_ARGS__); } while (0)

/* the harness's own checksums: not through COMP_CRC32C, so not counted */
NO_COVERAGE static uint32
crc_of(const void *data, size_t len)
{
	return fuzz_crc32c(0xFFFFFFFF, data, len) ^ 0xFFFFFFFF;
}

/* The harness's own idea of a valid record header at off (no payload CRC) */
NO_COVERAGE static bool
header_at(const char *buf, size_t size, size_t off, uint32 *len)
{
	uint32		hdr[4];

	if (off > size || size - off < WAL_RECORD_HEADER)
		return false;
	memcpy(hdr, buf + off, WAL_RECORD_HEADER);
	if (hdr[0] != WAL_RECORD_MAGIC || hdr[1] == 0 ||
		hdr[1] > size - off - WAL_RECORD_HEADER ||
		crc_of(hdr, 3 * sizeof(uint32)) != hdr[3])
		return false;
	*len = hdr[1];
	return true;
}

/* ... and of a whole valid record */
NO_COVERAGE static bool
oracle_record_at(const char *buf, size_t size, size_t off, uint32 *len)
{
	uint32		crc;

	if (!header_at(buf, size, off, len))
		return false;
	memcpy(&crc, buf + off + 8, sizeof(crc));
	return crc_of(buf + off + WAL_RECORD_HEADER, *len) == crc;
}

/* ---------------------------------------------------------------- one scan */

typedef struct Region
{
	size_t		off;
	size_t		len;
	bool		record;
	bool		torn;
} Region;

typedef struct Scan
{
	const char *buf;
	size_t		size;
	bool		last;
	Region	   *r;
	size_t		n;
	size_t		cap;
	uint64		records;
	uint64		torn;
	uint64		corrupt;
	uint64		bad_bytes;
	uint64		crc_bytes;		/* bytes the reader checksummed */
	WalScanStats stats;
} Scan;

static void
add_region(Scan *s, size_t off, size_t len, bool record, bool torn)
{
	/* stretches are disjoint and at least 8 bytes but for one at the end */
	CHECK("order", s->n < s->cap,
		  "more than %zu records and damaged stretches in %zu bytes", s->n, s->size);
	if (s->n == s->cap)
		return;
	s->r[s->n].off = off;
	s->r[s->n].len = len;
	s->r[s->n].record = record;
	s->r[s->n].torn = torn;
	s->n++;
}

static void
on_record(void *arg, json_t *rec, size_t offset)
{
	Scan	   *s = arg;
	uint32		len = 0;

	CHECK("record", rec != NULL && json_is_object(rec),
		  "record at offset %zu is not a JSON object", offset);
	json_decref(rec);
	/* not skippable: the region bookkeeping below needs it */
	if (offset % 8 != 0 || !oracle_record_at(s->buf, s->size, offset, &len))
	{
		check_failed("record", "record at offset %zu (size %zu) is not a whole record with valid checksums at an 8-aligned offset",
					 offset, s->size);
		return;
	}
	s->records++;
	add_region(s, offset, Min(wal_record_size(len), s->size - offset), true, false);
}

static void
on_damage(void *arg, bool torn, size_t offset, size_t len)
{
	Scan	   *s = arg;

	if (torn)
		s->torn++;
	else
		s->corrupt++;
	s->bad_bytes += len;
	CHECK("range", len > 0 && offset < s->size && len <= s->size - offset,
		  "%s damage at offset %zu, %zu bytes, is outside the %zu-byte buffer",
		  torn ? "torn" : "corrupt", offset, len, s->size);
	/* clip, for the checks that follow when "range" is skipped */
	if (offset >= s->size || len == 0)
		return;
	len = Min(len, s->size - offset);
	add_region(s, offset, len, false, torn);
}

static void
scan(Scan *s, const char *buf, size_t size, bool last)
{
	memset(s, 0, sizeof(*s));
	s->buf = buf;
	s->size = size;
	s->last = last;
	s->cap = size / 8 + 2;
	s->r = malloc(sizeof(Region) * s->cap);
	if (s->r == NULL)
		abort();
	s->crc_bytes = fuzz_crc32c_bytes;
	wal_scan_segment(buf, size, last, on_record, on_damage, s, &s->stats);
	s->crc_bytes = fuzz_crc32c_bytes - s->crc_bytes;
}

NO_COVERAGE static void
check_scan(Scan *s)
{
	const WalScanStats *st = &s->stats;
	const char *what = s->last ? "last segment" : "earlier segment";
	uint64		record_bytes = 0;
	size_t		pos = 0;
	uint64		ntorn = 0;

	CHECK("stats", st->records == s->records && st->torn == s->torn &&
		  st->corrupt == s->corrupt && st->bad_bytes == s->bad_bytes,
		  "%s: stats say %llu records, %llu torn, %llu corrupt, %llu bad bytes; callbacks got %llu, %llu, %llu, %llu",
		  what,
		  (unsigned long long) st->records, (unsigned long long) st->torn,
		  (unsigned long long) st->corrupt, (unsigned long long) st->bad_bytes,
		  (unsigned long long) s->records, (unsigned long long) s->torn,
		  (unsigned long long) s->corrupt, (unsigned long long) s->bad_bytes);

	for (size_t i = 0; i < s->n; i++)
	{
		const Region *r = &s->r[i];

		CHECK("order", r->off >= pos,
			  "%s: %s at offset %zu overlaps or precedes the one before (ending at %zu)",
			  what, r->record ? "record" : "damage", r->off, pos);
		if (r->off < pos)
			continue;
		/* coverage: the gap before this region is zeros */
		for (size_t b = pos; b < r->off; b++)
			CHECK("coverage", s->buf[b] == 0,
				  "%s: non-zero byte at offset %zu is in no record and no damaged stretch", what, b);
		if (r->record)
			record_bytes += r->len;
		else
		{
			bool		nonzero = false;

			for (size_t b = r->off; b < r->off + Min(r->len, 8); b++)
				nonzero |= s->buf[b] != 0;
			CHECK("damage", r->off % 8 == 0 && nonzero,
				  "%s: damage at offset %zu (%zu bytes) is not 8-aligned or starts with zeros",
				  what, r->off, r->len);
		}
		if (r->torn)
		{
			ntorn++;
			CHECK("torn", s->last,
				  "torn damage (offset %zu, %zu bytes) reported for a segment that is not the last",
				  r->off, r->len);
			CHECK("torn", i == s->n - 1,
				  "%s: torn damage at offset %zu is followed by a record or damage at %zu",
				  what, r->off, s->r[s->n - 1].off);
		}
		pos = r->off + r->len;
	}
	for (size_t b = pos; b < s->size; b++)
		CHECK("coverage", s->buf[b] == 0,
			  "%s: non-zero byte at offset %zu (after the last region) is in no record and no damaged stretch",
			  what, b);
	CHECK("torn", ntorn <= 1, "%s: %llu torn tails", what, (unsigned long long) ntorn);
	CHECK("work", s->crc_bytes <= WORK_LIMIT(s->size),
		  "%s: the reader checksummed %llu bytes for a %zu-byte segment (more than %llu): quadratic?",
		  what, (unsigned long long) s->crc_bytes, s->size,
		  (unsigned long long) WORK_LIMIT(s->size));
	CHECK("bytes", record_bytes + st->bad_bytes <= s->size,
		  "%s: %llu bytes of records + %llu bad bytes > %zu bytes of input",
		  what, (unsigned long long) record_bytes, (unsigned long long) st->bad_bytes, s->size);
}

/* Scan buf as the last segment and as an earlier one, check both */
static void
scan_both(const char *buf, size_t size, Scan *last, Scan *earlier)
{
	scan(last, buf, size, true);
	check_scan(last);
	scan(earlier, buf, size, false);
	check_scan(earlier);

	CHECK("same", last->n == earlier->n,
		  "%zu records and stretches as the last segment, %zu as an earlier one", last->n, earlier->n);
	for (size_t i = 0; i < Min(last->n, earlier->n); i++)
		CHECK("same", last->r[i].off == earlier->r[i].off && last->r[i].len == earlier->r[i].len &&
			  last->r[i].record == earlier->r[i].record,
			  "region %zu differs: offset %zu/%zu, %zu/%zu bytes", i,
			  last->r[i].off, earlier->r[i].off, last->r[i].len, earlier->r[i].len);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	const char *skip = getenv("WAL_FUZZ_SKIP");

	(void) argc;
	(void) argv;
	if (skip != NULL)
		snprintf(skip_list, sizeof(skip_list), "%s", skip);
	/* the CRC must be PostgreSQL's (CRC-32C, check value), both ways */
	{
		pg_crc32c	crc;

		INIT_CRC32C(crc);
		COMP_CRC32C(crc, "123456789", 9);
		FIN_CRC32C(crc);
		if (crc != 0xE3069283 || crc_of("123456789", 9) != 0xE3069283)
		{
			fprintf(stderr, "wal_reader_fuzz: CRC-32C self-test failed\n");
			abort();
		}
	}
	return 0;
}

#ifndef WAL_FUZZ_FRAMED

/* ---------------------------------------------------------------- raw target */

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	Scan		last,
				earlier;

	scan_both((const char *) data, size, &last, &earlier);
	free(last.r);
	free(earlier.r);
	return 0;
}

#else							/* WAL_FUZZ_FRAMED */

/* ---------------------------------------------------------------- framed target */

/*
 * The input is a list of operations, each an opcode byte (taken modulo
 * OP_COUNT) and its arguments; missing bytes read as zero:
 *
 *	OP_RAW		u16 n, n bytes: a record with that payload (any bytes)
 *	OP_ENTRY	an entry record like src/wal.c's entry_record(), its values,
 *				column names and texts taken from the input
 *	OP_ABORT	u8 n, n u32: an abort marker {"t":"a","q":[...]}
 *	OP_ZEROS	u8 n: n+1 zero words
 *	OP_GARBAGE	u8 n, 8*(n%32+1) bytes: copied as they are
 *	OP_HEADER	u32 len, u32 crc: a bare header with a valid header CRC
 *	OP_FLIP		u24 pos, u8 x: XOR the byte at pos (mod size) with x (or 0x80)
 *	OP_REPEAT	u8 x: copy the last x%8+1 pieces (x/8)%8+1 times
 *	OP_CUT		u16 n: the segment ends n bytes (mod size+1) short
 *
 * Pieces are multiples of 8 bytes, as records are in a real segment.
 */
enum
{
	OP_RAW, OP_ENTRY, OP_ABORT, OP_ZEROS, OP_GARBAGE, OP_HEADER, OP_FLIP,
	OP_REPEAT, OP_CUT, OP_COUNT
};

#define OUT_MAX		(256 * 1024)
/* foreign valid headers the oracle checks payloads for; more: no oracle */
#define ORACLE_MAX_HEADERS	16

typedef struct Input
{
	const uint8_t *p;
	size_t		n;
} Input;

typedef struct Piece
{
	size_t		off;
	size_t		len;
	bool		record;			/* written as a record (may be damaged since) */
} Piece;

typedef struct Segment
{
	char	   *buf;
	size_t		len;
	Piece	   *pieces;
	size_t		npieces;
	size_t		cap;
	size_t		cut;
} Segment;

static uint32
in_byte(Input *in)
{
	if (in->n == 0)
		return 0;
	in->n--;
	return *in->p++;
}

static uint32
in_uint(Input *in, int bytes)
{
	uint32		v = 0;

	for (int i = 0; i < bytes; i++)
		v |= in_byte(in) << (8 * i);
	return v;
}

/* Append a piece of len bytes (data, or zeros); false if it does not fit */
static bool
add_piece(Segment *seg, const void *data, size_t len, bool record)
{
	if (len == 0 || len > OUT_MAX - seg->len)
		return false;
	if (seg->npieces == seg->cap)
	{
		seg->cap = Max(seg->cap * 2, 64);
		seg->pieces = realloc(seg->pieces, sizeof(Piece) * seg->cap);
		if (seg->pieces == NULL)
			abort();
	}
	if (data != NULL)
		memmove(seg->buf + seg->len, data, len);
	else
		memset(seg->buf + seg->len, 0, len);
	seg->pieces[seg->npieces].off = seg->len;
	seg->pieces[seg->npieces].len = len;
	seg->pieces[seg->npieces].record = record;
	seg->npieces++;
	seg->len += len;
	return true;
}

/* Append payload framed with wal_record_frame(), as src/wal.c writes it */
static void
add_record(Segment *seg, const char *payload, size_t len)
{
	char	   *framed;

	if (len == 0 || len > OUT_MAX || wal_record_size(len) > OUT_MAX - seg->len)
		return;
	framed = malloc(wal_record_size(len));
	if (framed == NULL)
		abort();
	wal_record_frame(framed, payload, (uint32) len);
	add_piece(seg, framed, wal_record_size(len), true);
	free(framed);
}

static void
add_json(Segment *seg, json_t *rec)
{
	char	   *payload = json_dumps(rec, JSON_COMPACT);

	json_decref(rec);
	if (payload == NULL)
		return;
	add_record(seg, payload, strlen(payload));
	free(payload);
}

/* A JSON string from up to max input bytes ("a" if they are not UTF-8) */
static json_t *
in_string(Input *in, size_t max, bool nonempty)
{
	size_t		n = in_byte(in) % (max + 1);
	json_t	   *s;

	n = Min(n, in->n);
	if (nonempty && n == 0)
		return json_string("a");
	s = json_stringn((const char *) in->p, n);
	in->p += n;
	in->n -= n;
	return s != NULL ? s : json_string("a");
}

/* An entry shaped like src/wal.c's entry_record() */
static json_t *
in_entry(Input *in)
{
	int			op = in_byte(in) % 3 + 1;
	int			nparts = op == 2 ? 2 : 1;
	json_t	   *parts = json_array();
	uint32		v[7];
	uint32		att;

	if (in_byte(in) == 0xFF)
		nparts = in_byte(in) % 4;	/* malformed for the extension, fine here */
	for (int i = 0; i < nparts; i++)
	{
		json_t	   *cols = json_array();
		int			ncols = in_byte(in) % 4 + 1;
		char		nulls[8];
		json_t	   *text;

		for (int c = 0; c < ncols; c++)
		{
			json_array_append_new(cols, in_string(in, 8, true));
			nulls[c] = (in_byte(in) & 1) ? 'n' : 'v';
		}
		nulls[ncols] = '\0';
		text = in_string(in, 64, false);
		json_array_append_new(parts,
							  json_pack("{s:i, s:o, s:s, s:o}",
										"k", op == 1 ? 1 : 2 + i,
										"c", cols,
										"n", nulls,
										"j", text));
	}
	/* read in order (the order of evaluation of arguments is unspecified) */
	for (int i = 0; i < 7; i++)
		v[i] = in_uint(in, 4);
	att = in_byte(in) % 4;
	/* records written after version 0.3.0 have no "c" and "n": half are such */
	if (att % 2 == 1)
	{
		size_t		i;
		json_t	   *part;

		json_array_foreach(parts, i, part)
		{
			json_object_del(part, "c");
			json_object_del(part, "n");
		}
	}
	return json_pack("{s:s, s:I, s:I, s:I, s:I, s:I, s:i, s:I, s:I, s:I, s:o}",
					 "t", "e",
					 "id", (json_int_t) v[0],
					 "q", (json_int_t) v[1],
					 "db", (json_int_t) v[2],
					 "role", (json_int_t) v[3],
					 "rel", (json_int_t) v[4],
					 "op", op,
					 "xid", (json_int_t) v[5],
					 "at", (json_int_t) ((uint64) v[6] << 20),
					 "att", (json_int_t) att,
					 "p", parts);
}

static void
build(Segment *seg, Input *in)
{
	while (in->n > 0)
	{
		uint32		x;

		switch (in_byte(in) % OP_COUNT)
		{
			case OP_RAW:
				{
					size_t		n = in_uint(in, 2);

					n = Min(n, in->n);
					add_record(seg, (const char *) in->p, n);
					in->p += n;
					in->n -= n;
					break;
				}
			case OP_ENTRY:
				add_json(seg, in_entry(in));
				break;
			case OP_ABORT:
				{
					json_t	   *q = json_array();

					for (x = in_byte(in) % 16; x > 0; x--)
						json_array_append_new(q, json_integer(in_uint(in, 4)));
					add_json(seg, json_pack("{s:s, s:o}", "t", "a", "q", q));
					break;
				}
			case OP_ZEROS:
				add_piece(seg, NULL, 8 * (in_byte(in) + 1), false);
				break;
			case OP_GARBAGE:
				{
					size_t		n = 8 * (in_byte(in) % 32 + 1);
					char		g[8 * 32];

					memset(g, 0x5A, n);
					memcpy(g, in->p, Min(n, in->n));
					in->p += Min(n, in->n);
					in->n -= Min(n, in->n);
					add_piece(seg, g, n, false);
					break;
				}
			case OP_HEADER:
				{
					uint32		hdr[4];

					hdr[0] = WAL_RECORD_MAGIC;
					hdr[1] = in_uint(in, 4);
					hdr[2] = in_uint(in, 4);
					hdr[3] = crc_of(hdr, 3 * sizeof(uint32));
					add_piece(seg, hdr, sizeof(hdr), false);
					break;
				}
			case OP_FLIP:
				{
					size_t		pos = in_uint(in, 3);

					x = in_byte(in);
					if (seg->len > 0)
						seg->buf[pos % seg->len] ^= (char) (x != 0 ? x : 0x80);
					break;
				}
			case OP_REPEAT:
				{
					size_t		m,
								first;

					x = in_byte(in);
					m = Min(x % 8 + 1, seg->npieces);
					first = seg->npieces - m;
					for (int k = (x / 8) % 8 + 1; k > 0; k--)
						for (size_t i = first; i < first + m; i++)
						{
							Piece		p = seg->pieces[i];

							if (!add_piece(seg, seg->buf + p.off, p.len, p.record))
								break;
						}
					break;
				}
			case OP_CUT:
				seg->cut = in_uint(in, 2);
				break;
		}
	}
	seg->cut %= seg->len + 1;
}

/*
 * The oracle: a piece written as a record is intact if a whole valid record
 * of its length is still there.  If no other 8-aligned position (outside
 * intact records) holds a valid record, which the reader cannot tell from a
 * real one, the reader must report every intact record where it was
 * written: as a record if its payload is a JSON object, as corrupt damage
 * otherwise.
 *
 * No prediction either when the headers that pass their CRC but not their
 * payload's claim more than the segment size in all (at most
 * ORACLE_MAX_HEADERS are looked at): a reader may give up checksumming such
 * payloads past a budget, to stay linear in the segment size, and call the
 * rest damage.  Real damage never claims more than the segment: a real
 * header's payload is its own record.
 */
NO_COVERAGE static void
check_oracle(const Segment *seg, size_t size, const Scan *s)
{
	size_t		ri = 0;
	size_t		nheaders = 0;
	size_t		wasted = 0;
	uint32		len;

	/* any foreign position with a valid record?  (pieces are contiguous) */
	for (size_t i = 0; i < seg->npieces; i++)
	{
		const Piece *p = &seg->pieces[i];

		if (p->record && oracle_record_at(seg->buf, size, p->off, &len) &&
			wal_record_size(len) == p->len)
			continue;
		for (size_t off = p->off; off < p->off + p->len && off < size; off += 8)
		{
			if (!header_at(seg->buf, size, off, &len))
				continue;
			if (++nheaders > ORACLE_MAX_HEADERS ||
				oracle_record_at(seg->buf, size, off, &len))
				return;			/* no prediction */
			wasted += len;
		}
	}
	if (wasted > size)
		return;

	for (size_t i = 0; i < seg->npieces; i++)
	{
		const Piece *p = &seg->pieces[i];
		json_t	   *rec;
		bool		object;

		if (!p->record || !oracle_record_at(seg->buf, size, p->off, &len) ||
			wal_record_size(len) != p->len)
			continue;
		rec = json_loadb(seg->buf + p->off + WAL_RECORD_HEADER, len, JSON_REJECT_DUPLICATES, NULL);
		object = rec != NULL && json_is_object(rec);
		json_decref(rec);

		while (ri < s->n && s->r[ri].off < p->off)
			ri++;
		CHECK("oracle", ri < s->n && s->r[ri].off == p->off && s->r[ri].record == object &&
			  !s->r[ri].torn,
			  "intact record at offset %zu (%u-byte %s payload) not reported as %s",
			  p->off, len, object ? "object" : "non-object",
			  object ? "a record" : "corrupt damage");
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	/* kept from one input to the next: a big malloc per input is slow */
	static char *buf;
	static Piece *pieces;
	static size_t npieces_cap;
	Segment		seg;
	Input		in = {data, size};
	Scan		last,
				earlier;
	char	   *copy;
	size_t		len;

	if (buf == NULL && (buf = malloc(OUT_MAX)) == NULL)
		abort();
	memset(&seg, 0, sizeof(seg));
	seg.buf = buf;
	seg.pieces = pieces;
	seg.cap = npieces_cap;
	build(&seg, &in);
	pieces = seg.pieces;
	npieces_cap = seg.cap;

	/* scan an exact-size copy, so that AddressSanitizer sees overreads */
	len = seg.len - seg.cut;
	copy = malloc(Max(len, 1));
	if (copy == NULL)
		abort();
	memcpy(copy, seg.buf, len);
	scan_both(copy, len, &last, &earlier);
	seg.buf = copy;
	check_oracle(&seg, len, &last);

	free(copy);
	free(last.r);
	free(earlier.r);
	return 0;
}

#endif							/* WAL_FUZZ_FRAMED */
