/*-------------------------------------------------------------------------
 *
 * wal_seed_gen.c
 *		Writes the seed corpus of the WAL reader fuzz targets.
 *
 *	wal_seed_gen DIR	writes DIR/raw/ (segments for wal_reader_fuzz) and
 *						DIR/framed/ (descriptions for wal_framed_fuzz)
 *
 * Records are framed with wal_record_frame() around JSON payloads shaped
 * like the ones src/wal.c writes (entry_record(), abort markers), and the
 * checksums are PostgreSQL's own: this program is linked with libpgport,
 * not with fuzz/crc32c.c's pointer.  It also checks that fuzz/crc32c.c
 * computes the same CRC as libpgport, and that each segment scans back
 * with the records it was written with.
 *
 * Run by scripts/fuzz.sh seeds; the output is committed in fuzz/corpus/.
 *
 *-------------------------------------------------------------------------
 */
#include "c.h"

#include "port/pg_crc32c.h"

#include "wal_format.h"

#include <errno.h>
#include <sys/stat.h>

/* port.h maps these to libpgport's pg_* versions; the C library's will do */
#undef fprintf
#undef snprintf

uint32_t	fuzz_crc32c(uint32_t crc, const void *data, size_t len);

static const char *outdir;

/* ---------------------------------------------------------------- segments */

typedef struct Seg
{
	char		buf[4096];
	size_t		len;
	int			records;		/* valid object records written */
} Seg;

static void
seg_record(Seg *seg, const char *payload, bool object)
{
	size_t		len = strlen(payload);

	if (seg->len + wal_record_size(len) > sizeof(seg->buf))
		abort();
	wal_record_frame(seg->buf + seg->len, payload, (uint32) len);
	seg->len += wal_record_size(len);
	if (object)
		seg->records++;
}

static void
seg_bytes(Seg *seg, const void *data, size_t len)
{
	if (seg->len + len > sizeof(seg->buf))
		abort();
	memcpy(seg->buf + seg->len, data, len);
	seg->len += len;
}

/* zero-fill to size, as a pre-allocated segment is */
static void
seg_pad(Seg *seg, size_t size)
{
	if (size > sizeof(seg->buf) || size < seg->len)
		abort();
	memset(seg->buf + seg->len, 0, size - seg->len);
	seg->len = size;
}

static void
write_file(const char *sub, const char *name, const void *data, size_t len)
{
	char		path[1024];
	FILE	   *f;

	snprintf(path, sizeof(path), "%s/%s/%s", outdir, sub, name);
	f = fopen(path, "wb");
	if (f == NULL || fwrite(data, 1, len, f) != len || fclose(f) != 0)
	{
		perror(path);
		exit(1);
	}
}

static void
count_record(void *arg, json_t *rec, size_t offset)
{
	(void) offset;
	(*(int *) arg)++;
	json_decref(rec);
}

static void
ignore_damage(void *arg, bool torn, size_t offset, size_t len)
{
	(void) arg;
	(void) torn;
	(void) offset;
	(void) len;
}

/* write a segment seed, after checking that the reader finds its records */
static void
write_seg(const char *name, Seg *seg, int damaged)
{
	WalScanStats stats;
	int			found = 0;

	memset(&stats, 0, sizeof(stats));
	wal_scan_segment(seg->buf, seg->len, true, count_record, ignore_damage, &found, &stats);
	if (found != seg->records || (int) (stats.torn + stats.corrupt) != damaged)
	{
		fprintf(stderr, "wal_seed_gen: %s: %d records and %d damaged stretches expected, found %d and %d\n",
				name, seg->records, damaged, found, (int) (stats.torn + stats.corrupt));
		exit(1);
	}
	write_file("raw", name, seg->buf, seg->len);
}

/* ---------------------------------------------------------------- payloads */

/* an entry record, as src/wal.c's entry_record() writes it */
static const char *ENTRY_INSERT =
"{\"t\":\"e\",\"id\":1,\"q\":1,\"db\":16384,\"role\":10,\"rel\":16390,\"op\":1,"
"\"xid\":0,\"at\":784111777000000,\"att\":0,"
"\"p\":[{\"k\":1,\"c\":[\"a\"],\"n\":\"v\",\"j\":\"[{\\\"a\\\":1}]\"}]}";

static const char *ENTRY_INSERT2 =
"{\"t\":\"e\",\"id\":2,\"q\":2,\"db\":16384,\"role\":10,\"rel\":16390,\"op\":1,"
"\"xid\":742,\"at\":784111777000123,\"att\":1,"
"\"p\":[{\"k\":1,\"c\":[\"a\",\"b\"],\"n\":\"vn\",\"j\":\"[{\\\"a\\\":2,\\\"b\\\":null},{\\\"a\\\":3,\\\"b\\\":null}]\"}]}";

static const char *ENTRY_UPDATE =
"{\"t\":\"e\",\"id\":3,\"q\":3,\"db\":16384,\"role\":10,\"rel\":16390,\"op\":2,"
"\"xid\":743,\"at\":784111777000456,\"att\":0,"
"\"p\":[{\"k\":2,\"c\":[\"id\"],\"n\":\"v\",\"j\":\"{\\\"id\\\":7}\"},"
"{\"k\":3,\"c\":[\"v\"],\"n\":\"v\",\"j\":\"{\\\"v\\\":\\\"x\\\"}\"}]}";

static const char *ENTRY_DELETE =
"{\"t\":\"e\",\"id\":4,\"q\":4,\"db\":16384,\"role\":10,\"rel\":16390,\"op\":3,"
"\"xid\":0,\"at\":784111777000789,\"att\":0,"
"\"p\":[{\"k\":2,\"c\":[\"id\"],\"n\":\"v\",\"j\":\"{\\\"id\\\":7}\"}]}";

static const char *ABORT_MARKER = "{\"t\":\"a\",\"q\":[1,2]}";

static void
raw_seeds(void)
{
	Seg			seg;
	char		torn[4096];
	size_t		half;

	/* a segment as the extension leaves it: entries, an abort, zeros */
	memset(&seg, 0, sizeof(seg));
	seg_record(&seg, ENTRY_INSERT, true);
	seg_record(&seg, ENTRY_INSERT2, true);
	seg_record(&seg, ENTRY_UPDATE, true);
	seg_record(&seg, ENTRY_DELETE, true);
	seg_record(&seg, ABORT_MARKER, true);
	seg_pad(&seg, 1024);
	write_seg("01-entries", &seg, 0);

	/* just an abort marker */
	memset(&seg, 0, sizeof(seg));
	seg_record(&seg, ABORT_MARKER, true);
	seg_pad(&seg, 128);
	write_seg("02-abort", &seg, 0);

	/* torn tail: the second record's write was cut short */
	memset(&seg, 0, sizeof(seg));
	seg_record(&seg, ENTRY_INSERT, true);
	wal_record_frame(torn, ENTRY_INSERT2, (uint32) strlen(ENTRY_INSERT2));
	half = WAL_RECORD_HEADER + strlen(ENTRY_INSERT2) / 2;
	seg_bytes(&seg, torn, half);
	seg_pad(&seg, 640);
	write_seg("03-torn", &seg, 1);

	/* corruption in the middle: a flipped byte in the second record */
	memset(&seg, 0, sizeof(seg));
	seg_record(&seg, ENTRY_INSERT, true);
	{
		size_t		at = seg.len + WAL_RECORD_HEADER + 10;

		seg_record(&seg, ENTRY_DELETE, false);
		seg.buf[at] ^= 0x01;
	}
	seg_record(&seg, ABORT_MARKER, true);
	seg_pad(&seg, 768);
	write_seg("04-corrupt", &seg, 1);

	/* valid checksums around payloads that are not ours */
	memset(&seg, 0, sizeof(seg));
	seg_record(&seg, "[1,2,3]", false);
	seg_record(&seg, "{\"t\":\"a\",\"t\":\"a\"}", false);	/* duplicate key */
	seg_record(&seg, "{\"t\":", false);
	seg_record(&seg, ABORT_MARKER, true);
	seg_pad(&seg, 256);
	write_seg("05-not-objects", &seg, 3);

	/* an empty segment */
	memset(&seg, 0, sizeof(seg));
	seg_pad(&seg, 64);
	write_seg("06-empty", &seg, 0);

	/* a size that is not a multiple of 8, stray bytes at the end */
	memset(&seg, 0, sizeof(seg));
	seg_record(&seg, ABORT_MARKER, true);
	seg_bytes(&seg, "\x41\x44\x44", 3);
	write_seg("07-stray-tail", &seg, 1);
}

/* ---------------------------------------------------------------- framed */

/* opcodes of wal_framed_fuzz (see fuzz/wal_reader_fuzz.c) */
enum
{
	OP_RAW, OP_ENTRY, OP_ABORT, OP_ZEROS, OP_GARBAGE, OP_HEADER, OP_FLIP,
	OP_REPEAT, OP_CUT
};

typedef struct Desc
{
	unsigned char buf[1024];
	size_t		len;
} Desc;

static void
d_byte(Desc *d, unsigned int b)
{
	if (d->len == sizeof(d->buf))
		abort();
	d->buf[d->len++] = (unsigned char) b;
}

static void
d_uint(Desc *d, uint32 v, int bytes)
{
	for (int i = 0; i < bytes; i++)
		d_byte(d, (v >> (8 * i)) & 0xFF);
}

static void
d_raw(Desc *d, const char *payload)
{
	size_t		n = strlen(payload);

	d_byte(d, OP_RAW);
	d_uint(d, (uint32) n, 2);
	for (size_t i = 0; i < n; i++)
		d_byte(d, (unsigned char) payload[i]);
}

static void
d_string(Desc *d, const char *s)
{
	d_byte(d, (unsigned int) strlen(s));
	while (*s)
		d_byte(d, (unsigned char) *s++);
}

/* an OP_ENTRY: op, one or two parts, values */
static void
d_entry(Desc *d, int op)
{
	int			nparts = op == 2 ? 2 : 1;

	d_byte(d, OP_ENTRY);
	d_byte(d, op - 1);
	d_byte(d, 0);				/* not 0xFF: the usual number of parts */
	for (int i = 0; i < nparts; i++)
	{
		d_byte(d, 0);			/* one column */
		d_string(d, "a");
		d_byte(d, 0);			/* not null */
		d_string(d, op == 1 ? "[{\"a\":1}]" : "{\"a\":1}");
	}
	d_uint(d, 1, 4);			/* id */
	d_uint(d, 1, 4);			/* q */
	d_uint(d, 16384, 4);		/* db */
	d_uint(d, 10, 4);			/* role */
	d_uint(d, 16390, 4);		/* rel */
	d_uint(d, 0, 4);			/* xid */
	d_uint(d, 747782, 4);		/* at >> 20 */
	d_byte(d, 0);				/* att */
}

static void
d_write(const char *name, Desc *d)
{
	write_file("framed", name, d->buf, d->len);
	d->len = 0;
}

static void
framed_seeds(void)
{
	Desc		d;

	d.len = 0;
	d_entry(&d, 1);
	d_entry(&d, 2);
	d_entry(&d, 3);
	d_byte(&d, OP_ABORT);
	d_byte(&d, 2);
	d_uint(&d, 1, 4);
	d_uint(&d, 2, 4);
	d_byte(&d, OP_ZEROS);
	d_byte(&d, 31);
	d_write("01-entries", &d);

	d_raw(&d, ABORT_MARKER);
	d_raw(&d, "[1,2,3]");
	d_raw(&d, ENTRY_INSERT);
	d_byte(&d, OP_ZEROS);
	d_byte(&d, 7);
	d_write("02-raw", &d);

	/* damage in the middle, then a torn tail */
	d_entry(&d, 1);
	d_byte(&d, OP_GARBAGE);
	d_byte(&d, 1);
	for (int i = 0; i < 16; i++)
		d_byte(&d, 0xA5 ^ i);
	d_raw(&d, ABORT_MARKER);
	d_byte(&d, OP_FLIP);
	d_uint(&d, 40, 3);
	d_byte(&d, 0x10);
	d_entry(&d, 3);
	d_byte(&d, OP_HEADER);
	d_uint(&d, 200, 4);
	d_uint(&d, 0x12345678, 4);
	d_byte(&d, OP_ZEROS);
	d_byte(&d, 15);
	d_write("03-damage", &d);

	/* copies, and a segment cut short */
	d_entry(&d, 1);
	d_raw(&d, ABORT_MARKER);
	d_byte(&d, OP_REPEAT);
	d_byte(&d, 1 + 8 * 3);		/* last 2 pieces, 4 times */
	d_byte(&d, OP_CUT);
	d_uint(&d, 20, 2);
	d_write("04-repeat-cut", &d);
}

/* ---------------------------------------------------------------- main */

static void
make_dir(const char *sub)
{
	char		path[1024];

	snprintf(path, sizeof(path), "%s%s%s", outdir, sub[0] ? "/" : "", sub);
	if (mkdir(path, 0755) != 0 && errno != EEXIST)
	{
		perror(path);
		exit(1);
	}
}

int
main(int argc, char **argv)
{
	unsigned char data[1000];

	if (argc != 2)
	{
		fprintf(stderr, "usage: wal_seed_gen DIR\n");
		return 2;
	}
	outdir = argv[1];

	/* fuzz/crc32c.c must agree with PostgreSQL's CRC-32C */
	for (size_t i = 0; i < sizeof(data); i++)
		data[i] = (unsigned char) (i * 131 + (i >> 3));
	for (size_t len = 0; len <= sizeof(data); len += 37)
	{
		pg_crc32c	crc;

		INIT_CRC32C(crc);
		COMP_CRC32C(crc, data, len);
		if (crc != fuzz_crc32c(0xFFFFFFFF, data, len))
		{
			fprintf(stderr, "wal_seed_gen: fuzz/crc32c.c disagrees with libpgport for %zu bytes\n", len);
			return 1;
		}
	}

	make_dir("");
	make_dir("raw");
	make_dir("framed");
	raw_seeds();
	framed_seeds();
	return 0;
}
