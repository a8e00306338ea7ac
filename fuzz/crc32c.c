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
 * With -DCRC32C_NO_PG_SYMBOL only fuzz_crc32c() is defined, so that it can
 * be linked next to libpgport for that comparison.
 *
 *-------------------------------------------------------------------------
 */
#include <stddef.h>
#include <stdint.h>

uint32_t	fuzz_crc32c(uint32_t crc, const void *data, size_t len);

uint32_t
fuzz_crc32c(uint32_t crc, const void *data, size_t len)
{
	const unsigned char *p = data;

	/* reflected polynomial 0x1EDC6F41; same in/out convention as pg_crc32c */
	while (len-- > 0)
	{
		crc ^= *p++;
		for (int k = 0; k < 8; k++)
			crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1)));
	}
	return crc;
}

#ifndef CRC32C_NO_PG_SYMBOL
/*
 * What COMP_CRC32C calls: the pointer with USE_SSE42_CRC32C_WITH_RUNTIME_CHECK
 * (Debian's x86-64 build), the functions with the other configurations.
 */
uint32_t	(*pg_comp_crc32c) (uint32_t crc, const void *data, size_t len) = fuzz_crc32c;
uint32_t	pg_comp_crc32c_sse42(uint32_t crc, const void *data, size_t len);
uint32_t	pg_comp_crc32c_sb8(uint32_t crc, const void *data, size_t len);

uint32_t
pg_comp_crc32c_sse42(uint32_t crc, const void *data, size_t len)
{
	return fuzz_crc32c(crc, data, len);
}

uint32_t
pg_comp_crc32c_sb8(uint32_t crc, const void *data, size_t len)
{
	return fuzz_crc32c(crc, data, len);
}
#endif
