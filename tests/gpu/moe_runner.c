/* moe_runner.c: runs model.so files built with --target cpu,cuda on a machine
 * that has only the NVIDIA driver. It links nothing of moegen: model.so is
 * opened with dlopen and used through its C ABI (moe.h), and libcuda.so.1
 * (MOE_LIBCUDA overrides the path, as in model.so) is opened for device
 * memory, a stream, events and CUDA graphs.
 *
 *   moe_runner check MODEL.so [--tokens N,N,...] [--seed S] [--csv FILE] [--label L]
 *     the CUDA path against the CPU path of the same library: expert choice
 *     (a differing choice must be a near tie), output error normalized by
 *     the output's scale, every output element written, a bit-identical
 *     rerun, a bit-identical CUDA-graph replay, and batch invariance (three
 *     tokens alone against their rows in the batch; not with capacity or
 *     expert choice, where tokens compete).
 *   moe_runner bench MODEL.so [--tokens N,...] [--copies N] [--csv FILE] [--label L]
 *     time per forward with CUDA events (median of single forwards) and with
 *     CUDA-graph replay, rotating over N model copies (their own random
 *     weights and inputs) so the L2 cache cannot serve repeats.
 *
 * Exit status: 0 pass, 1 mismatch, 2 error. */
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "moe.h"

/* The driver entry points the runner uses (own declarations, as model.so). */
typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext, *CUstream, *CUevent, *CUgraph, *CUgraphExec;
typedef unsigned long long CUdeviceptr;

#define RUN_CU_FUNCS(X)                                                                            \
	X(cuInit, "cuInit", (unsigned flags))                                                      \
	X(cuGetErrorName, "cuGetErrorName", (CUresult e, const char **s))                          \
	X(cuDeviceGet, "cuDeviceGet", (CUdevice * d, int ordinal))                                 \
	X(cuDeviceGetName, "cuDeviceGetName", (char *name, int len, CUdevice d))                   \
	X(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", (CUcontext * c, CUdevice d))       \
	X(cuCtxPushCurrent, "cuCtxPushCurrent_v2", (CUcontext c))                                  \
	X(cuCtxSynchronize, "cuCtxSynchronize", (void))                                            \
	X(cuMemAlloc, "cuMemAlloc_v2", (CUdeviceptr * p, size_t n))                                \
	X(cuMemFree, "cuMemFree_v2", (CUdeviceptr p))                                              \
	X(cuMemcpyHtoD, "cuMemcpyHtoD_v2", (CUdeviceptr dst, const void *src, size_t n))           \
	X(cuMemcpyDtoH, "cuMemcpyDtoH_v2", (void *dst, CUdeviceptr src, size_t n))                 \
	X(cuMemsetD8, "cuMemsetD8_v2", (CUdeviceptr p, unsigned char v, size_t n))                 \
	X(cuStreamCreate, "cuStreamCreate", (CUstream * s, unsigned flags))                        \
	X(cuStreamDestroy, "cuStreamDestroy_v2", (CUstream s))                                     \
	X(cuStreamSynchronize, "cuStreamSynchronize", (CUstream s))                                \
	X(cuEventCreate, "cuEventCreate", (CUevent * e, unsigned flags))                           \
	X(cuEventDestroy, "cuEventDestroy_v2", (CUevent e))                                        \
	X(cuEventRecord, "cuEventRecord", (CUevent e, CUstream s))                                 \
	X(cuEventSynchronize, "cuEventSynchronize", (CUevent e))                                   \
	X(cuEventElapsedTime, "cuEventElapsedTime", (float *ms, CUevent a, CUevent b))             \
	X(cuStreamBeginCapture, "cuStreamBeginCapture_v2", (CUstream s, int mode))                 \
	X(cuStreamEndCapture, "cuStreamEndCapture", (CUstream s, CUgraph * g))                     \
	X(cuGraphInstantiate, "cuGraphInstantiateWithFlags",                                       \
	  (CUgraphExec * e, CUgraph g, unsigned long long flags))                                  \
	X(cuGraphLaunch, "cuGraphLaunch", (CUgraphExec e, CUstream s))                             \
	X(cuGraphExecDestroy, "cuGraphExecDestroy", (CUgraphExec e))                               \
	X(cuGraphDestroy, "cuGraphDestroy", (CUgraph g))

#define CU_FIELD_(f, sym, params) CUresult(*f) params;
static struct {
	RUN_CU_FUNCS(CU_FIELD_)
} cu;
#undef CU_FIELD_

/* The model.so ABI. */
static struct {
	const struct moe_info *(*info)(void);
	enum moe_status (*create)(moe_model **, const struct moe_create_opts *);
	void (*destroy)(moe_model *);
	enum moe_status (*init_random)(moe_model *, uint64_t);
	enum moe_status (*forward)(moe_model *, uint32_t, const void *, void *, size_t,
				   struct moe_routing *, const struct moe_fwd_opts *);
	const char *(*last_error)(void);
	size_t (*describe)(char *, size_t);
} so;

/* The first word after `head` on the description line that starts with it
 * ("experts glu ..." -> "glu"), from moe_describe's text; "" when absent. */
static const char *desc_word(const char *head)
{
	static char text[1 << 16], word[64];
	word[0] = 0;
	if (so.describe(text, sizeof text) >= sizeof text)
		return word;
	size_t n = strlen(head);
	for (const char *l = text; *l;) {
		if (!strncmp(l, head, n) && l[n] == ' ') {
			size_t k = strcspn(l + n + 1, " \n");
			snprintf(word, sizeof word, "%.*s", (int)(k < 63 ? k : 63), l + n + 1);
			return word;
		}
		const char *nl = strchr(l, '\n');
		if (!nl)
			break;
		l = nl + 1;
	}
	return word;
}

static CUstream stream;
static char gpu_name[128] = "?";

#define MAX_T 16

struct opts {
	const char *cmd, *model, *csv, *label;
	size_t tokens[MAX_T];
	int n_tokens, copies;
	uint64_t seed;
};

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int cu_check(CUresult r, const char *what)
{
	if (r == 0)
		return 0;
	const char *name = NULL;
	if (cu.cuGetErrorName(r, &name) != 0)
		name = NULL;
	fprintf(stderr, "moe_runner: %s failed: %s (%d)\n", what, name ? name : "CUDA error", r);
	return -1;
}

static int moe_check(enum moe_status st, const char *what)
{
	if (st == MOE_OK)
		return 0;
	fprintf(stderr, "moe_runner: %s: %s (status %d)\n", what, so.last_error(), (int)st);
	return -1;
}

static int open_model(const char *path)
{
	void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (!h) {
		fprintf(stderr, "moe_runner: %s\n", dlerror());
		return -1;
	}
	*(void **)&so.info = dlsym(h, "moe_info");
	*(void **)&so.create = dlsym(h, "moe_create");
	*(void **)&so.destroy = dlsym(h, "moe_destroy");
	*(void **)&so.init_random = dlsym(h, "moe_init_random");
	*(void **)&so.forward = dlsym(h, "moe_forward");
	*(void **)&so.last_error = dlsym(h, "moe_last_error");
	*(void **)&so.describe = dlsym(h, "moe_describe");
	if (!so.info || !so.create || !so.destroy || !so.init_random || !so.forward ||
	    !so.last_error || !so.describe) {
		fprintf(stderr, "moe_runner: %s lacks the moe_* ABI\n", path);
		return -1;
	}
	return 0;
}

/* The driver, device 0's primary context current on this thread, a stream
 * that synchronizes with the legacy default stream (plain copies). */
static int open_driver(void)
{
	const char *path = getenv("MOE_LIBCUDA");
	void *h = dlopen(path && *path ? path : "libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
	if (!h) {
		fprintf(stderr, "moe_runner: no CUDA driver: %s\n", dlerror());
		return -1;
	}
#define CU_LOAD_(f, sym, params)                                                                   \
	if (!(*(void **)&cu.f = dlsym(h, sym))) {                                                  \
		fprintf(stderr, "moe_runner: the driver lacks %s\n", sym);                         \
		return -1;                                                                         \
	}
	RUN_CU_FUNCS(CU_LOAD_)
#undef CU_LOAD_
	CUdevice dev;
	CUcontext ctx;
	if (cu_check(cu.cuInit(0), "cuInit") || cu_check(cu.cuDeviceGet(&dev, 0), "cuDeviceGet") ||
	    cu_check(cu.cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain") ||
	    cu_check(cu.cuCtxPushCurrent(ctx), "cuCtxPushCurrent") ||
	    cu_check(cu.cuStreamCreate(&stream, 0), "cuStreamCreate"))
		return -1;
	if (cu.cuDeviceGetName(gpu_name, sizeof gpu_name, dev) != 0)
		snprintf(gpu_name, sizeof gpu_name, "?");
	return 0;
}

static uint64_t mix(uint64_t z)
{
	z += 0x9e3779b97f4a7c15ull;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static uint16_t f32_to_bf16(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	if ((u & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t)((u >> 16) | 0x40);
	return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

static float bf16_to_f32(uint16_t b)
{
	uint32_t u = (uint32_t)b << 16;
	float f;
	memcpy(&f, &u, 4);
	return f;
}

/* x[n] uniform in [-1, 1) in the activation dtype (es bytes). */
static void fill_x(void *x, size_t n, size_t es, uint64_t seed)
{
	for (size_t i = 0; i < n; i++) {
		float v = (float)((double)(mix(seed * 0x100000001b3ull + i) >> 11) * 0x1p-52 - 1.0);
		if (es == 2)
			((uint16_t *)x)[i] = f32_to_bf16(v);
		else
			((float *)x)[i] = v;
	}
}

static float get(const void *y, size_t i, size_t es)
{
	return es == 2 ? bf16_to_f32(((const uint16_t *)y)[i]) : ((const float *)y)[i];
}

static FILE *csv_open(const char *path, const char *header)
{
	if (!path)
		return NULL;
	FILE *f = fopen(path, "a");
	if (f && ftell(f) == 0)
		fprintf(f, "%s\n", header);
	return f;
}

/* A forward on the device: x (host) uploaded to dx, y (poisoned: all ones,
 * NaN in f32 and bf16) read back into y. */
static int gpu_forward(moe_model *m, uint32_t layer, CUdeviceptr dx, CUdeviceptr dy, const void *x,
		       void *y, size_t T, size_t row_bytes, struct moe_routing *rt)
{
	if ((x && cu_check(cu.cuMemcpyHtoD(dx, x, T * row_bytes), "cuMemcpyHtoD")) ||
	    cu_check(cu.cuMemsetD8(dy, 0xff, T * row_bytes), "cuMemsetD8") ||
	    cu_check(cu.cuCtxSynchronize(), "cuCtxSynchronize") ||
	    moe_check(
		so.forward(m, layer, (void *)(uintptr_t)dx, (void *)(uintptr_t)dy, T, rt, NULL),
		"moe_forward (cuda)") ||
	    cu_check(cu.cuStreamSynchronize(stream), "the forward (cuStreamSynchronize)") ||
	    cu_check(cu.cuMemcpyDtoH(y, dy, T * row_bytes), "cuMemcpyDtoH"))
		return -1;
	return 0;
}

/* The same forward captured in a CUDA graph and replayed once into dy. */
static int graph_forward(moe_model *m, uint32_t layer, CUdeviceptr dx, CUdeviceptr dy, void *y,
			 size_t T, size_t row_bytes)
{
	CUgraph g = NULL;
	CUgraphExec ge = NULL;
	int rc = -1;
	if (cu_check(cu.cuMemsetD8(dy, 0xff, T * row_bytes), "cuMemsetD8") ||
	    cu_check(cu.cuCtxSynchronize(), "cuCtxSynchronize") ||
	    cu_check(cu.cuStreamBeginCapture(stream, 1), "cuStreamBeginCapture"))
		return -1;
	enum moe_status st =
	    so.forward(m, layer, (void *)(uintptr_t)dx, (void *)(uintptr_t)dy, T, NULL, NULL);
	CUresult r = cu.cuStreamEndCapture(stream, &g);
	if (moe_check(st, "moe_forward (captured)") || cu_check(r, "cuStreamEndCapture") ||
	    cu_check(cu.cuGraphInstantiate(&ge, g, 0), "cuGraphInstantiate") ||
	    cu_check(cu.cuGraphLaunch(ge, stream), "cuGraphLaunch") ||
	    cu_check(cu.cuStreamSynchronize(stream), "the graph replay") ||
	    cu_check(cu.cuMemcpyDtoH(y, dy, T * row_bytes), "cuMemcpyDtoH"))
		goto out;
	rc = 0;
out:
	if (ge)
		cu.cuGraphExecDestroy(ge);
	if (g)
		cu.cuGraphDestroy(g);
	return rc;
}

/* A token whose choice differs is a near tie when the weights, rank by
 * rank, agree: the experts swapped places on (almost) equal scores. */
static int near_tie(const float *wg, const float *wc, size_t W)
{
	float mx = 0.0f;
	for (size_t r = 0; r < W; r++)
		mx = fmaxf(mx, fabsf(wc[r]));
	for (size_t r = 0; r < W; r++)
		if (fabsf(wg[r] - wc[r]) > 1e-3f * mx + 1e-6f)
			return 0;
	return 1;
}

static int check_tokens(const struct opts *o, moe_model *cpu, moe_model *gpu, size_t T, FILE *csv)
{
	const struct moe_info *in = so.info();
	uint32_t layer = in->moe_layers[0];
	size_t H = in->hidden, W = in->route_width, E = in->n_experts;
	size_t es = in->act_dtype == MOE_DTYPE_BF16 ? 2 : 4, rb = H * es;
	void *x = malloc(T * rb), *yc = malloc(T * rb), *yg = malloc(T * rb), *y2 = malloc(T * rb);
	void *yq = malloc(T * rb), *y1 = malloc(rb);
	int32_t *idc = malloc(T * W * 4), *idg = malloc(T * W * 4);
	float *wc = malloc(T * W * 4), *wg = malloc(T * W * 4);
	int64_t *cc = malloc(E * 8), *cg = malloc(E * 8);
	CUdeviceptr dx = 0, dy = 0;
	int rc = 2;
	if (!x || !yc || !yg || !y2 || !yq || !y1 || !idc || !idg || !wc || !wg || !cc || !cg)
		goto out;
	if (cu_check(cu.cuMemAlloc(&dx, T * rb), "cuMemAlloc") ||
	    cu_check(cu.cuMemAlloc(&dy, T * rb), "cuMemAlloc"))
		goto out;
	fill_x(x, T * H, es, o->seed * 1000003u + T);
	struct moe_routing rc_ = {.expert_ids = idc, .weights = wc, .counts = cc};
	struct moe_routing rg = {.expert_ids = idg, .weights = wg, .counts = cg};
	double t0 = now();
	if (moe_check(so.forward(cpu, layer, x, yc, T, &rc_, NULL), "moe_forward (cpu)"))
		goto out;
	double t_cpu = now() - t0;
	if (gpu_forward(gpu, layer, dx, dy, x, yg, T, rb, &rg))
		goto out;
	/* expert choice */
	size_t bad_tok = 0, ties = 0, unwritten = 0;
	uint8_t *skip = calloc(T, 1);
	if (!skip)
		goto out;
	for (size_t t = 0; t < T; t++) {
		if (!memcmp(idc + t * W, idg + t * W, W * 4))
			continue;
		skip[t] = 1;
		if (near_tie(wg + t * W, wc + t * W, W))
			ties++;
		else
			bad_tok++;
	}
	int counts_eq = !memcmp(cc, cg, E * 8);
	/* output, over the tokens that chose the same experts */
	double ymax = 0.0, emax = 0.0, se = 0.0, sr = 0.0;
	for (size_t t = 0; t < T; t++)
		for (size_t j = 0; j < H; j++) {
			double a = get(yc, t * H + j, es), b = get(yg, t * H + j, es);
			unwritten += !isfinite(b);
			if (skip[t] || !isfinite(b))
				continue;
			ymax = fmax(ymax, fabs(a));
			emax = fmax(emax, fabs(b - a));
			se += (b - a) * (b - a);
			sr += a * a;
		}
	free(skip);
	double rel_max = ymax > 0 ? emax / ymax : emax, rel_l2 = sr > 0 ? sqrt(se / sr) : sqrt(se);
	int f32 = in->weight_dtype == MOE_DTYPE_F32 && es == 4;
	double tol = f32 ? 1e-4 : 2e-2;
	/* rerun and graph replay: bit for bit */
	t0 = now();
	if (gpu_forward(gpu, layer, dx, dy, NULL, y2, T, rb, NULL))
		goto out;
	double t_gpu = now() - t0;
	int rerun = !memcmp(yg, y2, T * rb);
	if (graph_forward(gpu, layer, dx, dy, yq, T, rb))
		goto out;
	int graph = !memcmp(yg, yq, T * rb);
	/* batch invariance: first, middle and last token alone */
	int invariant = -1; /* not checked */
	/* tokens compete for capacity and for expert choice's slots: no invariance there */
	if (!strcmp(desc_word("capacity"), "none") &&
	    strcmp(desc_word("router"), "expert_choice") && T > 1) {
		size_t pick[3] = {0, T / 2, T - 1};
		invariant = 1;
		for (int i = 0; i < 3; i++) {
			if (gpu_forward(gpu, layer, dx, dy, (char *)x + pick[i] * rb, y1, 1, rb,
					NULL))
				goto out;
			invariant &= !memcmp(y1, (char *)yg + pick[i] * rb, rb);
		}
	}
	int ok = !bad_tok && !unwritten && (counts_eq || ties) && rel_max <= tol && rerun &&
		 graph && invariant != 0 && ymax > 0;
	printf("  T %5zu: %s ids: %zu tokens differ (%zu near ties), counts %s, max err %.2e of "
	       "%.3g (tol %.0e), rel L2 %.2e, unwritten %zu, rerun %s, graph %s, batch invariant "
	       "%s  [cpu %.3f s, gpu %.4f s]\n",
	       T, ok ? "ok  " : "FAIL", bad_tok + ties, ties, counts_eq ? "equal" : "differ",
	       rel_max, ymax, tol, rel_l2, unwritten, rerun ? "identical" : "DIFFERS",
	       graph ? "identical" : "DIFFERS",
	       invariant < 0 ? "n/a"
	       : invariant   ? "yes"
			     : "NO",
	       t_cpu, t_gpu);
	if (csv)
		fprintf(csv, "%s,%s,%zu,%zu,%zu,%d,%.3e,%.3e,%.0e,%zu,%d,%d,%d,%s\n", o->label,
			in->name, T, bad_tok + ties, ties, counts_eq, rel_max, rel_l2, tol,
			unwritten, rerun, graph, invariant, ok ? "ok" : "FAIL");
	rc = ok ? 0 : 1;
out:
	if (dx)
		cu.cuMemFree(dx);
	if (dy)
		cu.cuMemFree(dy);
	free(x), free(yc), free(yg), free(y2), free(yq), free(y1), free(idc), free(idg);
	free(wc), free(wg), free(cc), free(cg);
	if (rc == 2)
		printf("  T %5zu: ERROR\n", T);
	return rc;
}

/* moe_init_random of several models at once, one thread each: generating
 * full-size random weights is single-threaded host work per model. */
struct init_job {
	moe_model *m;
	uint64_t seed;
	enum moe_status st;
	char err[512];
};

static void *init_one(void *p)
{
	struct init_job *j = p;
	j->st = so.init_random(j->m, j->seed);
	if (j->st != MOE_OK)
		snprintf(j->err, sizeof j->err, "%s", so.last_error());
	return NULL;
}

static int init_models(moe_model **ms, const uint64_t *seeds, int n)
{
	struct init_job *jobs = calloc((size_t)n, sizeof *jobs);
	pthread_t *th = calloc((size_t)n, sizeof *th);
	int rc = 0;
	if (!jobs || !th) {
		free(jobs), free(th);
		return -1;
	}
	for (int i = 0; i < n; i++) {
		jobs[i] = (struct init_job){.m = ms[i], .seed = seeds[i]};
		if (pthread_create(&th[i], NULL, init_one, &jobs[i]) != 0) {
			init_one(&jobs[i]);
			th[i] = 0;
		}
	}
	for (int i = 0; i < n; i++) {
		if (th[i])
			pthread_join(th[i], NULL);
		if (jobs[i].st != MOE_OK) {
			fprintf(stderr, "moe_runner: moe_init_random: %s (status %d)\n",
				jobs[i].err, (int)jobs[i].st);
			rc = -1;
		}
	}
	free(jobs), free(th);
	return rc;
}

static int cmd_check(const struct opts *o)
{
	struct moe_create_opts co = {.threads = 0, .device = MOE_DEVICE_CPU};
	struct moe_create_opts go = {.device = MOE_DEVICE_CUDA, .stream = stream};
	moe_model *cpu = NULL, *gpu = NULL;
	double t0 = now();
	if (moe_check(so.create(&cpu, &co), "moe_create (cpu)") ||
	    moe_check(so.create(&gpu, &go), "moe_create (cuda)")) {
		so.destroy(cpu);
		return 2;
	}
	moe_model *both[2] = {cpu, gpu};
	uint64_t seeds[2] = {o->seed, o->seed};
	if (init_models(both, seeds, 2)) {
		so.destroy(cpu);
		so.destroy(gpu);
		return 2;
	}
	fprintf(stderr, "  two models created and initialized (in parallel) in %.1f s\n",
		now() - t0);
	FILE *csv = csv_open(o->csv, "label,spec,T,ids_differ,near_ties,counts_equal,max_err,"
				     "rel_l2,tol,unwritten,rerun_identical,graph_identical,"
				     "batch_invariant,status");
	int rc = 0;
	for (int i = 0; i < o->n_tokens; i++) {
		int r = check_tokens(o, cpu, gpu, o->tokens[i], csv);
		rc = r > rc ? r : rc;
	}
	if (csv)
		fclose(csv);
	so.destroy(cpu);
	so.destroy(gpu);
	return rc;
}

static int cmp_float(const void *a, const void *b)
{
	float x = *(const float *)a, y = *(const float *)b;
	return x < y ? -1 : x > y;
}

static float median(float *v, size_t n)
{
	qsort(v, n, sizeof *v, cmp_float);
	return n % 2 ? v[n / 2] : 0.5f * (v[n / 2 - 1] + v[n / 2]);
}

/* FLOPs of one forward, and the bytes it must move: the weights of the
 * experts it uses (counts), the shared FFN, the f32 router, x and y. */
static void work(const struct moe_info *in, size_t T, const int64_t *counts, double *flops,
		 double *bytes)
{
	double H = in->hidden, I = in->intermediate, E = in->n_experts, W = in->route_width;
	double Is = (double)in->n_shared_experts * in->shared_intermediate;
	double es = in->weight_dtype == MOE_DTYPE_F32 ? 4 : 2;
	double aes = in->act_dtype == MOE_DTYPE_BF16 ? 2 : 4;
	double mats = strcmp(desc_word("experts"), "glu") ? 2 : 3;
	double smats = strcmp(desc_word("shared"), "glu") ? 2 : 3;
	double used = 0;
	for (uint32_t e = 0; e < in->n_experts; e++)
		used += counts[e] > 0;
	*flops = 2.0 * (double)T * (W * H * I * mats + H * Is * smats + H * E);
	*bytes =
	    used * mats * H * I * es + smats * H * Is * es + E * H * 4 + 2.0 * (double)T * H * aes;
}

static int bench_tokens(const struct opts *o, moe_model **ms, int n, CUdeviceptr *dx,
			CUdeviceptr *dy, size_t T, FILE *csv)
{
	const struct moe_info *in = so.info();
	uint32_t layer = in->moe_layers[0];
	size_t E = in->n_experts;
	int64_t *counts = malloc(E * 8);
	double flops = 0, bytes = 0;
	CUevent ev[2001];
	int n_ev = 0, rc = 2;
	CUgraph g = NULL;
	CUgraphExec ge = NULL;
	float *ms_ev = malloc(2000 * sizeof *ms_ev);
	if (!counts || !ms_ev)
		goto out;
	/* routing of each copy (bytes it reads), then warm-up */
	for (int c = 0; c < n; c++) {
		struct moe_routing rt = {.counts = counts};
		double f, b;
		if (moe_check(so.forward(ms[c], layer, (void *)(uintptr_t)dx[c],
					 (void *)(uintptr_t)dy[c], T, &rt, NULL),
			      "moe_forward"))
			goto out;
		work(in, T, counts, &f, &b);
		flops += f / n, bytes += b / n;
	}
#define FWD(c)                                                                                     \
	so.forward(ms[(c) % n], layer, (void *)(uintptr_t)dx[(c) % n],                             \
		   (void *)(uintptr_t)dy[(c) % n], T, NULL, NULL)
	double t0 = now();
	for (int c = 0; c < 2 * n; c++)
		if (moe_check(FWD(c), "moe_forward"))
			goto out;
	if (cu_check(cu.cuStreamSynchronize(stream), "warm-up"))
		goto out;
	double one = (now() - t0) / (2 * n);
	int reps = (int)(0.2 / (one > 1e-6 ? one : 1e-6));
	reps = reps < 3 * n ? 3 * n : reps > 2000 ? 2000 : reps;
	/* events between single forwards, rotating copies */
	for (n_ev = 0; n_ev <= reps; n_ev++)
		if (cu_check(cu.cuEventCreate(&ev[n_ev], 0), "cuEventCreate"))
			goto out;
	for (int i = 0; i < reps; i++)
		if (cu_check(cu.cuEventRecord(ev[i], stream), "cuEventRecord") ||
		    moe_check(FWD(i), "moe_forward"))
			goto out;
	if (cu_check(cu.cuEventRecord(ev[reps], stream), "cuEventRecord") ||
	    cu_check(cu.cuEventSynchronize(ev[reps]), "cuEventSynchronize"))
		goto out;
	for (int i = 0; i < reps; i++)
		if (cu_check(cu.cuEventElapsedTime(&ms_ev[i], ev[i], ev[i + 1]), "elapsed"))
			goto out;
	float t_ev = median(ms_ev, (size_t)reps) * 1e-3f;
	/* a graph of one forward per copy, replayed */
	if (cu_check(cu.cuStreamBeginCapture(stream, 1), "cuStreamBeginCapture"))
		goto out;
	enum moe_status st = MOE_OK;
	for (int c = 0; c < n && st == MOE_OK; c++)
		st = FWD(c);
	CUresult r = cu.cuStreamEndCapture(stream, &g);
	if (moe_check(st, "moe_forward (captured)") || cu_check(r, "cuStreamEndCapture") ||
	    cu_check(cu.cuGraphInstantiate(&ge, g, 0), "cuGraphInstantiate") ||
	    cu_check(cu.cuGraphLaunch(ge, stream), "cuGraphLaunch") ||
	    cu_check(cu.cuStreamSynchronize(stream), "graph warm-up"))
		goto out;
	int greps = reps / n < 3 ? 3 : reps / n;
	for (int i = 0; i < greps; i++)
		if (cu_check(cu.cuEventRecord(ev[i], stream), "cuEventRecord") ||
		    cu_check(cu.cuGraphLaunch(ge, stream), "cuGraphLaunch"))
			goto out;
	if (cu_check(cu.cuEventRecord(ev[greps], stream), "cuEventRecord") ||
	    cu_check(cu.cuEventSynchronize(ev[greps]), "cuEventSynchronize"))
		goto out;
	for (int i = 0; i < greps; i++)
		if (cu_check(cu.cuEventElapsedTime(&ms_ev[i], ev[i], ev[i + 1]), "elapsed"))
			goto out;
	float t_gr = median(ms_ev, (size_t)greps) * 1e-3f / (float)n;
#undef FWD
	double t_best = t_gr < t_ev ? t_gr : t_ev;
	printf("  T %5zu: events %9.1f us, graph %9.1f us  %7.1f TFLOP/s  %7.1f GB/s  (%.1f MB "
	       "moved, %d copies, %d+%d forwards)\n",
	       T, t_ev * 1e6, t_gr * 1e6, flops / t_best * 1e-12, bytes / t_best * 1e-9,
	       bytes * 1e-6, n, reps, greps * n);
	if (csv)
		fprintf(csv, "%s,%s,%s,%zu,%d,%.2f,%.2f,%.4e,%.4e,%.2f,%.1f\n", o->label, in->name,
			gpu_name, T, n, t_ev * 1e6, t_gr * 1e6, flops, bytes,
			flops / t_best * 1e-12, bytes / t_best * 1e-9);
	rc = 0;
out:
	for (int i = 0; i < n_ev; i++)
		cu.cuEventDestroy(ev[i]);
	if (ge)
		cu.cuGraphExecDestroy(ge);
	if (g)
		cu.cuGraphDestroy(g);
	free(counts), free(ms_ev);
	if (rc)
		printf("  T %5zu: ERROR\n", T);
	return rc;
}

static int cmd_bench(const struct opts *o)
{
	const struct moe_info *in = so.info();
	int n = o->copies > 0 ? o->copies : 1;
	size_t Tmax = 0, es = in->act_dtype == MOE_DTYPE_BF16 ? 2 : 4, rb = in->hidden * es;
	for (int i = 0; i < o->n_tokens; i++)
		Tmax = o->tokens[i] > Tmax ? o->tokens[i] : Tmax;
	moe_model **ms = calloc((size_t)n, sizeof *ms);
	CUdeviceptr *dx = calloc((size_t)n, sizeof *dx), *dy = calloc((size_t)n, sizeof *dy);
	void *x = malloc(Tmax * rb);
	int rc = 2;
	if (!ms || !dx || !dy || !x)
		goto out;
	double t0 = now();
	struct moe_create_opts go = {.device = MOE_DEVICE_CUDA, .stream = stream};
	uint64_t *seeds = calloc((size_t)n, sizeof *seeds);
	if (!seeds)
		goto out;
	for (int c = 0; c < n; c++) {
		seeds[c] = o->seed + (uint64_t)c;
		if (moe_check(so.create(&ms[c], &go), "moe_create (cuda)")) {
			free(seeds);
			goto out;
		}
	}
	int bad = init_models(ms, seeds, n);
	free(seeds);
	if (bad)
		goto out;
	for (int c = 0; c < n; c++) {
		if (cu_check(cu.cuMemAlloc(&dx[c], Tmax * rb), "cuMemAlloc") ||
		    cu_check(cu.cuMemAlloc(&dy[c], Tmax * rb), "cuMemAlloc"))
			goto out;
		fill_x(x, Tmax * in->hidden, es, o->seed * 7919u + (uint64_t)c);
		if (cu_check(cu.cuMemcpyHtoD(dx[c], x, Tmax * rb), "cuMemcpyHtoD"))
			goto out;
	}
	fprintf(stderr, "  %d copies created and initialized (in parallel) in %.1f s\n", n,
		now() - t0);
	FILE *csv = csv_open(o->csv, "label,spec,gpu,T,copies,events_us,graph_us,flops,bytes,"
				     "tflops,gbps");
	rc = 0;
	for (int i = 0; i < o->n_tokens; i++) {
		int r = bench_tokens(o, ms, n, dx, dy, o->tokens[i], csv);
		rc = r > rc ? r : rc;
	}
	if (csv)
		fclose(csv);
out:
	for (int c = 0; ms && c < n; c++) {
		so.destroy(ms[c]);
		if (dx[c])
			cu.cuMemFree(dx[c]);
		if (dy[c])
			cu.cuMemFree(dy[c]);
	}
	free(ms), free(dx), free(dy), free(x);
	return rc;
}

static int parse(int argc, char **argv, struct opts *o)
{
	memset(o, 0, sizeof *o);
	o->seed = 1;
	o->label = "";
	if (argc < 3)
		return -1;
	o->cmd = argv[1];
	o->model = argv[2];
	for (int i = 3; i < argc; i++) {
		if (i + 1 >= argc)
			return -1;
		if (!strcmp(argv[i], "--tokens")) {
			char *s = argv[++i], *end;
			while (*s && o->n_tokens < MAX_T) {
				unsigned long long v = strtoull(s, &end, 10);
				if (end == s || !v)
					return -1;
				o->tokens[o->n_tokens++] = (size_t)v;
				s = *end == ',' ? end + 1 : end;
			}
		} else if (!strcmp(argv[i], "--seed")) {
			o->seed = strtoull(argv[++i], NULL, 10);
		} else if (!strcmp(argv[i], "--copies")) {
			o->copies = atoi(argv[++i]);
		} else if (!strcmp(argv[i], "--csv")) {
			o->csv = argv[++i];
		} else if (!strcmp(argv[i], "--label")) {
			o->label = argv[++i];
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

int main(int argc, char **argv)
{
	struct opts o;
	if (parse(argc, argv, &o) != 0) {
		fprintf(stderr,
			"usage: moe_runner check|bench MODEL.so [--tokens N,N,...] [--seed S] "
			"[--copies N] [--csv FILE] [--label L]\n");
		return 2;
	}
	if (open_model(o.model) || open_driver())
		return 2;
	const struct moe_info *in = so.info();
	if (in->abi_version != MOE_ABI_VERSION || !(in->targets & (1u << MOE_DEVICE_CUDA))) {
		fprintf(stderr, "moe_runner: %s: ABI %u (want %d), targets 0x%x: no CUDA kernels\n",
			o.model, in->abi_version, MOE_ABI_VERSION, in->targets);
		return 2;
	}
	if (!strcmp(o.cmd, "check") && !(in->targets & (1u << MOE_DEVICE_CPU))) {
		fprintf(stderr,
			"moe_runner: check needs a model.so built with --target cpu,cuda\n");
		return 2;
	}
	printf("%s %s on %s (hidden %u, %u experts, width %u, top %u, %s weights, %s "
	       "activations)\n",
	       o.cmd, in->name, gpu_name, in->hidden, in->n_experts, in->intermediate, in->top_k,
	       in->weight_dtype == MOE_DTYPE_F32    ? "f32"
	       : in->weight_dtype == MOE_DTYPE_BF16 ? "bf16"
						    : "16-bit",
	       in->act_dtype == MOE_DTYPE_BF16 ? "bf16" : "f32");
	fflush(stdout);
	int rc = !strcmp(o.cmd, "check") ? cmd_check(&o) : cmd_bench(&o);
	cu.cuStreamDestroy(stream);
	return rc;
}
