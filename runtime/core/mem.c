/* mem.c: large, huge-page advised allocations (moe_mem.h). */
#include "moe_mem.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define HUGE_PAGE ((size_t)2 << 20)

void *moe_big_alloc(size_t bytes, int zero)
{
	size_t a = bytes >= HUGE_PAGE ? HUGE_PAGE : 64;
	if (bytes > SIZE_MAX - a)
		return NULL;
	size_t n = bytes ? (bytes + a - 1) / a * a : a;
	void *p = aligned_alloc(a, n);
	if (!p)
		return NULL;
	/* advice only: without transparent huge pages it changes nothing */
	if (a == HUGE_PAGE && !getenv("MOE_NO_HUGE"))
		madvise(p, n, MADV_HUGEPAGE);
	if (zero)
		memset(p, 0, n);
	return p;
}
