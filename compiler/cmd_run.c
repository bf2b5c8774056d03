/* cmd_run.c: `moegen run MODEL.so`: open a built model through its public ABI
 * (dlopen + moe.h), feed it seeded random tokens, time the forward pass and,
 * with --check, compare it with the reference forward pass on the same
 * weights. */
#include "backend.h"
#include "gguf.h"

#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "moe.h"
#ifdef MOE_HAVE_MPI
#include "moe_ep.h"
#include "slowlink.h"
#endif

/* The entry points of a model.so. */
struct moe_api {
	void *dl;
	const struct moe_info *(*info)(void);
	enum moe_status (*create)(moe_model **, const struct moe_create_opts *);
	void (*destroy)(moe_model *);
	enum moe_status (*load)(moe_model *, const char *const *, size_t);
	enum moe_status (*load_gguf)(moe_model *, const char *);
	enum moe_status (*init_random)(moe_model *, uint64_t);
	enum moe_status (*forward)(moe_model *, uint32_t, const void *, void *, size_t,
				   struct moe_routing *, const struct moe_fwd_opts *);
	const char *(*last_error)(void);
	size_t (*describe)(char *, size_t);
	enum moe_status (*route)(moe_model *, uint32_t, const void *, size_t, int32_t *, float *,
				 const struct moe_fwd_opts *);
	enum moe_status (*experts)(moe_model *, uint32_t, const float *, size_t, const int64_t *,
				   const float *, float *);
	enum moe_status (*combine)(moe_model *, uint32_t, const void *, size_t, const int32_t *,
				   const float *, const float *, const int64_t *, void *);
	enum moe_status (*route_stats)(moe_model *, uint32_t, const void *, size_t, int32_t *,
				       float *, const struct moe_fwd_opts *,
				       struct moe_route_sums *);
	enum moe_status (*from_sums)(moe_model *, uint32_t, const struct moe_route_sums *,
				     struct moe_routing *);
};

struct msg {
	char *buf;
	size_t cap;
};

/* The diagnostic as the message, without its "moegen: error: " prefix. */
static void keep_msg(void *ctx, const char *line)
{
	struct msg *m = ctx;
	static const char pre[] = "moegen: error: ";
	if (!strncmp(line, pre, sizeof pre - 1))
		line += sizeof pre - 1;
	snprintf(m->buf, m->cap, "%s", line);
}

static int api_open(const char *path, struct moe_api *a, char *err, size_t cap)
{
	char p[4096];
	memset(a, 0, sizeof *a);
	/* dlopen would block on a FIFO: only a regular file is opened */
	struct msg m = {err, cap};
	struct moe_diag d = {.sink = keep_msg, .ctx = &m};
	int fd = moe_input_open(path, &d);
	if (fd < 0)
		return -1;
	close(fd);
	/* a bare name would be searched on the library path */
	snprintf(p, sizeof p, "%s%s", strchr(path, '/') ? "" : "./", path);
	a->dl = dlopen(p, RTLD_NOW | RTLD_LOCAL);
	if (!a->dl) {
		snprintf(err, cap, "cannot open '%s': %s", path, dlerror());
		return -1;
	}
#define SYM(field, name)                                                                           \
	do {                                                                                       \
		*(void **)&a->field = dlsym(a->dl, name);                                          \
		if (!a->field) {                                                                   \
			snprintf(err, cap, "'%s' is not a moegen model: symbol %s is missing",     \
				 path, name);                                                      \
			dlclose(a->dl);                                                            \
			a->dl = NULL;                                                              \
			return -1;                                                                 \
		}                                                                                  \
	} while (0)
	SYM(info, "moe_info");
	SYM(create, "moe_create");
	SYM(destroy, "moe_destroy");
	SYM(load, "moe_load_safetensors");
	SYM(init_random, "moe_init_random");
	SYM(forward, "moe_forward");
	SYM(last_error, "moe_last_error");
	SYM(describe, "moe_describe");
#undef SYM
	/* only --weights FILE.gguf needs it */
	*(void **)&a->load_gguf = dlsym(a->dl, "moe_load_gguf");
	/* the staged calls: only --ep needs them */
	*(void **)&a->route = dlsym(a->dl, "moe_route");
	*(void **)&a->experts = dlsym(a->dl, "moe_experts");
	*(void **)&a->combine = dlsym(a->dl, "moe_combine");
	*(void **)&a->route_stats = dlsym(a->dl, "moe_route_stats");
	*(void **)&a->from_sums = dlsym(a->dl, "moe_routing_from_sums");
	const struct moe_info *in = a->info();
	if (in->abi_version != MOE_ABI_VERSION) {
		snprintf(err, cap, "'%s' has ABI version %u, this moegen speaks %u", path,
			 in->abi_version, MOE_ABI_VERSION);
		dlclose(a->dl);
		a->dl = NULL;
		return -1;
	}
	return 0;
}

/* The model's full description, read back from its text (moe_describe). The
 * text's hash must be the spec hash: then nothing was lost on the way. */
static struct moe_desc *api_desc(const struct moe_api *a, const char *path, char *err, size_t cap)
{
	size_t n = a->describe(NULL, 0);
	char *text = malloc(n + 1);
	struct moe_desc *d = malloc(sizeof *d);
	char perr[512] = "its length changed between two calls", hash[33];
	if (!text || !d) {
		snprintf(err, cap, "out of memory");
	} else if (a->describe(text, n + 1) != n || moe_desc_parse(text, d, perr, sizeof perr)) {
		snprintf(err, cap, "'%s': its description does not read back: %s", path, perr);
	} else {
		moe_desc_hash(d, hash);
		if (strcmp(hash, a->info()->spec_hash) == 0) {
			free(text);
			return d;
		}
		snprintf(err, cap, "'%s': its description reads back with hash %s, not %s", path,
			 hash, a->info()->spec_hash);
	}
	free(text);
	free(d);
	return NULL;
}

static void usage(FILE *f)
{
	fprintf(f, "usage: moegen run MODEL.so [--weights FILE... | --random SEED] [--tokens N]\n"
		   "                  [--threads N] [--layer L] [--layers A:B] [--seed S]\n"
		   "                  [--reps N] [--check] [--ep [--chunks N]]\n"
		   "Run one MoE layer of a built model on seeded random tokens and time it.\n"
		   "  --weights FILE...  safetensors files (or a .index.json), or one GGUF\n"
		   "                     file, to load\n"
		   "  --random SEED      deterministic random weights (default 1)\n"
		   "  --tokens N         tokens per forward (default 16)\n"
		   "  --threads N        worker threads (default: all cores)\n"
		   "  --layer L          model layer (default: the first MoE layer held)\n"
		   "  --layers A:B       hold (load) only model layers [A, B) (a pipeline\n"
		   "                     stage); the checkpoint needs no other layer\n"
		   "                     (default: every layer with --weights, the run\n"
		   "                     layer alone with --random)\n"
		   "  --seed S           input seed (default 1)\n"
		   "  --reps N           forward passes to time (default 3)\n"
		   "  --check            compare with the reference forward pass (random\n"
		   "                     weights only); exit 5 on mismatch\n"
		   "  --ep               expert parallelism: run under mpirun -np P; each rank\n"
		   "                     holds E/P experts and N/P of the tokens; with --check,\n"
		   "                     rank 0 compares the output with one process's forward\n"
		   "                     bit for bit and the bytes exchanged with the routing\n"
		   "  --chunks N         --ep: token chunks in flight (default 4)\n");
}

static int parse_u64(const char *s, uint64_t *out)
{
	char *end;
	if (!s || !*s || *s == '-')
		return -1;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || *end)
		return -1;
	*out = v;
	return 0;
}

/* The process's resident set in bytes (VmRSS), or -1 where it cannot be read. */
static double rss_bytes(void)
{
	FILE *f = fopen("/proc/self/status", "r");
	char line[256];
	double kb = -1;
	if (!f)
		return -1;
	while (fgets(line, sizeof line, f))
		if (sscanf(line, "VmRSS: %lf kB", &kb) == 1)
			break;
	fclose(f);
	return kb < 0 ? -1 : kb * 1024;
}

/* Parameters of the MoE layers a run holds (router, routed and shared
 * experts) in model layers [begin, end) (end 0: all). */
static double moe_params(const struct moe_info *in, uint32_t begin, uint32_t end)
{
	double H = in->hidden, E = in->n_experts, I = in->intermediate;
	double Is = (double)in->n_shared_experts * in->shared_intermediate;
	double n = 0;
	for (uint32_t i = 0; i < in->n_moe_layers; i++)
		n += in->moe_layers[i] >= begin && (!end || in->moe_layers[i] < end);
	return n * (E * H + E * 3 * H * I + 3 * H * Is);
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Compare the expert sets of two routings, token by token. */
static size_t routing_mismatches(const int32_t *a, const int32_t *b, size_t T, size_t W)
{
	size_t bad = 0;
	for (size_t t = 0; t < T; t++) {
		int same = 1;
		for (size_t j = 0; j < W && same; j++) {
			int found = 0;
			for (size_t i = 0; i < W; i++)
				found |= a[t * W + j] == b[t * W + i];
			same = found;
		}
		bad += !same;
	}
	return bad;
}

struct run_opts {
	const char *model;
	const char **weights;
	size_t n_weights;
	uint64_t seed_w, seed_x, tokens, threads, layer, reps, chunks;
	uint32_t layer_begin, layer_end; /* --layers: [begin, end); end 0: all */
	int have_layer, check, ep;
};

/* --layer, or the first MoE layer the model holds (of --layers). */
/* The weights of --weights: one GGUF file (told by its magic), or
 * safetensors files. */
static enum moe_status api_load(const struct moe_api *a, moe_model *m, const struct run_opts *o)
{
	if (o->n_weights == 1 && moe_gguf_is_gguf(o->weights[0]) == 1) {
		if (!a->load_gguf) {
			fprintf(stderr, "moegen: error: the model has no moe_load_gguf\n");
			return MOE_ERR_UNSUPPORTED;
		}
		return a->load_gguf(m, o->weights[0]);
	}
	return a->load(m, o->weights, o->n_weights);
}

static uint32_t first_layer(const struct run_opts *o, const struct moe_info *in)
{
	if (o->have_layer)
		return (uint32_t)o->layer;
	for (uint32_t i = 0; i < in->n_moe_layers; i++)
		if (in->moe_layers[i] >= o->layer_begin &&
		    (!o->layer_end || in->moe_layers[i] < o->layer_end))
			return in->moe_layers[i];
	return in->n_moe_layers ? in->moe_layers[0] : 0;
}

/* The layers a run holds: --layers; or, with --random, the layer it runs
 * alone (random weights for layers nothing runs would only take time and
 * memory); or, with --weights, every layer (the whole checkpoint loads). */
static void held_layers(const struct run_opts *o, uint32_t layer, uint32_t *begin, uint32_t *end)
{
	*begin = o->layer_begin;
	*end = o->layer_end;
	if (!o->layer_end && !o->n_weights && layer < UINT32_MAX) {
		*begin = layer;
		*end = layer + 1;
	}
}

/* "A:B" -> [A, B), both below 2^32, A < B. */
static int parse_range(const char *s, uint32_t *a, uint32_t *b)
{
	char buf[64];
	uint64_t x, y;
	const char *colon = s ? strchr(s, ':') : NULL;
	if (!colon || (size_t)(colon - s) >= sizeof buf)
		return -1;
	memcpy(buf, s, (size_t)(colon - s));
	buf[colon - s] = 0;
	if (parse_u64(buf, &x) || parse_u64(colon + 1, &y) || x >= y || y > UINT32_MAX)
		return -1;
	*a = (uint32_t)x;
	*b = (uint32_t)y;
	return 0;
}

/* The seeded input of do_run: uniform in [-1, 1), bf16 models get it rounded. */
static void fill_input(uint64_t seed, size_t T, size_t H, int bf16, float *x, uint16_t *xb)
{
	for (size_t i = 0; i < T * H; i++) {
		x[i] = 2.0f * moe_rng_uniform(moe_rng_hash(seed, 0x78, i / H, i % H)) - 1.0f;
		if (bf16) {
			xb[i] = moe_f32_to_bf16(x[i]);
			x[i] = moe_bf16_to_f32(xb[i]);
		}
	}
}

static int do_run(const struct run_opts *o)
{
	struct moe_api a;
	char err[4096];
	if (api_open(o->model, &a, err, sizeof err) != 0) {
		fprintf(stderr, "moegen: error: %s\n", err);
		return MOE_EXIT_IO;
	}
	const struct moe_info *in = a.info();
	struct moe_desc *d = api_desc(&a, o->model, err, sizeof err);
	if (!d) {
		fprintf(stderr, "moegen: error: %s\n", err);
		dlclose(a.dl);
		return MOE_EXIT_IO;
	}
	int rc = MOE_EXIT_BACKEND;
	moe_model *m = NULL;
	float *x = NULL, *y = NULL, *yr = NULL, *mag = NULL;
	uint16_t *xb = NULL, *yb = NULL;
	int32_t *ids = NULL, *ids_ref = NULL;
	int64_t *counts = NULL;
	struct moe_ref_weights w = {0};
	uint32_t layer = first_layer(o, in), lb, le;
	size_t T = o->tokens, H = in->hidden, W = in->route_width;
	int bf16 = in->act_dtype == MOE_DTYPE_BF16;

	held_layers(o, layer, &lb, &le);
	struct moe_create_opts co = {.threads = (uint32_t)o->threads,
				     .device = MOE_DEVICE_CPU,
				     .layer_begin = lb,
				     .layer_end = le};
	if (a.create(&m, &co) != MOE_OK) {
		fprintf(stderr, "moegen: error: %s\n", a.last_error());
		goto out;
	}
	double rss0 = rss_bytes(), t0 = now_s();
	enum moe_status st = o->n_weights ? api_load(&a, m, o) : a.init_random(m, o->seed_w);
	if (st != MOE_OK) {
		fprintf(stderr, "moegen: error: %s\n", a.last_error());
		rc = st == MOE_ERR_IO ? MOE_EXIT_IO : MOE_EXIT_BACKEND;
		goto out;
	}
	double t_load = now_s() - t0, rss1 = rss_bytes();
	x = malloc((T ? T : 1) * H * sizeof *x);
	y = malloc((T ? T : 1) * H * sizeof *y);
	ids = malloc((T ? T : 1) * (W ? W : 1) * sizeof *ids);
	counts = calloc(in->n_experts, sizeof *counts);
	xb = malloc((T ? T : 1) * H * sizeof *xb);
	yb = malloc((T ? T : 1) * H * sizeof *yb);
	if (!x || !y || !ids || !counts || !xb || !yb) {
		fprintf(stderr, "moegen: error: out of memory\n");
		goto out;
	}
	/* inputs uniform in [-1, 1), seeded; bf16 models get them rounded */
	fill_input(o->seed_x, T, H, bf16, x, xb);
	struct moe_routing rt = {.expert_ids = ids, .counts = counts};
	double best = INFINITY;
	for (uint64_t r = 0; r < (o->reps ? o->reps : 1); r++) {
		t0 = now_s();
		st = a.forward(m, layer, bf16 ? (const void *)xb : x, bf16 ? (void *)yb : y, T, &rt,
			       NULL);
		double dt = now_s() - t0;
		if (st != MOE_OK) {
			fprintf(stderr, "moegen: error: %s\n", a.last_error());
			goto out;
		}
		if (dt < best)
			best = dt;
	}
	if (bf16)
		for (size_t i = 0; i < T * H; i++)
			y[i] = moe_bf16_to_f32(yb[i]);
	double amax = 0.0, sum = 0.0;
	for (size_t i = 0; i < T * H; i++) {
		sum += y[i];
		if (fabs(y[i]) > amax)
			amax = fabs(y[i]);
	}
	double I = d->intermediate, Is = moe_desc_shared_width(d);
	double mats = d->kind == MOE_KIND_GLU ? 3.0 : 2.0;
	double smats = d->shared_kind == MOE_KIND_GLU ? 3.0 : 2.0;
	double flops = 2.0 * (double)T *
		       ((double)W * mats * H * I + smats * H * Is + (double)H * in->n_experts);
	char thr[32] = "all cores";
	if (o->threads)
		snprintf(thr, sizeof thr, "%u", (unsigned)o->threads);
	printf("model %s (cpu %s), layer %u, %zu tokens, threads %s\n", in->name, in->cpu, layer, T,
	       thr);
	if (le)
		printf("weights %s in %.3f s, layers [%u, %u)\n",
		       o->n_weights ? "loaded" : "random", t_load, (unsigned)lb, (unsigned)le);
	else
		printf("weights %s in %.3f s, every layer\n", o->n_weights ? "loaded" : "random",
		       t_load);
	if (rss0 > 0 && rss1 > 0) {
		double p = moe_params(in, lb, le);
		printf("weights resident %.1f MiB (growth of VmRSS), %.3f bytes per MoE "
		       "parameter\n",
		       (rss1 - rss0) / 1048576.0, p > 0 ? (rss1 - rss0) / p : 0.0);
	}
	printf("forward %.3f ms (best of %llu), %.1f GFLOP/s\n", best * 1e3,
	       (unsigned long long)(o->reps ? o->reps : 1), T ? flops / best * 1e-9 : 0.0);
	printf("output mean %.6g, max |y| %.6g\n", T ? sum / (double)(T * H) : 0.0, amax);
	printf("aux: lb_loss %.6g z_loss %.6g importance_cv2 %.6g dropped %lld\n",
	       (double)rt.lb_loss, (double)rt.z_loss, (double)rt.importance_cv2,
	       (long long)rt.n_dropped);
	rc = MOE_EXIT_OK;

	if (o->check) {
		yr = malloc((T ? T : 1) * H * sizeof *yr);
		mag = malloc((T ? T : 1) * H * sizeof *mag);
		ids_ref = malloc((T ? T : 1) * (W ? W : 1) * sizeof *ids_ref);
		if (!yr || !mag || !ids_ref || moe_ref_weights_alloc(d, &w) != MOE_OK) {
			fprintf(stderr, "moegen: error: out of memory\n");
			rc = MOE_EXIT_BACKEND;
			goto out;
		}
		moe_ref_weights_random(d, o->seed_w, layer, &w);
		struct moe_routing rr = {.expert_ids = ids_ref};
		struct moe_fwd_opts fo = {.layer = layer};
		if (moe_ref_forward_mag(d, &w, x, yr, mag, T, &fo, &rr, err, sizeof err) !=
		    MOE_OK) {
			fprintf(stderr, "moegen: error: reference: %s\n", err);
			rc = MOE_EXIT_BACKEND;
			goto out;
		}
		double se = 0.0, sr = 0.0;
		for (size_t i = 0; i < T * H; i++) {
			double r = bf16 ? moe_bf16_round(yr[i]) : yr[i];
			double e = fabs((double)y[i] - r);
			se += e * e;
			sr += r * r;
		}
		/* bf16 or int8 compute (where the CPU has their dot
		 * instructions) rounds x and h before the products: measured
		 * against the terms' magnitudes; bf16 activations: the output
		 * itself is rounded to 8 bits */
		int reduced = moe_desc_compute_tol(d, 0.0) > 0.0;
		double rel = moe_ref_out_err(y, yr, reduced ? mag : NULL, T * H, bf16);
		double nmse = sr > 0.0 ? se / sr : se;
		size_t bad = W ? routing_mismatches(ids, ids_ref, T, W) : 0;
		double tol = moe_desc_compute_tol(d, bf16 ? 1.0 / 128.0 : 1e-5);
		printf("check: max rel err %.3g (tol %.0e), nmse %.3g, routing agreement "
		       "%zu/%zu tokens\n",
		       rel, tol, nmse, T - bad, T);
		if (!(rel <= tol) || bad) {
			printf("check: MISMATCH\n");
			rc = MOE_EXIT_CHECK;
		} else {
			printf("check: ok\n");
		}
	}
out:
	moe_ref_weights_free(&w);
	free(x), free(y), free(yr), free(mag), free(xb), free(yb), free(ids), free(ids_ref),
	    free(counts);
	if (m)
		a.destroy(m);
	dlclose(a.dl);
	free(d);
	return rc;
}

#ifdef MOE_HAVE_MPI
/* a and b within rel relative to the larger (both 0 included) */
static int close_rel(float a, float b, double rel)
{
	double m = fabs((double)a) > fabs((double)b) ? fabs((double)a) : fabs((double)b);
	return fabs((double)a - (double)b) <= rel * m;
}

/* --ep under mpirun: this rank's experts and tokens; rank 0 reports (and with
 * --check compares with one process). Every rank returns rank 0's code. */
static int do_run_ep(const struct run_opts *o)
{
	int P, me, rc = MOE_EXIT_BACKEND;
	MPI_Init(NULL, NULL);
	MPI_Comm_size(MPI_COMM_WORLD, &P);
	MPI_Comm_rank(MPI_COMM_WORLD, &me);
	struct moe_api a;
	char err[4096] = "";
	if (api_open(o->model, &a, err, sizeof err) != 0) {
		fprintf(stderr, "moegen: error: %s\n", err);
		MPI_Abort(MPI_COMM_WORLD, MOE_EXIT_IO);
		return MOE_EXIT_IO;
	}
	if (!a.route || !a.experts || !a.combine || !a.route_stats || !a.from_sums) {
		fprintf(stderr,
			"moegen: error: '%s' lacks the staged calls (moe_route, moe_experts, "
			"moe_combine, moe_route_stats, moe_routing_from_sums) that --ep needs\n",
			o->model);
		MPI_Abort(MPI_COMM_WORLD, MOE_EXIT_IO);
		return MOE_EXIT_IO;
	}
	const struct moe_info *in = a.info();
	uint32_t layer = first_layer(o, in), lb, le;
	held_layers(o, layer, &lb, &le);
	size_t N = o->tokens, H = in->hidden, W = in->route_width;
	int bf16 = in->act_dtype == MOE_DTYPE_BF16, w_in = 0;
	size_t dn = a.describe(NULL, 0);
	char *desc = malloc(dn + 1);
	if (desc) {
		a.describe(desc, dn + 1);
		w_in = strstr(desc, " apply_to input") != NULL; /* the weight travels with a row */
		free(desc);
	}
	size_t es = bf16 ? 2 : 4, t0 = N * (size_t)me / (size_t)P,
	       t1 = N * (size_t)(me + 1) / (size_t)P, T = t1 - t0;
	uint32_t e0, e1;
	moe_ep_range(in->n_experts, P, me, &e0, &e1);
	moe_model *m = NULL, *full = NULL;
	float *x = malloc((N ? N : 1) * H * sizeof *x);
	uint16_t *xb = malloc((N ? N : 1) * H * sizeof *xb);
	char *y = malloc((T ? T : 1) * H * es), *y_ep = NULL, *y_ref = NULL;
	int32_t *ids = NULL;
	int64_t *cnt = calloc(in->n_experts, sizeof *cnt), *cnt_ref = NULL;
	int *rcounts = NULL, *rdispl = NULL;
	struct moe_create_opts co = {.threads = (uint32_t)o->threads,
				     .device = MOE_DEVICE_CPU,
				     .expert_begin = e0,
				     .expert_end = e1,
				     .layer_begin = lb,
				     .layer_end = le};
	enum moe_status st = MOE_ERR_NOMEM;
	if (x && xb && y && cnt && (st = a.create(&m, &co)) == MOE_OK)
		st = o->n_weights ? api_load(&a, m, o) : a.init_random(m, o->seed_w);
	if (st != MOE_OK)
		fprintf(stderr, "moegen: error: rank %d: %s\n", me, a.last_error());
	int bad = st != MOE_OK, any = 0;
	MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
	if (any)
		goto out;
	fill_input(o->seed_x, N, H, bf16, x, xb);
	const char *xs = bf16 ? (const char *)xb : (const char *)x;
	struct moe_ep_fns fns = {.info = a.info,
				 .describe = a.describe,
				 .route = a.route,
				 .experts = a.experts,
				 .combine = a.combine,
				 .last_error = a.last_error,
				 .route_stats = a.route_stats,
				 .routing_from_sums = a.from_sums};
	/* the routing statistics of all the ranks' tokens (every rank has them) */
	struct moe_routing rt_ep = {.counts = cnt};
	struct moe_ep_stats s = {0}, best = {0};
	uint64_t chunks = o->chunks ? o->chunks : 4, reps = o->reps ? o->reps : 1;
	/* the simulated slow link, when libmoe_ep_slowlink.so is preloaded */
	void (*link_stats)(struct moe_ep_slowlink_stats *) =
	    (void (*)(struct moe_ep_slowlink_stats *))dlsym(RTLD_DEFAULT, "moe_ep_slowlink_stats");
	void (*link_reset)(void) = (void (*)(void))dlsym(RTLD_DEFAULT, "moe_ep_slowlink_reset");
	if (link_reset)
		link_reset();
	for (uint64_t r = 0; r < reps; r++) {
		st = moe_ep_forward(MPI_COMM_WORLD, &fns, m, layer, xs + t0 * H * es, y, T,
				    (uint32_t)chunks, &rt_ep, &s, err, sizeof err);
		if (st != MOE_OK)
			break;
		if (r == 0 || s.t_total < best.t_total)
			best = s;
	}
	if (st != MOE_OK) {
		if (me == 0)
			fprintf(stderr, "moegen: error: --ep: %s\n", err);
		goto out;
	}
	/* the totals: bytes summed over the ranks, times the slowest rank's */
	uint64_t bytes = 0;
	double t[5] = {best.t_route, best.t_compute, best.t_wait, best.t_combine, best.t_total},
	       tmax[5];
	MPI_Reduce(&best.bytes_sent, &bytes, 1, MPI_UINT64_T, MPI_SUM, 0, MPI_COMM_WORLD);
	MPI_Reduce(t, tmax, 5, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
	struct moe_ep_slowlink_stats ls = {0};
	if (link_stats)
		link_stats(&ls);
	/* per forward: the busiest link, and the most exposed rank */
	double lt[2] = {ls.t_link / (double)reps, ls.t_exposed / (double)reps}, ltmax[2] = {0, 0};
	MPI_Reduce(lt, ltmax, 2, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
	double ov = lt[0] > 0 ? 1 - lt[1] / lt[0] : 1.0, ovmin = 1;
	MPI_Reduce(&ov, &ovmin, 1, MPI_DOUBLE, MPI_MIN, 0, MPI_COMM_WORLD);
	rcounts = malloc((size_t)P * sizeof *rcounts);
	rdispl = malloc((size_t)P * sizeof *rdispl);
	if (me == 0)
		y_ep = malloc((N ? N : 1) * H * es);
	if (!rcounts || !rdispl || (me == 0 && !y_ep)) {
		fprintf(stderr, "moegen: error: out of memory\n");
		MPI_Abort(MPI_COMM_WORLD, MOE_EXIT_BACKEND);
	}
	for (int q = 0; q < P; q++) {
		size_t a0 = N * (size_t)q / (size_t)P, a1 = N * (size_t)(q + 1) / (size_t)P;
		rcounts[q] = (int)((a1 - a0) * H * es);
		rdispl[q] = (int)(a0 * H * es);
	}
	MPI_Gatherv(y, (int)(T * H * es), MPI_BYTE, y_ep, rcounts, rdispl, MPI_BYTE, 0,
		    MPI_COMM_WORLD);
	rc = MOE_EXIT_OK;
	if (me == 0) {
		printf("model %s, layer %u, %zu tokens on %d ranks (%u experts, %llu chunks)\n",
		       in->name, layer, N, P, in->n_experts, (unsigned long long)chunks);
		printf("ep: forward %.3f ms (slowest rank): route %.3f, experts %.3f, exchange "
		       "wait %.3f, combine %.3f\n",
		       tmax[4] * 1e3, tmax[0] * 1e3, tmax[1] * 1e3, tmax[2] * 1e3, tmax[3] * 1e3);
		printf("ep: bytes exchanged %llu (%.1f per token)\n", (unsigned long long)bytes,
		       N ? (double)bytes / (double)N : 0.0);
		printf("aux: lb_loss %.6g z_loss %.6g importance_cv2 %.6g dropped %lld\n",
		       (double)rt_ep.lb_loss, (double)rt_ep.z_loss, (double)rt_ep.importance_cv2,
		       (long long)rt_ep.n_dropped);
		if (ls.on)
			printf("ep: simulated link %g Gb/s, %g us: busy %.3f ms per forward, "
			       "exposed %.3f ms (most of any rank), overlap %.2f (least of any "
			       "rank)\n",
			       ls.gbps, ls.latency_us, ltmax[0] * 1e3, ltmax[1] * 1e3, ovmin);
	}
	if (o->check && me == 0) {
		/* one process, every expert: the same bits, and the bytes the routing
		 * implies (rows out and back to another rank, plus the counts) */
		y_ref = malloc((N ? N : 1) * H * es);
		ids = malloc((N ? N : 1) * (W ? W : 1) * sizeof *ids);
		cnt_ref = calloc(in->n_experts, sizeof *cnt_ref);
		co.expert_begin = co.expert_end = 0;
		struct moe_routing rt = {.expert_ids = ids, .counts = cnt_ref};
		st = !y_ref || !ids || !cnt_ref ? MOE_ERR_NOMEM : a.create(&full, &co);
		if (st == MOE_OK)
			st = o->n_weights ? api_load(&a, full, o) : a.init_random(full, o->seed_w);
		if (st == MOE_OK)
			st = a.forward(full, layer, xs, y_ref, N, &rt, NULL);
		if (st != MOE_OK) {
			fprintf(stderr, "moegen: error: %s\n", a.last_error());
			rc = MOE_EXIT_BACKEND;
		} else {
			size_t row = H * 4 + (w_in ? 4 : 0);
			uint64_t want = (uint64_t)P * (uint64_t)(P - 1) * chunks *
					((in->n_experts + (uint32_t)P - 1) / (uint32_t)P) * 8;
			for (size_t tk = 0, r = 0; tk < N; tk++) {
				while (tk >= N * (r + 1) / (size_t)P)
					r++;
				for (size_t k = 0; k < W; k++) {
					int32_t e = ids[tk * W + k];
					uint32_t q0, q1;
					moe_ep_range(in->n_experts, P, (int)r, &q0, &q1);
					if (e >= 0 && ((uint32_t)e < q0 || (uint32_t)e >= q1))
						want += row + H * 4;
				}
			}
			int same = memcmp(y_ep, y_ref, N * H * es) == 0;
			/* the statistics: counts exactly; the losses were summed in
			 * another order, so within rounding (f32 results) */
			int stats = memcmp(cnt, cnt_ref, in->n_experts * sizeof *cnt) == 0 &&
				    rt_ep.n_dropped == rt.n_dropped &&
				    close_rel(rt_ep.lb_loss, rt.lb_loss, 1e-6) &&
				    close_rel(rt_ep.z_loss, rt.z_loss, 1e-6) &&
				    close_rel(rt_ep.importance_cv2, rt.importance_cv2, 1e-6);
			printf("ep: output %s the single-process forward\n",
			       same ? "bit-identical to" : "DIFFERS from");
			printf("ep: bytes exchanged %llu, from the routing %llu: %s\n",
			       (unsigned long long)bytes, (unsigned long long)want,
			       bytes == want ? "equal" : "DIFFERENT");
			printf("ep: routing statistics %s the single-process forward's (counts "
			       "exactly; lb_loss %.9g, z_loss %.9g, importance_cv2 %.9g within "
			       "1e-6 relative)\n",
			       stats ? "equal to" : "DIFFER from", (double)rt.lb_loss,
			       (double)rt.z_loss, (double)rt.importance_cv2);
			int ok = same && bytes == want && stats;
			printf("check: %s\n", ok ? "ok" : "MISMATCH");
			rc = ok ? MOE_EXIT_OK : MOE_EXIT_CHECK;
		}
	}
out:
	MPI_Bcast(&rc, 1, MPI_INT, 0, MPI_COMM_WORLD);
	if (any && rc == MOE_EXIT_OK)
		rc = MOE_EXIT_BACKEND;
	if (full)
		a.destroy(full);
	if (m)
		a.destroy(m);
	free(x), free(xb), free(y), free(y_ep), free(y_ref), free(ids), free(rcounts), free(rdispl);
	free(cnt), free(cnt_ref);
	dlclose(a.dl);
	MPI_Finalize();
	return rc;
}
#endif

int moe_cmd_run(int argc, char **argv)
{
	struct run_opts o = {.seed_w = 1, .seed_x = 1, .tokens = 16, .reps = 3};
	const char **wts = calloc((size_t)argc + 1, sizeof *wts);
	int rc = MOE_EXIT_USAGE;
	if (!wts)
		return MOE_EXIT_INTERNAL;
	o.weights = wts;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		uint64_t *num = NULL;
		if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
			usage(stdout);
			rc = MOE_EXIT_OK;
			goto done;
		} else if (!strcmp(a, "--check")) {
			o.check = 1;
			continue;
		} else if (!strcmp(a, "--ep")) {
			o.ep = 1;
			continue;
		} else if (!strcmp(a, "--chunks")) {
			num = &o.chunks;
		} else if (!strcmp(a, "--weights")) {
			while (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0)
				wts[o.n_weights++] = argv[++i];
			if (!o.n_weights) {
				fprintf(stderr,
					"moegen: error: --weights needs at least one file\n");
				goto done;
			}
			continue;
		} else if (!strcmp(a, "--random")) {
			num = &o.seed_w;
		} else if (!strcmp(a, "--tokens")) {
			num = &o.tokens;
		} else if (!strcmp(a, "--threads")) {
			num = &o.threads;
		} else if (!strcmp(a, "--layer")) {
			num = &o.layer;
			o.have_layer = 1;
		} else if (!strcmp(a, "--layers")) {
			if (i + 1 >= argc ||
			    parse_range(argv[i + 1], &o.layer_begin, &o.layer_end) != 0) {
				fprintf(stderr, "moegen: error: --layers needs A:B, model layers "
						"[A, B) with A < B\n");
				goto done;
			}
			i++;
			continue;
		} else if (!strcmp(a, "--seed")) {
			num = &o.seed_x;
		} else if (!strcmp(a, "--reps")) {
			num = &o.reps;
		} else if (a[0] == '-') {
			fprintf(stderr, "moegen: error: unknown option '%s'\n", a);
			usage(stderr);
			goto done;
		} else if (!o.model) {
			o.model = a;
			continue;
		} else {
			fprintf(stderr, "moegen: error: unexpected argument '%s'\n", a);
			goto done;
		}
		if (i + 1 >= argc || parse_u64(argv[i + 1], num) != 0) {
			fprintf(stderr, "moegen: error: option '%s' needs a non-negative integer\n",
				a);
			goto done;
		}
		i++;
	}
	if (!o.model) {
		fprintf(stderr, "moegen: error: missing MODEL.so\n");
		usage(stderr);
		goto done;
	}
	if (o.tokens > (1u << 24) || o.threads > 1024 || o.layer > UINT32_MAX) {
		fprintf(stderr, "moegen: error: --tokens, --threads or --layer out of range\n");
		goto done;
	}
	if (o.ep) {
#ifdef MOE_HAVE_MPI
		if (o.chunks > 4096) {
			fprintf(stderr, "moegen: error: --chunks out of range\n");
			goto done;
		}
		rc = do_run_ep(&o);
#else
		fprintf(stderr, "moegen: error: --ep needs MPI, and this moegen was built without "
				"it (install openmpi-bin and libopenmpi-dev: scripts/deps.sh, then "
				"reconfigure)\n");
		rc = MOE_EXIT_BACKEND;
#endif
		goto done;
	}
	if (o.check && o.n_weights) { /* refused before anything runs */
		fprintf(stderr, "moegen: error: --check compares with the reference on --random "
				"weights; it cannot be combined with --weights\n");
		goto done;
	}
	rc = do_run(&o);
done:
	free(wts);
	return rc;
}
