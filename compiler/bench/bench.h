/* bench.h: `moegen bench` (bench.c): the generated layer against this
 * machine's own limits (bench_probe.c: FMA peak, DRAM read bandwidth) and a
 * BLAS baseline. docs/benchmarks.md describes the method. */
#ifndef MOE_BENCH_H
#define MOE_BENCH_H

#include <stddef.h>

struct moe_pool;

/* moegen bench [--shapes LIST] [--tokens LIST] [--weights LIST] [--routing
 * LIST] [--threads N] [--reps N] [--copies N] [--quick] [--csv FILE] [--json FILE]
 * [--no-generated] [--modes LIST].
 * argv[0] is "bench". Returns a MOE_EXIT_* code. */
int moe_cmd_bench(int argc, char **argv);

/* bench_probe.c ---------------------------------------------------------- */

/* Peak f32 multiply-add rate of the pool's threads in GFLOP/s (2 flops per
 * lane per FMA): independent FMA chains on every thread at once, the best of
 * `runs`. width 8 uses AVX2+FMA, 16 uses AVX-512F; 0 when this CPU lacks the
 * instructions. */
double moe_probe_fma(struct moe_pool *p, int width, int runs);

/* DRAM read bandwidth in GB/s (1e9 bytes/s): every thread sums its slice of
 * a `bytes` buffer (choose it well beyond the last-level cache), best of
 * `runs`. 0 when the buffer cannot be allocated. */
double moe_probe_dram(struct moe_pool *p, size_t bytes, int runs);

/* The same read kept open: one buffer of `bytes`, touched and read once at
 * open; moe_dram_probe_read times one more read of it (GB/s), so a reading
 * can be taken beside each timed run. NULL when it cannot be allocated. */
struct moe_dram_probe;
struct moe_dram_probe *moe_dram_probe_open(struct moe_pool *p, size_t bytes);
double moe_dram_probe_read(struct moe_dram_probe *pr);
void moe_dram_probe_close(struct moe_dram_probe *pr); /* NULL is a no-op */

/* Size of the last-level cache in bytes (sysfs, then sysconf, else 32 MiB). */
size_t moe_probe_llc_bytes(void);

/* Wall-clock seconds, monotonic. */
double moe_now(void);

#endif
