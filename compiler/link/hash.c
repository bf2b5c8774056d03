/* hash.c: the spec hash in moe_info(): XXH3-128 (Debian's xxhash, inlined
 * from its header so that the runtime-only tools of a cross target need no
 * library) of the model dump, moe_describe's text, as the 32 hex digits of
 * its canonical (big-endian) form. */
#include "backend.h"

#include <stdlib.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

void moe_desc_hash(const struct moe_desc *d, char hex[33])
{
	size_t n = moe_desc_dump(d, NULL, 0);
	char *buf = malloc(n + 1);
	XXH128_hash_t h = {0, 0};
	if (buf) {
		moe_desc_dump(d, buf, n + 1);
		h = XXH3_128bits(buf, n);
		free(buf);
	}
	XXH128_canonical_t c;
	XXH128_canonicalFromHash(&c, h);
	for (size_t i = 0; i < sizeof c.digest; i++)
		snprintf(hex + 2 * i, 3, "%02x", c.digest[i]);
}
