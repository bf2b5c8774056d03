/* bench_probe.c: this machine's own limits for `moegen bench`: the f32 FMA
 * peak of all threads and the DRAM read bandwidth. The percentages the bench
 * reports are relative to these measurements, not to data-sheet numbers. */
#include "bench.h"

#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "moe_mem.h"
#include "pool.h"

double moe_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Twelve independent accumulators: enough to cover the FMA latency (4-5
 * cycles) times the two FMA pipes, so the loop is throughput-bound. Named
 * variables rather than an array keep them in registers; the multiplier and
 * addend keep the values bounded and normal. The empty asm stops the compiler
 * from folding iterations together. */
#define CHAINS 12
#define FMA_BODY(FMA)                                                                              \
	a0 = FMA(a0, m, c), a1 = FMA(a1, m, c), a2 = FMA(a2, m, c), a3 = FMA(a3, m, c);            \
	a4 = FMA(a4, m, c), a5 = FMA(a5, m, c), a6 = FMA(a6, m, c), a7 = FMA(a7, m, c);            \
	a8 = FMA(a8, m, c), a9 = FMA(a9, m, c), a10 = FMA(a10, m, c), a11 = FMA(a11, m, c)
#define FMA_KEEP(R)                                                                                \
	__asm__ volatile(""                                                                        \
			 : "+" R(a0), "+" R(a1), "+" R(a2), "+" R(a3), "+" R(a4), "+" R(a5),       \
			   "+" R(a6), "+" R(a7), "+" R(a8), "+" R(a9), "+" R(a10), "+" R(a11))
#define FMA_SUM(ADD)                                                                               \
	ADD(ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(a6, a7))),                     \
	    ADD(ADD(a8, a9), ADD(a10, a11)))

__attribute__((target("avx2,fma"))) static float fma8_loop(long iters)
{
	__m256 a0 = _mm256_set1_ps(0.01f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
	       a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0;
	const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-6f);
	for (long i = 0; i < iters; i++) {
		FMA_BODY(_mm256_fmadd_ps);
		FMA_KEEP("x");
	}
	__m256 s = FMA_SUM(_mm256_add_ps);
	float out[8];
	_mm256_storeu_ps(out, s);
	return out[0];
}

__attribute__((target("avx512f"))) static float fma16_loop(long iters)
{
	__m512 a0 = _mm512_set1_ps(0.01f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
	       a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0;
	const __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-6f);
	for (long i = 0; i < iters; i++) {
		FMA_BODY(_mm512_fmadd_ps);
		FMA_KEEP("v");
	}
	return _mm512_reduce_add_ps(FMA_SUM(_mm512_add_ps));
}

struct fma_job {
	int width;
	long iters;
	volatile float sink;
};

static void fma_task(void *ctx, size_t task, unsigned thread)
{
	(void)task;
	(void)thread;
	struct fma_job *j = ctx;
	float v = j->width == 16 ? fma16_loop(j->iters) : fma8_loop(j->iters);
	j->sink = v;
}

double moe_probe_fma(struct moe_pool *p, int width, int runs)
{
	__builtin_cpu_init();
	if (width == 8 && !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")))
		return 0;
	if (width == 16 && !__builtin_cpu_supports("avx512f"))
		return 0;
	if (width != 8 && width != 16)
		return 0;
	unsigned n = moe_pool_size(p);
	struct fma_job j = {.width = width, .iters = 1000};
	/* Calibrate to about 0.1 s per run, so a run outlasts timer noise and
	 * frequency ramp-up (the first runs also serve as warm-up). */
	for (;;) {
		double t0 = moe_now();
		moe_pool_run_static(p, n, fma_task, &j);
		double dt = moe_now() - t0;
		if (dt > 0.05 || j.iters > (1L << 40))
			break;
		j.iters *= dt < 0.005 ? 10 : 2;
	}
	double best = 0;
	for (int r = 0; r < runs; r++) {
		double t0 = moe_now();
		moe_pool_run_static(p, n, fma_task, &j);
		double dt = moe_now() - t0;
		double gf = 2.0 * width * CHAINS * (double)j.iters * n / dt * 1e-9;
		if (gf > best)
			best = gf;
	}
	return best;
}

struct bw_job {
	float *buf;
	size_t n; /* floats */
	unsigned n_threads;
	int touch;
	float sums[256];
};

__attribute__((target("avx2"))) static float sum_slice(const float *p, size_t n)
{
	__m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
	size_t i = 0;
	for (; i + 32 <= n; i += 32) {
		a0 = _mm256_add_ps(a0, _mm256_load_ps(p + i));
		a1 = _mm256_add_ps(a1, _mm256_load_ps(p + i + 8));
		a2 = _mm256_add_ps(a2, _mm256_load_ps(p + i + 16));
		a3 = _mm256_add_ps(a3, _mm256_load_ps(p + i + 24));
	}
	__m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
	float out[8];
	_mm256_storeu_ps(out, s);
	float t = 0;
	for (int k = 0; k < 8; k++)
		t += out[k];
	for (; i < n; i++)
		t += p[i];
	return t;
}

static float sum_slice_plain(const float *p, size_t n)
{
	float t = 0;
	for (size_t i = 0; i < n; i++)
		t += p[i];
	return t;
}

static void bw_task(void *ctx, size_t task, unsigned thread)
{
	(void)thread;
	struct bw_job *j = ctx;
	/* Slices of whole 32-float blocks, so every slice stays aligned. */
	size_t blocks = j->n / 32, per = (blocks + j->n_threads - 1) / j->n_threads;
	size_t b0 = task * per, b1 = b0 + per < blocks ? b0 + per : blocks;
	if (b0 >= b1)
		return;
	float *p = j->buf + b0 * 32;
	size_t n = (b1 - b0) * 32;
	if (j->touch) {
		/* First touch from the thread that reads it later. */
		for (size_t i = 0; i < n; i++)
			p[i] = (float)(i & 1023) * 1e-3f;
		return;
	}
	j->sums[task % 256] =
	    __builtin_cpu_supports("avx2") ? sum_slice(p, n) : sum_slice_plain(p, n);
}

struct moe_dram_probe {
	struct moe_pool *p;
	struct bw_job j;
};

struct moe_dram_probe *moe_dram_probe_open(struct moe_pool *p, size_t bytes)
{
	struct moe_dram_probe *pr = calloc(1, sizeof *pr);
	if (!pr)
		return NULL;
	pr->p = p;
	pr->j.n = bytes / sizeof(float) / 32 * 32;
	/* huge pages like the weights the kernels stream (moe_big_alloc) */
	pr->j.buf = moe_big_alloc(pr->j.n * sizeof(float), 0);
	if (!pr->j.buf) {
		free(pr);
		return NULL;
	}
	__builtin_cpu_init();
	pr->j.n_threads = moe_pool_size(p);
	pr->j.touch = 1;
	moe_pool_run_static(p, pr->j.n_threads, bw_task, &pr->j);
	pr->j.touch = 0;
	moe_pool_run_static(p, pr->j.n_threads, bw_task, &pr->j); /* warm-up: TLB, frequency */
	return pr;
}

double moe_dram_probe_read(struct moe_dram_probe *pr)
{
	double t0 = moe_now();
	moe_pool_run_static(pr->p, pr->j.n_threads, bw_task, &pr->j);
	double dt = moe_now() - t0;
	return (double)(pr->j.n * sizeof(float)) / dt * 1e-9;
}

void moe_dram_probe_close(struct moe_dram_probe *pr)
{
	if (!pr)
		return;
	free(pr->j.buf);
	free(pr);
}

double moe_probe_dram(struct moe_pool *p, size_t bytes, int runs)
{
	struct moe_dram_probe *pr = moe_dram_probe_open(p, bytes);
	if (!pr)
		return 0;
	double best = 0;
	for (int r = 0; r < runs; r++) {
		double gbps = moe_dram_probe_read(pr);
		if (gbps > best)
			best = gbps;
	}
	moe_dram_probe_close(pr);
	return best;
}

size_t moe_probe_llc_bytes(void)
{
	/* sysfs describes the cache this CPU actually shares; sysconf can report
	 * a virtual machine's host-wide figure. */
	for (int idx = 4; idx >= 2; idx--) {
		char path[96], buf[64];
		snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", idx);
		FILE *f = fopen(path, "r");
		if (!f)
			continue;
		char *ok = fgets(buf, sizeof buf, f);
		fclose(f);
		if (!ok)
			continue;
		char *end;
		unsigned long long v = strtoull(buf, &end, 10);
		if (*end == 'K')
			v <<= 10;
		else if (*end == 'M')
			v <<= 20;
		if (v)
			return (size_t)v;
	}
	long s = sysconf(_SC_LEVEL3_CACHE_SIZE);
	return s > 0 ? (size_t)s : (size_t)32 << 20;
}
