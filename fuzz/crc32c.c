/*-------------------------------------------------------------------------
 *
 * crc32c.c
 *		A plain C CRC-32C (Castagnoli) for the fuzz builds.
 *
 * src/wal_format.c computes its checksums with PostgreSQL's COMP_CRC32C,
 * which on Debian's x86-64 build calls through the pg_comp_crc32c function
 * pointer (USE_SSE42_CRC32C_WITH_RUNTIME_CHECK).  The implementations behind
 * it live in libpgport.a, which is not built with the sanitizers: AddressSanitizer
 * would not see a checksum read past the end of a buffer.  This file
 * supplies the pointer with a byte-at-a-time implementation that is
 * compiled with the harness, so that every byte the reader checksums is
 * checked.  It gives the same results as PostgreSQL's (wal_seed_gen, linked
 * with libpgport, compares the two).
 *
 * fuzz_crc32c_bytes counts the bytes checksummed through pg_comp_crc32c, so
 * that the harness can check that the reader's work stays linear in the
 * size of the segment (a quadratic reader is a hang on a big enough one,
 * and the count finds it on inputs small enough for the fuzzer to find).
 *
 * With -DCRC32C_NO_PG_SYMBOL only fuzz_crc32c() is defined, so that it can
 * be linked next to libpgport for that comparison.
 *
 *-------------------------------------------------------------------------
 */
#include <stddef.h>
#include <stdint.h>

uint32_t	fuzz_crc32c(uint32_t crc, const void *data, size_t len);
uint32_t	fuzz_crc32c_counted(uint32_t crc, const void *data, size_t len);
extern size_t fuzz_crc32c_bytes;

size_t		fuzz_crc32c_bytes;

/*
 * COMP_CRC32C's job: no initial or final XOR, those are the macros'.  Not
 * instrumented for coverage: its loop tells the fuzzer nothing.
 */
#if defined(__clang__)
__attribute__((no_sanitize("coverage")))
#endif
uint32_t
fuzz_crc32c(uint32_t crc, const void *data, size_t len)
{
	static uint32_t table[256];
	const unsigned char *p = data;

	if (table[1] == 0)
	{
		/* reflected polynomial 0x1EDC6F41 */
		for (uint32_t i = 0; i < 256; i++)
		{
			uint32_t	c = i;

			for (int k = 0; k < 8; k++)
				c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
			table[i] = c;
		}
	}
	while (len-- > 0)
		crc = table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
	return crc;
}

uint32_t
fuzz_crc32c_counted(uint32_t crc, const void *data, size_t len)
{
	fuzz_crc32c_bytes += len;
	return fuzz_crc32c(crc, data, len);
}

#ifndef CRC32C_NO_PG_SYMBOL
/*
 * What COMP_CRC32C calls: the pointer with USE_SSE42_CRC32C_WITH_RUNTIME_CHECK
 * (Debian's x86-64 build), the functions with the other configurations.
 */
uint32_t	(*pg_comp_crc32c) (uint32_t crc, const void *data, size_t len) = fuzz_crc32c_counted;
uint32_t	pg_comp_crc32c_sse42(uint32_t crc, const void *data, size_t len);
uint32_t	pg_comp_crc32c_sb8(uint32_t crc, const void *data, size_t len);

uint32_t
pg_comp_crc32c_sse42(uint32_t crc, const void *data, size_t len)
{
	return fuzz_crc32c_counted(crc, data, len);
}

uint32_t
pg_comp_crc32c_sb8(uint32_t crc, const void *data, size_t len)
{
	return fuzz_crc32c_counted(crc, data, len);
}
#endif
