/* moe_mem.h: memory for the large tensors the kernels stream (packed expert
 * panels, canonical weights, PEER's neuron tables). */
#ifndef MOE_MEM_H
#define MOE_MEM_H

#include <stddef.h>

/* bytes of memory aligned to 64, zeroed when zero is set; NULL when out of
 * memory. From 2 MiB on the block is aligned to 2 MiB and advised for
 * transparent huge pages: a stream over 4 KiB pages takes a TLB entry per
 * page, and the measured read bandwidth here is about 1.5x higher over
 * huge pages. Free with free(). */
void *moe_big_alloc(size_t bytes, int zero);

#endif
