/* gpu_check.c: the CUDA backend on a real GPU, for run_gpu_checks.sh. `check`
 * runs one spec's generated kernels (NVRTC for sm_80/sm_90 plus PTX, loaded
 * by runtime/cuda_rt.c) against the reference forward and checks batch
 * invariance; `bench` times the layer at several token counts. Exit status:
 * 0 pass (or the spec is not generated for cuda), 1 mismatch, 2 error. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda.h"

#define MAX_SETS 64
#define MAX_T 16

struct opts {
	const char *cmd, *spec;
	const char *sets[MAX_SETS];
	int n_sets;
	size_t tokens[MAX_T];
	int n_tokens;
	int iters;
};

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void diag_print(void *ctx, const char *line)
{
	(void)ctx;
	fprintf(stderr, "%s\n", line);
}

static int parse(int argc, char **argv, struct opts *o)
{
	memset(o, 0, sizeof *o);
	if (argc < 3)
		return -1;
	o->cmd = argv[1];
	o->spec = argv[2];
	for (int i = 3; i < argc; i++) {
		if (!strcmp(argv[i], "--set") && i + 1 < argc && o->n_sets < MAX_SETS) {
			o->sets[o->n_sets++] = argv[++i];
		} else if (!strcmp(argv[i], "--tokens") && i + 1 < argc) {
			char *s = argv[++i], *end;
			while (*s && o->n_tokens < MAX_T) {
				o->tokens[o->n_tokens++] = strtoul(s, &end, 10);
				s = *end == ',' ? end + 1 : end;
				if (end == s && *s)
					return -1;
			}
		} else if (!strcmp(argv[i], "--iters") && i + 1 < argc) {
			o->iters = atoi(argv[++i]);
		} else {
			return -1;
		}
	}
	if (!o->n_tokens) {
		static const size_t def[] = {1, 7, 33, 300};
		for (int i = 0; i < 4; i++)
			o->tokens[o->n_tokens++] = def[i];
	}
	return strcmp(o->cmd, "check") && strcmp(o->cmd, "bench") ? -1 : 0;
}

/* The model's kernels, compiled here the way moegen embeds them. */
struct images {
	struct moe_cuda_image im[3];
	struct moe_nvrtc_out out[2];
	struct moe_cuda_gen gen;
};

static int build_images(const struct moe_desc *d, struct images *ims)
{
	struct moe_plan p;
	struct moe_diag dg = {.sink = diag_print};
	char err[16384], name[300];
	if (moe_cuda_plan_build(d, &p, &dg) != 0)
		return 1;
	char *src;
	size_t len;
	if (moe_cuda_emit_source(&p, &src, &len, err, sizeof err) != 0) {
		fprintf(stderr, "%s\n", err);
		return 2;
	}
	moe_cuda_source_name(d, name, sizeof name);
	static const char *const archs[] = {"sm_80", "sm_90"};
	memset(ims, 0, sizeof *ims);
	int n = 0;
	for (int a = 0; a < 2; a++) {
		double t0 = now();
		if (moe_nvrtc_compile(src, name, archs[a], 1, a == 0, &ims->out[a], err,
				      sizeof err)) {
			fprintf(stderr, "%s\n", err);
			free(src);
			return 2;
		}
		fprintf(stderr, "  NVRTC %s: %.2f s, cubin %zu bytes\n", archs[a], now() - t0,
			ims->out[a].cubin_size);
		ims->im[n++] =
		    (struct moe_cuda_image){archs[a], ims->out[a].cubin, ims->out[a].cubin_size};
		if (a == 0)
			ims->im[n++] = (struct moe_cuda_image){
			    "compute_80", (unsigned char *)ims->out[a].ptx, ims->out[a].ptx_size};
	}
	free(src);
	ims->gen = (struct moe_cuda_gen){MOE_CUDA_ABI,   sizeof *d,   d,      "",
					 "gpu_check.cu", (unsigned)n, ims->im};
	return 0;
}

static float urand(uint64_t i)
{
	return 2.0f * moe_rng_uniform(moe_rng_hash(99, i, 0, 0)) - 1.0f;
}

/* x [T, H] in the activation dtype on the device; xf gets the f32 values. */
static void *upload_x(struct moe_cuda *c, const struct moe_desc *d, size_t T, float *xf)
{
	size_t H = d->hidden, es = d->act_dtype == MOE_DTYPE_BF16 ? 2 : 4;
	uint16_t *xb = malloc(T * H * 2);
	void *dx = NULL;
	char err[1024];
	if (!xb)
		return NULL;
	for (size_t i = 0; i < T * H; i++) {
		xf[i] = urand(i);
		xb[i] = moe_f32_to_bf16(xf[i]);
		if (es == 2)
			xf[i] = moe_bf16_to_f32(xb[i]);
	}
	if (moe_cuda_mem_alloc(c, T * H * es, &dx, err, sizeof err) != MOE_OK ||
	    moe_cuda_memcpy(c, dx, es == 2 ? (void *)xb : (void *)xf, T * H * es, 1, err,
			    sizeof err) != MOE_OK) {
		fprintf(stderr, "%s\n", err);
		moe_cuda_mem_free(c, dx);
		dx = NULL;
	}
	free(xb);
	return dx;
}

static int check_tokens(struct moe_cuda *c, const struct moe_desc *d,
			const struct moe_ref_weights *w, size_t T)
{
	size_t H = d->hidden, W = moe_desc_route_width(d),
	       es = d->act_dtype == MOE_DTYPE_BF16 ? 2 : 4;
	float *x = malloc(T * H * 4), *y = malloc(T * H * 4), *yr = malloc(T * H * 4);
	int32_t *ids = malloc(T * W * 4), *idr = malloc(T * W * 4);
	uint16_t *yb = malloc(T * H * 2), *y1 = malloc(H * 4);
	char err[4096];
	int rc = 2;
	void *dx = NULL, *dy = NULL;
	if (!x || !y || !yr || !ids || !idr || !yb || !y1 || !(dx = upload_x(c, d, T, x)))
		goto out;
	if (moe_cuda_mem_alloc(c, T * H * es, &dy, err, sizeof err) != MOE_OK)
		goto fail;
	struct moe_routing rt = {.expert_ids = ids}, rr = {.expert_ids = idr};
	if (moe_cuda_forward(c, 0, dx, dy, T, &rt, NULL, err, sizeof err) != MOE_OK ||
	    moe_cuda_memcpy(c, es == 2 ? (void *)yb : (void *)y, dy, T * H * es, 0, err,
			    sizeof err) != MOE_OK)
		goto fail;
	if (es == 2)
		for (size_t i = 0; i < T * H; i++)
			y[i] = moe_bf16_to_f32(yb[i]);
	if (moe_ref_forward(d, w, x, yr, T, NULL, &rr, err, sizeof err) != MOE_OK)
		goto fail;
	size_t bad_ids = 0;
	for (size_t i = 0; i < T * W; i++)
		bad_ids += ids[i] != idr[i];
	double ymax = 0, emax = 0;
	for (size_t i = 0; i < T * H; i++) {
		ymax = fmax(ymax, fabs((double)yr[i]));
		emax = fmax(emax, fabs((double)y[i] - yr[i]));
	}
	/* one token alone: bit-identical row (no capacity) */
	int invariant = 1;
	if (d->capacity == MOE_CAPACITY_NONE && T > 1) {
		size_t t = T - 1;
		if (moe_cuda_forward(c, 0, (char *)dx + t * H * es, dy, 1, NULL, NULL, err,
				     sizeof err) != MOE_OK ||
		    moe_cuda_memcpy(c, y1, dy, H * es, 0, err, sizeof err) != MOE_OK)
			goto fail;
		invariant =
		    !memcmp(y1, es == 2 ? (void *)(yb + t * H) : (void *)(y + t * H), H * es);
	}
	double tol = d->weight_dtype == MOE_DTYPE_F32 && es == 4 ? 1e-4 : 2e-2;
	int ok = !bad_ids && emax <= tol * ymax && invariant;
	printf("  T %5zu: %s  ids differ %zu, max err %.2e of %.3g (tol %.0e), batch invariant "
	       "%s\n",
	       T, ok ? "ok  " : "FAIL", bad_ids, ymax > 0 ? emax / ymax : emax, ymax, tol,
	       invariant ? "yes" : "NO");
	rc = ok ? 0 : 1;
	goto out;
fail:
	fprintf(stderr, "  T %zu: %s\n", T, err);
out:
	moe_cuda_mem_free(c, dx);
	moe_cuda_mem_free(c, dy);
	free(x), free(y), free(yr), free(ids), free(idr), free(yb), free(y1);
	return rc;
}

/* FLOPs of one forward and the weight bytes it streams (experts used). */
static void work(const struct moe_desc *d, size_t T, const int64_t *counts, double *flops,
		 double *bytes)
{
	double H = d->hidden, I = d->intermediate, E = d->n_experts, W = moe_desc_route_width(d);
	double Is = moe_desc_shared_width(d), es = d->weight_dtype == MOE_DTYPE_F32 ? 4 : 2;
	double mats = d->kind == MOE_KIND_GLU ? 3 : 2,
	       smats = d->shared_kind == MOE_KIND_GLU ? 3 : 2;
	double used = 0;
	for (uint32_t e = 0; e < d->n_experts; e++)
		used += counts[e] > 0;
	*flops = 2.0 * T * (W * H * I * mats + H * Is * smats + H * E);
	*bytes = used * mats * H * I * es + smats * H * Is * es + E * H * 4;
}

static int bench_tokens(struct moe_cuda *c, const struct moe_desc *d, size_t T, int iters)
{
	size_t H = d->hidden, es = d->act_dtype == MOE_DTYPE_BF16 ? 2 : 4;
	float *x = malloc(T * H * 4);
	int64_t *counts = calloc(d->n_experts, sizeof *counts);
	char err[4096];
	void *dx = NULL, *dy = NULL;
	int rc = 2;
	if (!x || !counts || !(dx = upload_x(c, d, T, x)) ||
	    moe_cuda_mem_alloc(c, T * H * es, &dy, err, sizeof err) != MOE_OK)
		goto out;
	struct moe_routing rt = {.counts = counts};
	if (moe_cuda_forward(c, 0, dx, dy, T, &rt, NULL, err, sizeof err) != MOE_OK)
		goto fail;
	for (int i = 0; i < 3; i++)
		if (moe_cuda_forward(c, 0, dx, dy, T, NULL, NULL, err, sizeof err) != MOE_OK)
			goto fail;
	if (moe_cuda_sync(c, err, sizeof err) != MOE_OK)
		goto fail;
	int n = iters;
	if (n <= 0) { /* about half a second */
		double t0 = now();
		if (moe_cuda_forward(c, 0, dx, dy, T, NULL, NULL, err, sizeof err) != MOE_OK ||
		    moe_cuda_sync(c, err, sizeof err) != MOE_OK)
			goto fail;
		double one = now() - t0;
		n = one > 0.25 ? 2 : (int)(0.5 / (one > 1e-6 ? one : 1e-6));
		n = n > 2000 ? 2000 : n;
	}
	double t0 = now();
	for (int i = 0; i < n; i++)
		if (moe_cuda_forward(c, 0, dx, dy, T, NULL, NULL, err, sizeof err) != MOE_OK)
			goto fail;
	if (moe_cuda_sync(c, err, sizeof err) != MOE_OK)
		goto fail;
	double dt = (now() - t0) / n, flops, bytes;
	work(d, T, counts, &flops, &bytes);
	printf("  T %5zu: %9.1f us  %7.1f TFLOP/s  %7.1f GB/s of weights  (%d iterations)\n", T,
	       dt * 1e6, flops / dt * 1e-12, bytes / dt * 1e-9, n);
	rc = 0;
	goto out;
fail:
	fprintf(stderr, "  T %zu: %s\n", T, err);
out:
	moe_cuda_mem_free(c, dx);
	moe_cuda_mem_free(c, dy);
	free(x), free(counts);
	return rc;
}

int main(int argc, char **argv)
{
	struct opts o;
	if (parse(argc, argv, &o) != 0) {
		fprintf(stderr,
			"usage: gpu_check check|bench SPEC [--set K=V]... [--tokens N,N,...] "
			"[--iters N]\n");
		return 2;
	}
	struct moe_desc *d = calloc(1, sizeof *d);
	struct moe_diag dg = {.sink = diag_print};
	if (!d || moe_front(o.spec, o.sets, o.n_sets, d, &dg) != 0)
		return 2;
	printf("%s %s (hidden %u, %u experts, width %u, route width %u, %s weights)\n", o.cmd,
	       d->name, d->hidden, d->n_experts, d->intermediate, moe_desc_route_width(d),
	       moe_dtype_names[d->weight_dtype]);
	struct images ims;
	int rc = build_images(d, &ims);
	if (rc == 1) {
		printf("  skipped: not generated for target cuda\n");
		free(d);
		return 0;
	}
	if (rc)
		return rc;
	char err[4096];
	struct moe_cuda *c = NULL;
	struct moe_ref_weights w;
	if (moe_cuda_create(&ims.gen, d, NULL, &c, err, sizeof err) != MOE_OK) {
		fprintf(stderr, "%s\n", err);
		return 2;
	}
	printf("  device sm_%d runs the %s image\n", moe_cuda_device_cc(c), moe_cuda_image_arch(c));
	if (moe_ref_weights_alloc(d, &w) != MOE_OK)
		return 2;
	double t0 = now();
	moe_ref_weights_random(d, 1, d->moe_layers[0], &w);
	if (moe_cuda_load_layer(c, 0, &w, err, sizeof err) != MOE_OK) {
		fprintf(stderr, "%s\n", err);
		return 2;
	}
	fprintf(stderr, "  weights generated and packed in %.1f s\n", now() - t0);
	rc = 0;
	for (int i = 0; i < o.n_tokens; i++) {
		int r = !strcmp(o.cmd, "check") ? check_tokens(c, d, &w, o.tokens[i])
						: bench_tokens(c, d, o.tokens[i], o.iters);
		rc = r > rc ? r : rc;
	}
	moe_cuda_destroy(c);
	moe_ref_weights_free(&w);
	for (int a = 0; a < 2; a++)
		moe_nvrtc_out_free(&ims.out[a]);
	free(d);
	return rc;
}
