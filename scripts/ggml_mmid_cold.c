/* ggml MUL_MAT_ID on Qwen3-30B-A3B's expert projections (128 experts, top 8,
 * H 2048, I 768) with fresh random expert ids every iteration, so that the
 * experts' weights come from DRAM as in a real decode step: one layer = gate
 * and up (768 x 2048 each) and down (2048 x 768). Prints the median ms.
 * A bench peer, not part of the build: against a ggml checkout built in a
 * scratch directory (docs/benchmarks.md),
 *   cc -O2 -std=c11 -D_GNU_SOURCE scripts/ggml_mmid_cold.c -I$GGML/include \
 *      -L$GGML/build/src -lggml -lggml-base -lggml-cpu \
 *      -Wl,-rpath,$GGML/build/src -o mmid_cold
 *   ./mmid_cold bf16|q8_0|q4_0|q4_k [iterations] */
#include <ggml-cpu.h>
#include <ggml.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define E 128
#define K 8
#define H 2048
#define I 768

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + 1e-9 * t.tv_nsec;
}
static uint64_t rs = 88172645463325252ull;
static uint64_t rnd(void)
{
	rs ^= rs << 13, rs ^= rs >> 7, rs ^= rs << 17;
	return rs;
}
static int cmpd(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static void fill(struct ggml_tensor *t, int64_t cols, int64_t rows)
{
	float *f = malloc((size_t)cols * rows * sizeof *f);
	for (int64_t i = 0; i < cols * rows; i++)
		f[i] = ((int64_t)(rnd() % 2001) - 1000) * 1e-3f / 32;
	ggml_quantize_chunk(t->type, f, t->data, 0, rows, cols, NULL);
	free(f);
}

int main(int argc, char **argv)
{
	enum ggml_type ty = GGML_TYPE_Q4_0;
	const char *name = argc > 1 ? argv[1] : "q4_0";
	if (!strcmp(name, "q8_0"))
		ty = GGML_TYPE_Q8_0;
	else if (!strcmp(name, "q4_k"))
		ty = GGML_TYPE_Q4_K;
	else if (!strcmp(name, "bf16"))
		ty = GGML_TYPE_BF16;
	int threads = 2, iters = argc > 2 ? atoi(argv[2]) : 50;
	static const int Ts[] = {1, 16, 256};
	size_t wbytes = 3 * ggml_row_size(ty, H) * (size_t)I * E;
	struct ggml_init_params ip = {wbytes + ((size_t)256 << 20), NULL, false};
	struct ggml_context *ctx = ggml_init(ip);
	struct ggml_tensor *wg = ggml_new_tensor_3d(ctx, ty, H, I, E);
	struct ggml_tensor *wu = ggml_new_tensor_3d(ctx, ty, H, I, E);
	struct ggml_tensor *wd = ggml_new_tensor_3d(ctx, ty, I, H, E);
	fill(wg, H, (int64_t)I * E);
	fill(wu, H, (int64_t)I * E);
	fill(wd, I, (int64_t)H * E);
	printf("type %s, weights %.1f MB, %d threads\n", name, wbytes / 1e6, threads);
	for (size_t ti = 0; ti < sizeof Ts / sizeof *Ts; ti++) {
		int T = Ts[ti];
		struct ggml_tensor *x = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, H, 1, T);
		struct ggml_tensor *h = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, I, K, T);
		struct ggml_tensor *ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, K, T);
		for (int64_t i = 0; i < ggml_nelements(x); i++)
			((float *)x->data)[i] = ((int)(rnd() % 2001) - 1000) * 1e-3f;
		for (int64_t i = 0; i < ggml_nelements(h); i++)
			((float *)h->data)[i] = ((int)(rnd() % 2001) - 1000) * 1e-3f;
		struct ggml_tensor *g = ggml_mul_mat_id(ctx, wg, x, ids);
		struct ggml_tensor *u = ggml_mul_mat_id(ctx, wu, x, ids);
		struct ggml_tensor *d = ggml_mul_mat_id(ctx, wd, h, ids);
		struct ggml_cgraph *gf = ggml_new_graph(ctx);
		ggml_build_forward_expand(gf, g);
		ggml_build_forward_expand(gf, u);
		ggml_build_forward_expand(gf, d);
		struct ggml_cplan plan = ggml_graph_plan(gf, threads, NULL);
		void *work = malloc(plan.work_size ? plan.work_size : 1);
		plan.work_data = work;
		int n = T >= 256 ? iters / 5 + 3 : iters;
		double *ms = malloc(n * sizeof *ms);
		for (int it = -2; it < n; it++) {
			int32_t *id = ids->data;
			for (int t = 0; t < T; t++)
				for (int k = 0; k < K; k++) {
					int e, dup;
					do {
						e = (int)(rnd() % E);
						dup = 0;
						for (int j = 0; j < k; j++)
							dup |= id[t * K + j] == e;
					} while (dup);
					id[t * K + k] = e;
				}
			double t0 = now();
			ggml_graph_compute(gf, &plan);
			if (it >= 0)
				ms[it] = (now() - t0) * 1e3;
		}
		qsort(ms, n, sizeof *ms, cmpd);
		printf("%s T %d: median %.3f ms (min %.3f, %d iterations, fresh ids each)\n", name,
		       T, ms[n / 2], ms[0], n);
		fflush(stdout);
		free(ms), free(work);
	}
	ggml_free(ctx);
	return 0;
}
