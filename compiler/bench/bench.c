/* bench.c: `moegen bench`: one MoE layer of real shapes, timed three ways in
 * one run against this machine's own FMA peak and DRAM bandwidth: the layer
 * moegen generates (compiled to a temporary model.so and called through
 * moe.h) and a per-expert cblas_sgemm baseline, on the same inputs and the
 * same routing. docs/benchmarks.md gives the method. */
#include "bench.h"

#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "backend.h"
#include "moe.h"
#include "moe_kernels.h" /* the product-key phases, timed alone */
#include "moegen.h"
#include "pool.h"
#include "progress.h"

#ifdef MOE_HAVE_OPENBLAS
#include <cblas.h>
/* OpenBLAS's header pulls in <complex.h>, whose I would shadow the expert
 * width I used throughout. */
#undef I
#endif

static const char *const usage_bench =
    "usage: moegen bench [--shapes LIST] [--tokens LIST] [--weights LIST]\n"
    "                    [--routing LIST] [--threads N] [--reps N] [--quick]\n"
    "                    [--copies N] [--csv FILE] [--json FILE] [--no-generated]\n"
    "                    [--modes LIST] [--ep P [--chunks N] [--link GBPS[,US]]]\n"
    "Measure this machine's FMA peak and DRAM read bandwidth, then time one MoE\n"
    "layer per shape, token count, weight dtype and routing: the layer moegen\n"
    "generates and a per-expert cblas_sgemm baseline on the same routing.\n"
    "  --shapes   qwen3,olmoe,mixtral,deepseek (default: all); tiny (E=8 H=64,\n"
    "             a test-sized layer, only when named)\n"
    "  --tokens   token counts (default: 1,16,256,4096)\n"
    "  --weights  f32,bf16,int8,int4,w8a8,w4a8 (default: f32,bf16); int8 per\n"
    "             output channel, int4 in groups of 128 with zero points, both\n"
    "             f32 compute; w8a8, w4a8: the same weights, int8 compute\n"
    "  --routing  uniform,zipf (default: both)\n"
    "  --threads  threads for every side (default: all online cores)\n"
    "  --reps     timed repetitions; the median is reported (default: adaptive)\n"
    "  --copies   weight copies cycled between repetitions (default: enough to\n"
    "             read four times the last-level cache per cycle, at most 8)\n"
    "  --quick    qwen3 and deepseek at 1,16,256 tokens, short probes\n"
    "  --csv FILE also write shape,tokens,weights,routing,ms,gflops,gbps,\n"
    "             pct_peak_flops,pct_peak_bw,baseline_ms,speedup,pct_now_bw,\n"
    "             pct_of_twin\n"
    "  --json FILE  also write the rows, the probes and the machine as JSON\n"
    "  --no-generated  probes and baseline only\n"
    "  --modes    research routers, generated layer only: hier, sparsemixer,\n"
    "             noisy, ec, soft, soft-g (soft in groups of 256 tokens),\n"
    "             peer, peer-1m (full size, 8 GiB; only when named).\n"
    "             Default: all but peer-1m in a full run, none with\n"
    "             --quick; alone, without --shapes, it runs no shapes; none: no\n"
    "             research routers. hier, sparsemixer, noisy and ec are each\n"
    "             followed by their token-choice twin (NAME-tc: the same experts\n"
    "             behind softmax top-k)\n"
    "  --ep P     expert parallelism instead: each shape and token count as one\n"
    "             layer on P MPI ranks (moegen run --ep under mpirun, the cores\n"
    "             shared among them); the slowest rank's times and the bytes\n"
    "  --chunks N  --ep: token chunks in flight (default 4)\n"
    "  --link GBPS[,US]  --ep: simulate a link of GBPS Gb/s and US microseconds\n"
    "             per transfer around the MPI calls (libmoe_ep_slowlink.so);\n"
    "             reports the link time and how much of it the computation hid\n";

struct shape {
	const char *name;  /* --shapes and the csv */
	const char *label; /* the model it comes from */
	uint32_t E, k, H, I;
	int deepseek; /* sigmoid, groups 8/4 sum_top2, select bias, 1 shared expert */
};

static const struct shape shapes[] = {
    {"qwen3", "Qwen3-30B-A3B", 128, 8, 2048, 768, 0},
    {"olmoe", "OLMoE-1B-7B", 64, 8, 2048, 1024, 0},
    {"mixtral", "Mixtral-8x7B", 8, 2, 4096, 14336, 0},
    {"deepseek", "DeepSeek-V3 TP8 shard", 256, 8, 7168, 256, 1},
    {"tiny", "a test-sized layer", 8, 2, 64, 64, 0},
};
#define N_SHAPES (sizeof shapes / sizeof *shapes)

#define MAX_TOKENS_LIST 16
#define MAX_COPIES 8
#define SEED 1
#define ZIPF_S 1.0 /* exponent of the skewed routing: p(rank r) ~ 1 / r^s */

enum routing { ROUTE_UNIFORM, ROUTE_ZIPF, ROUTE_COUNT };
static const char *const routing_names[ROUTE_COUNT] = {"uniform", "zipf"};

#define N_MODE_NAMES 8 /* entries of modes[] below */

/* The weight formats of the FFN matrices a run can time: dtypes, and the
 * kept-quantized formats (router f32). */
static const struct wfmt {
	const char *name;
	enum moe_dtype dt;
	struct moe_qfmt q;
	enum moe_compute compute;
} wfmts[] = {
    {"f32", MOE_DTYPE_F32, {MOE_QFORMAT_NONE, 0, 0}, MOE_COMPUTE_AUTO},
    {"bf16", MOE_DTYPE_BF16, {MOE_QFORMAT_NONE, 0, 0}, MOE_COMPUTE_AUTO},
    {"int8", MOE_DTYPE_F32, {MOE_QFORMAT_INT8, 0, 0}, MOE_COMPUTE_AUTO},   /* per channel */
    {"int4", MOE_DTYPE_F32, {MOE_QFORMAT_INT4, 128, 1}, MOE_COMPUTE_AUTO}, /* g128, zeros */
    /* the same weights times int8 activations (dtype.compute int8) */
    {"w8a8", MOE_DTYPE_F32, {MOE_QFORMAT_INT8, 0, 0}, MOE_COMPUTE_INT8},
    {"w4a8", MOE_DTYPE_F32, {MOE_QFORMAT_INT4, 128, 1}, MOE_COMPUTE_INT8},
};
#define N_WFMT ((int)(sizeof wfmts / sizeof *wfmts))

struct opts {
	int shape_on[N_SHAPES];
	int mode_on[N_MODE_NAMES];
	uint32_t tokens[MAX_TOKENS_LIST];
	int n_tokens;
	int fmt_on[N_WFMT];
	int routing_on[ROUTE_COUNT];
	unsigned threads;
	int reps;   /* 0: adaptive */
	int copies; /* weight copies; 0: from the cache size */
	int quick;
	int generated;
	const char *csv, *json;
	unsigned ep, chunks; /* --ep P: expert parallelism on P ranks, in chunks */
	const char *link;    /* --link GBPS[,US]: the simulated slow link */
};

struct probe_run {
	const char *when;
	double fma8, fma16, dram_gbps;
};

struct machine {
	double fma8, fma16, peak_gflops; /* peak: the better of the two */
	double dram_gbps;
	size_t llc;
	char cpu[128];
	unsigned threads;
	int runs; /* per probe */
	size_t dram_bytes;
	struct probe_run probes[2]; /* at the start, at the end */
	int n_probes;
	/* read beside each timed run of a short row (time_median): DRAM's
	 * bandwidth here changes from minute to minute (twofold) */
	struct moe_dram_probe *now;
};

/* The progress line (stderr, on a terminal, after a second): one step per
 * timed measurement. Everything bench prints to stdout goes through say(),
 * which first wipes the line so that the two never share a row. */
static struct moe_progress progress;
static size_t progress_done, progress_total;
static char progress_item[96];

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	moe_progress_clear(&progress);
	va_list ap;
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
}

/* Results of one (shape, tokens, routing): the baseline runs once in f32 and
 * serves both weight dtypes (docs/benchmarks.md). */
struct result {
	double ms; /* < 0: not measured */
	double tp; /* median of run seconds x same-moment probe GB/s; < 0: none */
	double match;
	double check; /* max |y - y_base| / max |y_base|; < 0: not compared */
};

/* Options ----------------------------------------------------------------- */

static int bad_usage(const char *fmt, const char *arg)
{
	fprintf(stderr, "moegen: error: ");
	fprintf(stderr, fmt, arg);
	fprintf(stderr, "\n%s", usage_bench);
	return MOE_EXIT_USAGE;
}

/* Split a comma list and call item() for each; -1 on the first bad item. */
static int each_item(const char *list, int (*item)(struct opts *o, const char *s), struct opts *o)
{
	char buf[256];
	if (strlen(list) >= sizeof buf || !*list)
		return -1;
	strcpy(buf, list);
	for (char *save = NULL, *s = strtok_r(buf, ",", &save); s; s = strtok_r(NULL, ",", &save))
		if (item(o, s))
			return -1;
	return 0;
}

static int item_shape(struct opts *o, const char *s)
{
	for (size_t i = 0; i < N_SHAPES; i++)
		if (!strcmp(s, shapes[i].name)) {
			o->shape_on[i] = 1;
			return 0;
		}
	return -1;
}

static const char *const mode_names[N_MODE_NAMES] = {"hier", "sparsemixer", "noisy", "ec",
						     "soft", "soft-g",      "peer",  "peer-1m"};

static int item_mode(struct opts *o, const char *s)
{
	if (!strcmp(s, "none"))
		return 0;
	for (int i = 0; i < N_MODE_NAMES; i++)
		if (!strcmp(s, mode_names[i])) {
			o->mode_on[i] = 1;
			return 0;
		}
	return -1;
}

static int item_tokens(struct opts *o, const char *s)
{
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 10);
	if (errno || *end || *s == '-' || v == 0 || v > 65536 || o->n_tokens >= MAX_TOKENS_LIST)
		return -1;
	o->tokens[o->n_tokens++] = (uint32_t)v;
	return 0;
}

static int item_weights(struct opts *o, const char *s)
{
	for (int i = 0; i < N_WFMT; i++)
		if (!strcmp(s, wfmts[i].name)) {
			o->fmt_on[i] = 1;
			return 0;
		}
	return -1;
}

static int item_routing(struct opts *o, const char *s)
{
	for (int i = 0; i < ROUTE_COUNT; i++)
		if (!strcmp(s, routing_names[i])) {
			o->routing_on[i] = 1;
			return 0;
		}
	return -1;
}

static int parse_uint(const char *s, unsigned max, unsigned *out)
{
	char *end;
	errno = 0;
	if (!s || !*s || *s == '-')
		return -1;
	unsigned long v = strtoul(s, &end, 10);
	if (errno || *end || v > max)
		return -1;
	*out = (unsigned)v;
	return 0;
}

static int parse_opts(int argc, char **argv, struct opts *o)
{
	const char *shapes_arg = NULL, *tokens_arg = NULL, *weights_arg = NULL, *routing_arg = NULL;
	const char *modes_arg = NULL;
	memset(o, 0, sizeof *o);
	o->generated = 1;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char **val = NULL;
		if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			fputs(usage_bench, stdout);
			return -2;
		} else if (!strcmp(a, "--quick")) {
			o->quick = 1;
			continue;
		} else if (!strcmp(a, "--no-generated")) {
			o->generated = 0;
			continue;
		} else if (!strcmp(a, "--shapes")) {
			val = &shapes_arg;
		} else if (!strcmp(a, "--modes")) {
			val = &modes_arg;
		} else if (!strcmp(a, "--tokens")) {
			val = &tokens_arg;
		} else if (!strcmp(a, "--weights")) {
			val = &weights_arg;
		} else if (!strcmp(a, "--routing")) {
			val = &routing_arg;
		} else if (!strcmp(a, "--csv")) {
			val = &o->csv;
		} else if (!strcmp(a, "--json")) {
			val = &o->json;
		} else if (!strcmp(a, "--link")) {
			val = &o->link;
		} else if (!strcmp(a, "--ep") || !strcmp(a, "--chunks")) {
			unsigned v;
			if (i + 1 >= argc || parse_uint(argv[i + 1], 1024, &v) || v == 0)
				return bad_usage("%s needs a positive integer", a);
			*(!strcmp(a, "--ep") ? &o->ep : &o->chunks) = v;
			i++;
			continue;
		} else if (!strcmp(a, "--threads") || !strcmp(a, "--reps") ||
			   !strcmp(a, "--copies")) {
			unsigned v;
			if (i + 1 >= argc || parse_uint(argv[i + 1], 1024, &v) || v == 0)
				return bad_usage("%s needs a positive integer", a);
			if (!strcmp(a, "--threads"))
				o->threads = v;
			else if (!strcmp(a, "--reps"))
				o->reps = v > 60 ? 60 : (int)v;
			else
				o->copies = v > MAX_COPIES ? MAX_COPIES : (int)v;
			i++;
			continue;
		} else {
			return bad_usage(
			    a[0] == '-' ? "unknown option '%s'" : "unexpected argument '%s'", a);
		}
		if (i + 1 >= argc)
			return bad_usage("%s needs a value", a);
		*val = argv[++i];
	}
	if (modes_arg && each_item(modes_arg, item_mode, o))
		return bad_usage("--modes: expected none or a list of hier, sparsemixer, noisy, "
				 "ec, soft, soft-g, peer, peer-1m, got '%s'",
				 modes_arg);
	if (!modes_arg && !o->quick)
		for (int i = 0; i < N_MODE_NAMES - 1; i++)
			o->mode_on[i] = 1; /* all but peer-1m */
	if (!shapes_arg && modes_arg && strcmp(modes_arg, "none"))
		shapes_arg = "";
	if (!shapes_arg)
		shapes_arg = o->quick ? "qwen3,deepseek" : "qwen3,olmoe,mixtral,deepseek";
	if (!tokens_arg)
		tokens_arg = o->quick ? "1,16,256" : "1,16,256,4096";
	if (*shapes_arg && each_item(shapes_arg, item_shape, o))
		return bad_usage(
		    "--shapes: expected a list of qwen3, olmoe, mixtral, deepseek, tiny, got "
		    "'%s'",
		    shapes_arg);
	if (each_item(tokens_arg, item_tokens, o))
		return bad_usage("--tokens: expected up to 16 counts in 1..65536, got '%s'",
				 tokens_arg);
	if (each_item(weights_arg ? weights_arg : "f32,bf16", item_weights, o))
		return bad_usage("--weights: expected a list of f32, bf16, int8, int4, w8a8, w4a8, "
				 "got '%s'",
				 weights_arg);
	if (each_item(routing_arg ? routing_arg : "uniform,zipf", item_routing, o))
		return bad_usage("--routing: expected a list of uniform, zipf, got '%s'",
				 routing_arg);
	if (o->quick && !o->reps)
		o->reps = 3;
	if (!o->ep && (o->link || o->chunks))
		return bad_usage("%s", "--link and --chunks go with --ep P");
	if (!o->threads) {
		long c = sysconf(_SC_NPROCESSORS_ONLN);
		o->threads = c > 0 ? (unsigned)c : 1;
	}
	return 0;
}

#ifdef MOE_HAVE_OPENBLAS

static void cpu_model(char *buf, size_t cap)
{
	FILE *f = fopen("/proc/cpuinfo", "r");
	char line[512];
	snprintf(buf, cap, "unknown CPU");
	if (!f)
		return;
	while (fgets(line, sizeof line, f)) {
		char *colon = strchr(line, ':');
		if (!strncmp(line, "model name", 10) && colon) {
			colon += colon[1] == ' ' ? 2 : 1;
			colon[strcspn(colon, "\n")] = 0;
			snprintf(buf, cap, "%s", colon);
			break;
		}
	}
	fclose(f);
}

static void errf(char *err, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void errf(char *err, size_t cap, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(err, cap, fmt, ap);
	va_end(ap);
}

/* The model ------------------------------------------------------------- */

static void shape_desc(const struct shape *s, const struct wfmt *f, struct moe_desc *d)
{
	enum moe_dtype wt = f->dt;
	memset(d, 0, sizeof *d);
	d->version = MOE_DESC_VERSION;
	snprintf(d->name, sizeof d->name, "bench-%s-%s", s->name, f->name);
	d->hidden = s->H;
	d->n_layers = 1;
	d->n_moe_layers = 1;
	d->moe_layers[0] = 0;
	d->dense_kind = MOE_KIND_GLU;
	d->dense_act = MOE_ACT_SILU;
	d->attn = MOE_ATTN_NONE;
	d->weight_dtype = wt;
	d->act_dtype = MOE_DTYPE_F32;
	d->mode = MOE_MODE_TOKEN_CHOICE;
	d->score = MOE_SCORE_SOFTMAX;
	d->top_k = s->k;
	d->norm = MOE_NORM_SUM;
	d->norm_p = 1;
	d->scale = 1;
	d->n_groups = 1;
	d->group_top = 1;
	d->group_score = MOE_GROUP_SCORE_MAX;
	d->capacity = MOE_CAPACITY_NONE;
	d->noise = MOE_NOISE_NONE;
	d->apply_to = MOE_APPLY_OUTPUT;
	d->kind = MOE_KIND_GLU;
	d->n_experts = s->E;
	d->intermediate = s->I;
	d->act = MOE_ACT_SILU;
	d->split = 1;
	d->shared_kind = MOE_KIND_GLU;
	d->shared_act = MOE_ACT_SILU;
	d->shared_gate = MOE_SHARED_GATE_NONE;
	if (!strcmp(s->name, "olmoe"))
		d->norm = MOE_NORM_NONE; /* norm_topk_prob false */
	if (s->deepseek) {
		d->score = MOE_SCORE_SIGMOID;
		d->norm_eps = 1e-20f;
		d->scale = 2.5f;
		d->select_bias = 1;
		d->n_groups = 8;
		d->group_top = 4;
		d->group_score = MOE_GROUP_SCORE_SUM_TOP2;
		d->shared_count = 1;
		d->shared_intermediate = 256;
	}
	if (f->q.kind != MOE_QFORMAT_NONE)
		for (int m = 0; m < MOE_QMAT_COUNT; m++) {
			d->qfmt[m] = f->q;
			int up = m == MOE_QMAT_UP || m == MOE_QMAT_SHARED_UP;
			uint32_t K = up                   ? d->hidden
				     : m == MOE_QMAT_DOWN ? d->intermediate
							  : moe_desc_shared_width(d);
			if (!K) {
				d->qfmt[m] = (struct moe_qfmt){0};
				continue;
			}
			if (!d->qfmt[m].group || K % d->qfmt[m].group)
				d->qfmt[m].group = K;
		}
	d->compute = f->compute;
}

/* FLOPs and weight bytes of one forward of T tokens, with `touched` distinct
 * experts receiving tokens: router 2HE per token, each (token, expert) pair
 * 2 * 3HI (gate, up, down), the shared FFN 2 * 3 H Is per token. Bytes are
 * the weights actually read (each touched expert once, the router in f32)
 * plus the input and output. */
static double layer_flops(const struct moe_desc *d, double T)
{
	double H = d->hidden, E = d->n_experts, I = d->intermediate;
	double Is = (double)moe_desc_shared_width(d);
	return T * (2 * H * E + d->top_k * 6 * H * I + 6 * H * Is);
}

static double layer_bytes(const struct moe_desc *d, double T, double touched, double wbytes)
{
	double H = d->hidden, E = d->n_experts, I = d->intermediate;
	double Is = (double)moe_desc_shared_width(d);
	return 4 * E * H + touched * 3 * H * I * wbytes + 3 * H * Is * wbytes + 2 * T * H * 4;
}

static int dtype_bytes(enum moe_dtype t)
{
	return t == MOE_DTYPE_F32 ? 4 : 2;
}

/* Bytes per FFN weight as the kernels read them: the dtype's, or the routed
 * panels' bytes (codes, scales, offsets) per weight. */
static double ffn_wbytes(const struct moe_desc *d)
{
	if (!moe_desc_quantized(d))
		return dtype_bytes(d->weight_dtype);
	struct moe_geom r, s;
	moe_geoms_init(d, MOE_COMPUTE_F32, &r, &s);
	return (double)(r.up_bytes + r.down_bytes) / (3.0 * d->hidden * d->intermediate);
}

static double mem_available(void)
{
	FILE *f = fopen("/proc/meminfo", "r");
	char line[256];
	double kb = 0;
	if (!f)
		return 0;
	while (fgets(line, sizeof line, f))
		if (sscanf(line, "MemAvailable: %lf kB", &kb) == 1)
			break;
	fclose(f);
	return kb * 1024;
}

static double total_params(const struct moe_desc *d)
{
	double H = d->hidden, E = d->n_experts, I = d->intermediate;
	return E * H + E * 3 * H * I + 3 * H * (double)moe_desc_shared_width(d);
}

/* Inputs with a chosen routing ------------------------------------------ */

/* One benchmark input: tokens x[T, H] whose routing is the chosen target
 * experts, target[T, k] (ascending per token). */
struct input {
	uint32_t T;
	enum routing routing;
	float *x;
	int32_t *target;
	uint32_t touched; /* distinct experts */
	float *y_base;    /* the baseline's output, for the comparison */
};

static float urand(uint64_t a, uint64_t b, uint64_t c)
{
	return moe_rng_uniform(moe_rng_hash(SEED, a, b, c));
}

/* Cholesky factor (lower, in place) of the Gram matrix G = W W^T of the
 * router, in double: E is at most a few hundred and W has full row rank. */
static int gram_cholesky(const float *W, uint32_t E, uint32_t H, double *L)
{
	double *Wd = malloc((size_t)E * H * sizeof *Wd);
	if (!Wd)
		return -1;
	for (size_t i = 0; i < (size_t)E * H; i++)
		Wd[i] = W[i];
	cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)E, (int)E, (int)H, 1.0, Wd,
		    (int)H, Wd, (int)H, 0.0, L, (int)E);
	free(Wd);
	for (uint32_t j = 0; j < E; j++) {
		double s = L[(size_t)j * E + j];
		for (uint32_t k = 0; k < j; k++)
			s -= L[(size_t)j * E + k] * L[(size_t)j * E + k];
		if (!(s > 0))
			return -1;
		double ljj = sqrt(s);
		L[(size_t)j * E + j] = ljj;
		for (uint32_t i = j + 1; i < E; i++) {
			double t = L[(size_t)i * E + j];
			for (uint32_t k = 0; k < j; k++)
				t -= L[(size_t)i * E + k] * L[(size_t)j * E + k];
			L[(size_t)i * E + j] = t / ljj;
		}
	}
	return 0;
}

/* Draw k distinct experts for token t with probability proportional to p[],
 * respecting the group limit: once group_top groups hold a choice, only
 * experts of those groups remain eligible. */
static void draw_targets(const struct moe_desc *d, const double *p, uint64_t tag, uint32_t t,
			 int32_t *out)
{
	uint32_t E = d->n_experts, k = d->top_k, G = d->n_groups, per = E / G;
	uint8_t chosen[1024] = {0}, gsel[64] = {0};
	uint32_t n_groups_used = 0;
	for (uint32_t j = 0; j < k; j++) {
		double tot = 0;
		for (uint32_t e = 0; e < E; e++)
			if (!chosen[e] && (G == 1 || n_groups_used < d->group_top || gsel[e / per]))
				tot += p[e];
		double u = urand(tag, t, j) * tot, acc = 0;
		uint32_t pick = E;
		for (uint32_t e = 0; e < E; e++) {
			if (chosen[e] || !(G == 1 || n_groups_used < d->group_top || gsel[e / per]))
				continue;
			pick = e;
			acc += p[e];
			if (u < acc)
				break;
		}
		chosen[pick] = 1;
		if (G > 1 && !gsel[pick / per]) {
			gsel[pick / per] = 1;
			n_groups_used++;
		}
	}
	uint32_t n = 0;
	for (uint32_t e = 0; e < E; e++)
		if (chosen[e])
			out[n++] = (int32_t)e;
}

/* x = r + W^T G^-1 (z - W r): a random vector r moved, within the row space
 * of the router, so that its logits are exactly z, where z is high (3..4) for
 * the target experts and low (-2..-1) for the rest. Softmax or sigmoid, any
 * bias of +-0.1 and the group limit then select the targets. */
static int make_input(const struct moe_desc *d, const float *W, const double *L, struct input *in)
{
	uint32_t E = d->n_experts, H = d->hidden, k = d->top_k, T = in->T;
	uint64_t tag = 1000 + (uint64_t)in->routing * 100000 + T;
	in->x = malloc((size_t)T * H * sizeof *in->x);
	in->target = malloc((size_t)T * k * sizeof *in->target);
	float *lg = malloc((size_t)T * E * sizeof *lg);
	double *p = malloc(E * sizeof *p), *v = malloc(E * sizeof *v);
	uint8_t *used = calloc(E, 1);
	int rc = -1;
	if (!in->x || !in->target || !lg || !p || !v || !used || E > 1024 || d->n_groups > 64)
		goto out;
	/* Popularity: equal, or Zipf over a random ranking of the experts. */
	uint32_t *rank = malloc(E * sizeof *rank);
	if (!rank)
		goto out;
	for (uint32_t e = 0; e < E; e++)
		rank[e] = e;
	for (uint32_t e = E; e > 1; e--) {
		uint32_t j = (uint32_t)(urand(tag, 7, e) * (float)e) % e;
		uint32_t tmp = rank[e - 1];
		rank[e - 1] = rank[j];
		rank[j] = tmp;
	}
	for (uint32_t e = 0; e < E; e++)
		p[e] = in->routing == ROUTE_ZIPF ? pow(rank[e] + 1.0, -ZIPF_S) : 1.0;
	free(rank);

	for (size_t i = 0; i < (size_t)T * H; i++)
		in->x[i] = (urand(tag, 1, i) * 2 - 1) * 1.7320508f; /* variance 1 */
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)E, (int)H, 1.0f, in->x,
		    (int)H, W, (int)H, 0.0f, lg, (int)E);
	for (uint32_t t = 0; t < T; t++) {
		int32_t *tg = in->target + (size_t)t * k;
		draw_targets(d, p, tag, t, tg);
		for (uint32_t e = 0; e < E; e++)
			v[e] = -1.0 - urand(tag, 3, (uint64_t)t * E + e);
		for (uint32_t j = 0; j < k; j++) {
			v[tg[j]] = 3.0 + urand(tag, 4, (uint64_t)t * k + j);
			used[tg[j]] = 1;
		}
		/* Solve G c = z - W r (forward, then backward substitution). */
		for (uint32_t e = 0; e < E; e++)
			v[e] -= lg[(size_t)t * E + e];
		for (uint32_t i = 0; i < E; i++) {
			double s = v[i];
			for (uint32_t j = 0; j < i; j++)
				s -= L[(size_t)i * E + j] * v[j];
			v[i] = s / L[(size_t)i * E + i];
		}
		for (uint32_t i = E; i-- > 0;) {
			double s = v[i];
			for (uint32_t j = i + 1; j < E; j++)
				s -= L[(size_t)j * E + i] * v[j];
			v[i] = s / L[(size_t)i * E + i];
		}
		for (uint32_t e = 0; e < E; e++)
			lg[(size_t)t * E + e] = (float)v[e];
	}
	/* x += c W */
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)T, (int)H, (int)E, 1.0f, lg,
		    (int)E, W, (int)H, 1.0f, in->x, (int)H);
	in->touched = 0;
	for (uint32_t e = 0; e < E; e++)
		in->touched += used[e];
	rc = 0;
out:
	free(lg);
	free(p);
	free(v);
	free(used);
	return rc;
}

/* Fraction of the target (token, expert) pairs found in ids[T, k]. */
static double match_rate(const struct input *in, const int32_t *ids, uint32_t k)
{
	size_t hit = 0;
	for (size_t t = 0; t < in->T; t++)
		for (uint32_t j = 0; j < k; j++)
			for (uint32_t i = 0; i < k; i++)
				if (ids[t * k + i] == in->target[t * k + j]) {
					hit++;
					break;
				}
	return in->T ? (double)hit / ((double)in->T * k) : 1.0;
}

/* The baseline: what a user writes with BLAS ------------------------------ */

struct base {
	const struct moe_desc *d;
	const float *router, *sel_bias;
	const float *gate[MAX_COPIES], *up[MAX_COPIES], *down[MAX_COPIES];
	const float *sgate, *sup, *sdown;
	int n_copies;
	/* workspace for up to T_max tokens */
	float *logits, *wts, *rw, *xe, *g, *u, *dn, *sg, *su;
	int32_t *ids, *rows;
	size_t *count, *off;
};

static float silu(float v)
{
	return v / (1.0f + expf(-v));
}

/* Per token: scores, optional selection bias and group limit, top-k (ties to
 * the lower index), normalize, scale. */
static void base_route(const struct base *b, uint32_t T)
{
	const struct moe_desc *d = b->d;
	uint32_t E = d->n_experts, k = d->top_k, G = d->n_groups, per = E / G;
	float s[1024], sel[1024];
	for (uint32_t t = 0; t < T; t++) {
		const float *l = b->logits + (size_t)t * E;
		if (d->score == MOE_SCORE_SIGMOID) {
			for (uint32_t e = 0; e < E; e++)
				s[e] = 1.0f / (1.0f + expf(-l[e]));
		} else {
			float mx = l[0], sum = 0;
			for (uint32_t e = 1; e < E; e++)
				mx = fmaxf(mx, l[e]);
			for (uint32_t e = 0; e < E; e++)
				sum += s[e] = expf(l[e] - mx);
			for (uint32_t e = 0; e < E; e++)
				s[e] /= sum;
		}
		for (uint32_t e = 0; e < E; e++)
			sel[e] = s[e] + (b->sel_bias ? b->sel_bias[e] : 0.0f);
		if (G > 1) {
			float gs[64];
			for (uint32_t g = 0; g < G; g++) {
				float m1 = -INFINITY, m2 = -INFINITY;
				for (uint32_t e = g * per; e < (g + 1) * per; e++) {
					if (sel[e] > m1)
						m2 = m1, m1 = sel[e];
					else if (sel[e] > m2)
						m2 = sel[e];
				}
				gs[g] = d->group_score == MOE_GROUP_SCORE_SUM_TOP2 ? m1 + m2 : m1;
			}
			uint8_t keep[64] = {0};
			for (uint32_t r = 0; r < d->group_top; r++) {
				uint32_t best = G;
				for (uint32_t g = 0; g < G; g++)
					if (!keep[g] && (best == G || gs[g] > gs[best]))
						best = g;
				keep[best] = 1;
			}
			for (uint32_t e = 0; e < E; e++)
				if (!keep[e / per])
					sel[e] = -INFINITY;
		}
		int32_t *id = b->ids + (size_t)t * k;
		float *w = b->wts + (size_t)t * k, sum = 0;
		for (uint32_t j = 0; j < k; j++) {
			uint32_t best = E;
			for (uint32_t e = 0; e < E; e++)
				if (sel[e] != -INFINITY && (best == E || sel[e] > sel[best]))
					best = e;
			id[j] = (int32_t)best;
			w[j] = s[best];
			sel[best] = -INFINITY;
			sum += w[j];
		}
		float den = d->norm == MOE_NORM_SUM ? sum + d->norm_eps : 1.0f;
		for (uint32_t j = 0; j < k; j++)
			w[j] = w[j] / den * d->scale;
	}
}

/* c[m, n] = a[m, k] b[n, k]^T. One row goes to sgemv: OpenBLAS's sgemm
 * repacks the whole weight matrix for a single row and runs several times
 * slower than its sgemv there, and a user would not leave that on the table. */
static void matmul_t(int m, int n, int k, const float *a, const float *b, float *c)
{
	if (m == 1)
		cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, 1.0f, b, k, a, 1, 0.0f, c, 1);
	else
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, a, k, b, k,
			    0.0f, c, n);
}

static void base_forward(const struct base *b, int copy, const float *x, float *y, uint32_t T)
{
	const struct moe_desc *d = b->d;
	int H = (int)d->hidden, I = (int)d->intermediate, E = (int)d->n_experts;
	uint32_t k = d->top_k;
	memset(y, 0, (size_t)T * H * sizeof *y);
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, E, H, 1.0f, x, H, b->router, H,
		    0.0f, b->logits, E);
	base_route(b, T);
	/* Bucket the (token, expert) pairs by expert. */
	memset(b->count, 0, (size_t)E * sizeof *b->count);
	for (size_t i = 0; i < (size_t)T * k; i++)
		b->count[b->ids[i]]++;
	for (int e = 0, o = 0; e < E; e++) {
		b->off[e] = (size_t)o;
		o += (int)b->count[e];
	}
	for (size_t i = 0; i < (size_t)T * k; i++) {
		size_t at = b->off[b->ids[i]]++;
		b->rows[at] = (int32_t)(i / k);
		b->rw[at] = b->wts[i];
	}
	size_t start = 0;
	for (int e = 0; e < E; e++) {
		int n = (int)b->count[e];
		if (!n)
			continue;
		const int32_t *rows = b->rows + start;
		const float *rw = b->rw + start;
		start += (size_t)n;
		for (int r = 0; r < n; r++)
			memcpy(b->xe + (size_t)r * H, x + (size_t)rows[r] * H,
			       (size_t)H * sizeof *x);
		size_t ex = (size_t)e * I * H;
		matmul_t(n, I, H, b->xe, b->gate[copy] + ex, b->g);
		matmul_t(n, I, H, b->xe, b->up[copy] + ex, b->u);
		for (size_t i = 0; i < (size_t)n * I; i++)
			b->g[i] = silu(b->g[i]) * b->u[i];
		matmul_t(n, H, I, b->g, b->down[copy] + ex, b->dn);
		for (int r = 0; r < n; r++) {
			float *yr = y + (size_t)rows[r] * H;
			const float *dr = b->dn + (size_t)r * H;
			for (int h = 0; h < H; h++)
				yr[h] += rw[r] * dr[h];
		}
	}
	int Is = (int)moe_desc_shared_width(d);
	if (Is) {
		matmul_t((int)T, Is, H, x, b->sgate, b->sg);
		matmul_t((int)T, Is, H, x, b->sup, b->su);
		for (size_t i = 0; i < (size_t)T * Is; i++)
			b->sg[i] = silu(b->sg[i]) * b->su[i];
		matmul_t((int)T, H, Is, b->sg, b->sdown, b->dn);
		for (size_t i = 0; i < (size_t)T * H; i++)
			y[i] += b->dn[i];
	}
}

static void base_free(struct base *b)
{
	for (int c = 1; c < b->n_copies; c++) {
		free((void *)b->gate[c]);
		free((void *)b->up[c]);
		free((void *)b->down[c]);
	}
	free(b->logits), free(b->wts), free(b->rw), free(b->xe), free(b->g), free(b->u);
	free(b->dn), free(b->sg), free(b->su), free(b->ids), free(b->rows);
	free(b->count), free(b->off);
}

static int base_init(struct base *b, const struct moe_desc *d, const struct moe_ref_weights *w,
		     uint32_t T, int copies)
{
	memset(b, 0, sizeof *b);
	b->d = d;
	size_t E = d->n_experts, k = d->top_k, H = d->hidden, I = d->intermediate;
	size_t Is = moe_desc_shared_width(d);
	b->router = w->w[MOE_ROLE_ROUTER];
	b->sel_bias = w->w[MOE_ROLE_SELECT_BIAS];
	b->gate[0] = w->w[MOE_ROLE_GATE];
	b->up[0] = w->w[MOE_ROLE_UP];
	b->down[0] = w->w[MOE_ROLE_DOWN];
	b->sgate = w->w[MOE_ROLE_SHARED_GATE];
	b->sup = w->w[MOE_ROLE_SHARED_UP];
	b->sdown = w->w[MOE_ROLE_SHARED_DOWN];
	b->n_copies = 1;
	size_t ex = E * I * H * sizeof(float);
	for (int c = 1; c < copies; c++) {
		float *g = malloc(ex), *u = malloc(ex), *dn = malloc(ex);
		if (!g || !u || !dn) {
			free(g), free(u), free(dn);
			break;
		}
		memcpy(g, b->gate[0], ex), memcpy(u, b->up[0], ex), memcpy(dn, b->down[0], ex);
		b->gate[c] = g, b->up[c] = u, b->down[c] = dn;
		b->n_copies++;
	}
	size_t P = (size_t)T * k;
	b->logits = malloc(T * E * sizeof(float));
	b->wts = malloc(P * sizeof(float));
	b->rw = malloc(P * sizeof(float));
	b->xe = malloc(T * H * sizeof(float)); /* an expert gets each token at most once */
	b->g = malloc(T * I * sizeof(float));
	b->u = malloc(T * I * sizeof(float));
	b->dn = malloc(T * H * sizeof(float));
	b->sg = malloc((Is ? T * Is : 1) * sizeof(float));
	b->su = malloc((Is ? T * Is : 1) * sizeof(float));
	b->ids = malloc(P * sizeof(int32_t));
	b->rows = malloc(P * sizeof(int32_t));
	b->count = malloc(E * sizeof(size_t));
	b->off = malloc(E * sizeof(size_t));
	if (!b->logits || !b->wts || !b->rw || !b->xe || !b->g || !b->u || !b->dn || !b->sg ||
	    !b->su || !b->ids || !b->rows || !b->count || !b->off) {
		base_free(b);
		return -1;
	}
	return 0;
}

/* The generated layer ----------------------------------------------------- */

/* A model.so compiled for this machine, opened with dlopen, and `copies`
 * models with identical weights (cycled so that caches cannot serve repeats). */
struct gen {
	void *dl;
	const struct moe_info *(*info)(void);
	enum moe_status (*create)(moe_model **, const struct moe_create_opts *);
	void (*destroy)(moe_model *);
	enum moe_status (*init_random)(moe_model *, uint64_t);
	enum moe_status (*forward)(moe_model *, uint32_t, const void *, void *, size_t,
				   struct moe_routing *, const struct moe_fwd_opts *);
	const char *(*last_error)(void);
	moe_model *m[MAX_COPIES];
	int n_copies;
};

static void gen_close(struct gen *g)
{
	for (int c = 0; c < g->n_copies; c++)
		g->destroy(g->m[c]);
	g->n_copies = 0;
	if (g->dl)
		dlclose(g->dl);
	g->dl = NULL;
}

/* Compile d into dir/NAME.so with the CPU backend and open it. This is the
 * only place that knows how a model.so is produced. */
static int gen_open(const struct moe_desc *d, const char *dir, unsigned threads, int copies,
		    struct gen *g, char *err, size_t cap)
{
	memset(g, 0, sizeof *g);
	char path[4096];
	snprintf(path, sizeof path, "%s/%s.so", dir, d->name);
	struct moe_cpu_target t = {.cpu = "native", .opt_level = 3};
	if (moe_compile_cpu(d, &t, MOE_EMIT_SO, path, err, cap) != 0)
		return -1;
	g->dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	unlink(path);
	if (!g->dl) {
		errf(err, cap, "dlopen: %s", dlerror());
		return -1;
	}
#define SYM(field, name)                                                                           \
	do {                                                                                       \
		*(void **)&g->field = dlsym(g->dl, name);                                          \
		if (!g->field) {                                                                   \
			errf(err, cap, "model.so lacks %s", name);                                 \
			gen_close(g);                                                              \
			return -1;                                                                 \
		}                                                                                  \
	} while (0)
	SYM(info, "moe_info");
	SYM(create, "moe_create");
	SYM(destroy, "moe_destroy");
	SYM(init_random, "moe_init_random");
	SYM(forward, "moe_forward");
	SYM(last_error, "moe_last_error");
#undef SYM
	if (g->info()->abi_version != MOE_ABI_VERSION) {
		errf(err, cap, "model.so has ABI %u, expected %u", g->info()->abi_version,
		     MOE_ABI_VERSION);
		gen_close(g);
		return -1;
	}
	struct moe_create_opts o = {.threads = threads, .device = MOE_DEVICE_CPU};
	for (int c = 0; c < copies; c++) {
		moe_model *m = NULL;
		enum moe_status st = g->create(&m, &o);
		if (st == MOE_OK)
			st = g->init_random(m, SEED);
		if (st != MOE_OK) {
			if (c == 0) {
				errf(err, cap, "%s: %s", moe_status_name(st), g->last_error());
				if (m)
					g->destroy(m);
				gen_close(g);
				return -1;
			}
			if (m)
				g->destroy(m);
			break; /* fewer copies: out of memory */
		}
		g->m[g->n_copies++] = m;
	}
	return 0;
}

/* Timing ------------------------------------------------------------------ */

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* The median of v[0..n) (sorts v). */
static double median(double *v, int n)
{
	qsort(v, (size_t)n, sizeof *v, cmp_double);
	return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* The median of the timed runs of fn; the first run warms up (page faults,
 * frequency) and counts as a sample only when it is long enough for that not
 * to matter. With reps 0 the count adapts to about two seconds of runs. */
struct timed {
	int (*fn)(void *ctx, int copy);
	void *ctx;
	int n_copies;
	/* when set, runs shorter than NOW_PROBE_MAX_S each follow a reading of
	 * the probe, and *tp receives the median of (seconds x GB/s): the row's
	 * bytes over it are its share of the bandwidth of its own moments
	 * (else *tp = -1) */
	struct moe_dram_probe *probe;
	double *tp;
};

#define NOW_PROBE_MAX_S 0.05
/* the pause between a probe reading and the run: the read's pool spins about
 * 100 us (SPIN_POLLS pauses) before it sleeps; a longer pause lets this
 * virtual machine's cores go idle, and the run pays their wake-up (a 0.48 ms
 * layer took 0.88 ms after 1 ms idle) */
#define NOW_PROBE_SETTLE_US 150
/* the same-moment probe's buffer: the full probe's 1 GiB (8-30 ms a reading);
 * of 128 MiB, a quarter stays in a 32 MiB cache and reads 20 % fast */
#define NOW_PROBE_BYTES ((size_t)1 << 30)

/* Time the n functions of tm interleaved: every repetition runs each once,
 * in order, so that the changing load of a shared machine touches them
 * alike. med[i]: fn i's median seconds (-1 on a failure); pair (n == 2, may
 * be NULL): the median over the repetitions of t1 / t0, the same-moment ratio
 * of the two. Each probe-timed run (struct timed's probe) reads the probe
 * first; with n > 1 every other run waits NOW_PROBE_SETTLE_US first, so that no
 * layer shares the cores with the spinning pool of the one before. */
#define MAX_TIMED 2
static void time_medians(const struct timed *tm, int n, int reps, double *med, double *pair)
{
	double samples[MAX_TIMED][64], tp[MAX_TIMED][64];
	int ns = 0, n_tp[MAX_TIMED] = {0}, copy = 0, now[MAX_TIMED];
	double warm = 0, w[MAX_TIMED];
	for (int i = 0; i < n; i++)
		med[i] = -1;
	if (pair)
		*pair = -1;
	moe_progress_step(&progress, progress_done++, progress_total, progress_item);
	for (int i = 0; i < n; i++) {
		double t0 = moe_now();
		if (tm[i].fn(tm[i].ctx, copy))
			return;
		w[i] = moe_now() - t0;
		warm = w[i] > warm ? w[i] : warm;
	}
	if (reps <= 0) {
		if (warm >= 1.0) {
			for (int i = 0; i < n; i++)
				samples[i][0] = w[i];
			ns = 1;
			reps = warm > 4.0 ? 1 : 2;
		} else {
			reps = warm > 0 ? (int)(2.0 / (n * warm)) : 25;
			reps = reps < 3 ? 3 : reps > 25 ? 25 : reps;
		}
	}
	if (reps > 60)
		reps = 60;
	/* Every copy the repetitions use runs once untimed first: a model's
	 * first forward touches its workspace for the first time (page
	 * faults: a quarter of a qwen3 T = 4096 int8 forward), which a serving
	 * loop pays once, not per call. */
	for (int i = 0; i < n; i++) {
		for (int c = 1; c <= reps && c < tm[i].n_copies; c++)
			if (tm[i].fn(tm[i].ctx, c))
				return;
		now[i] = tm[i].probe && tm[i].tp && w[i] < NOW_PROBE_MAX_S;
		if (tm[i].tp)
			*tm[i].tp = -1;
	}
	for (int r = 0; r < reps; r++, ns++) {
		copy++;
		for (int i = 0; i < n; i++) {
			double gbps = 0;
			if (now[i]) {
				gbps = moe_dram_probe_read(tm[i].probe);
				/* the read's pool spins a while before it sleeps: run
				 * after that, or the layer shares the cores with it (a
				 * 0.34 ms layer took 0.48-0.50 ms right after the read) */
				usleep(NOW_PROBE_SETTLE_US);
			} else if (n > 1) {
				usleep(NOW_PROBE_SETTLE_US);
			}
			double t0 = moe_now();
			if (tm[i].fn(tm[i].ctx, copy % tm[i].n_copies))
				return;
			samples[i][ns] = moe_now() - t0;
			if (now[i])
				tp[i][n_tp[i]++] = samples[i][ns] * gbps;
		}
	}
	if (pair && n == 2) {
		double q[64];
		for (int r = 0; r < ns; r++)
			q[r] = samples[1][r] / samples[0][r];
		*pair = median(q, ns);
	}
	for (int i = 0; i < n; i++) {
		if (n_tp[i])
			*tm[i].tp = median(tp[i], n_tp[i]);
		med[i] = median(samples[i], ns);
	}
}

static double time_median(const struct timed *tm, int reps)
{
	double m;
	time_medians(tm, 1, reps, &m, NULL);
	return m;
}

/* Output ------------------------------------------------------------------ */

static void print_header(FILE *out)
{
	moe_progress_clear(&progress);
	fprintf(out, "%-9s %5s %4s %-7s %9s %8s %7s %6s %6s %5s %9s %8s %7s %6s %8s\n", "shape",
		"T", "wt", "routing", "ms", "GFLOP/s", "GB/s", "%peakF", "%peakB", "%nowB",
		"base_ms", "base_GF", "speedup", "match", "check");
}

static void fmt_num(char *buf, size_t cap, double v, const char *fmt)
{
	if (v < 0 || !isfinite(v))
		snprintf(buf, cap, "-");
	else
		snprintf(buf, cap, fmt, v);
}

struct row {
	const char *shape;
	uint32_t T;
	const char *wname; /* the weight format */
	enum routing routing;
	double flops, bytes; /* of one forward */
	struct result gen, base;
};

#define MAX_ROWS ((int)(N_SHAPES * MAX_TOKENS_LIST * ROUTE_COUNT * N_WFMT))

struct table {
	struct row r[MAX_ROWS];
	int n;
};

/* The derived columns of a row; < 0 where a side was not measured. */
struct row_metrics {
	double gms, gf, gb, pf, pb, pn, bms, bgf, sp;
};

/* The percentage of the bandwidth of its own moments that a row moving
 * `bytes` read (tp: its median seconds x same-moment probe GB/s), or -1. */
static double pct_now(double bytes, double tp)
{
	return tp > 0 ? 100 * bytes * 1e-9 / tp : -1;
}

static struct row_metrics row_metrics(const struct row *r, const struct machine *mc)
{
	struct row_metrics k;
	k.gms = r->gen.ms;
	k.bms = r->base.ms;
	k.gf = k.gms > 0 ? r->flops / (k.gms * 1e-3) * 1e-9 : -1;
	k.gb = k.gms > 0 ? r->bytes / (k.gms * 1e-3) * 1e-9 : -1;
	k.pf = k.gf > 0 && mc->peak_gflops > 0 ? 100 * k.gf / mc->peak_gflops : -1;
	k.pb = k.gb > 0 && mc->dram_gbps > 0 ? 100 * k.gb / mc->dram_gbps : -1;
	k.pn = k.gms > 0 ? pct_now(r->bytes, r->gen.tp) : -1;
	k.bgf = k.bms > 0 ? r->flops / (k.bms * 1e-3) * 1e-9 : -1;
	k.sp = k.gms > 0 && k.bms > 0 ? k.bms / k.gms : -1;
	return k;
}

static void emit_row(const struct row *r, const struct machine *mc, FILE *out, FILE *csv)
{
	struct row_metrics k = row_metrics(r, mc);
	double gms = k.gms, bms = k.bms, gf = k.gf, gb = k.gb, pf = k.pf, pb = k.pb, bgf = k.bgf,
	       sp = k.sp;
	char c[11][32];
	fmt_num(c[0], 32, gms, "%.3f");
	fmt_num(c[1], 32, gf, "%.1f");
	fmt_num(c[2], 32, gb, "%.1f");
	fmt_num(c[3], 32, pf, "%.1f");
	fmt_num(c[4], 32, pb, "%.1f");
	fmt_num(c[5], 32, bms, "%.3f");
	fmt_num(c[6], 32, bgf, "%.1f");
	fmt_num(c[7], 32, sp, "%.2f");
	double match = r->gen.ms >= 0 ? r->gen.match : r->base.match;
	fmt_num(c[8], 32, match * 100, "%.1f%%");
	fmt_num(c[9], 32, r->gen.check, "%.1e");
	fmt_num(c[10], 32, k.pn, "%.1f");
	if (out) {
		moe_progress_clear(&progress);
		fprintf(out, "%-9s %5u %4s %-7s %9s %8s %7s %6s %6s %5s %9s %8s %7s %6s %8s\n",
			r->shape, r->T, r->wname, routing_names[r->routing], c[0], c[1], c[2], c[3],
			c[4], c[10], c[5], c[6], c[7], c[8], c[9]);
		fflush(out);
	}
	if (csv) {
		/* Empty fields where a side was not measured. */
		for (int i = 0; i < 11; i++)
			if (!strcmp(c[i], "-"))
				c[i][0] = 0;
		fprintf(csv, "%s,%u,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,\n", r->shape, r->T, r->wname,
			routing_names[r->routing], c[0], c[1], c[2], c[3], c[4], c[5], c[7], c[10]);
	}
}

/* One shape ---------------------------------------------------------------- */

struct base_ctx {
	struct base *b;
	const struct input *in;
	float *y;
};

static int base_run(void *ctx, int copy)
{
	struct base_ctx *c = ctx;
	base_forward(c->b, copy, c->in->x, c->y, c->in->T);
	return 0;
}

struct gen_ctx {
	struct gen *g;
	const struct input *in;
	float *y;
	char *err;
	size_t cap;
};

static int gen_run(void *ctx, int copy)
{
	struct gen_ctx *c = ctx;
	enum moe_status st = c->g->forward(c->g->m[copy], 0, c->in->x, c->y, c->in->T, NULL, NULL);
	if (st != MOE_OK) {
		errf(c->err, c->cap, "moe_forward: %s: %s", moe_status_name(st),
		     c->g->last_error());
		return -1;
	}
	return 0;
}

/* moe_ref_weights_random, one role per task: an element's value depends
 * only on (seed, layer, role, index), so the roles can be drawn in parallel
 * and still equal what moe_init_random gives the generated model. */
struct rand_job {
	const struct moe_desc *d;
	struct moe_ref_weights *w;
	int roles[MOE_ROLE_COUNT];
};

static void rand_task(void *ctx, size_t task, unsigned thread)
{
	(void)thread;
	struct rand_job *j = ctx;
	struct moe_ref_weights one = {0};
	one.w[j->roles[task]] = j->w->w[j->roles[task]];
	moe_ref_weights_random(j->d, SEED, 0, &one);
}

static void random_weights(const struct moe_desc *d, struct moe_ref_weights *w,
			   struct moe_pool *pool)
{
	struct rand_job j = {d, w, {0}};
	size_t n = 0;
	/* Largest first, so the big roles start together. */
	static const int order[] = {MOE_ROLE_GATE, MOE_ROLE_UP, MOE_ROLE_DOWN};
	for (size_t i = 0; i < sizeof order / sizeof *order; i++)
		if (w->w[order[i]])
			j.roles[n++] = order[i];
	for (int r = 0; r < MOE_ROLE_COUNT; r++)
		if (w->w[r] && r != MOE_ROLE_GATE && r != MOE_ROLE_UP && r != MOE_ROLE_DOWN)
			j.roles[n++] = r;
	moe_pool_run(pool, n, rand_task, &j);
}

/* How many copies of the weights keep repeats from being served by the
 * last-level cache: the bytes one forward reads at T = 1, times the copies,
 * should exceed four times the cache. Twice would do for a true LRU cache;
 * the margin covers victim caches with other replacement policies, which can
 * keep part of a cyclic stream. */
static int copies_for(const struct moe_desc *d, double wbytes, size_t llc, int forced)
{
	if (forced)
		return forced;
	double touched = layer_bytes(d, 1, d->top_k, wbytes);
	int c = (int)ceil(4.0 * (double)llc / touched);
	return c < 1 ? 1 : c > MAX_COPIES ? MAX_COPIES : c;
}

static void bench_shape(const struct shape *s, const struct opts *o, const struct machine *mc,
			struct moe_pool *pool, const char *tmpdir, struct table *tab)
{
	struct moe_desc *d = malloc(sizeof *d), *dg = malloc(sizeof *dg);
	struct input in[MAX_TOKENS_LIST * ROUTE_COUNT];
	int n_in = 0;
	struct result base[MAX_TOKENS_LIST * ROUTE_COUNT];
	struct moe_ref_weights w = {0};
	double *L = NULL;
	float *y = NULL;
	struct base b;
	int printed_header = 0;
	char err[2048];
	if (!d || !dg)
		goto out;
	shape_desc(s, &wfmts[0], d);
	uint32_t T_max = 0;
	for (int i = 0; i < o->n_tokens; i++)
		T_max = o->tokens[i] > T_max ? o->tokens[i] : T_max;

	double need = total_params(d) * 4 + 4.0 * T_max * d->hidden * 6;
	double avail = mem_available();
	say("\n%s: E=%u k=%u H=%u I=%u%s; f32 weights %.2f GB\n", s->label, s->E, s->k, s->H, s->I,
	    s->deepseek ? ", sigmoid, groups 8/4 sum_top2, select bias, 1 shared" : "",
	    total_params(d) * 4e-9);
	if (avail > 0 && need > 0.9 * avail) {
		say("  skipped: needs about %.1f GB, %.1f GB available\n", need * 1e-9,
		    avail * 1e-9);
		goto out;
	}
	double t0 = moe_now();
	if (moe_ref_weights_alloc(d, &w) != MOE_OK) {
		say("  skipped: out of memory for the weights\n");
		goto out;
	}
	random_weights(d, &w, pool);
	L = malloc((size_t)d->n_experts * d->n_experts * sizeof *L);
	if (!L || gram_cholesky(w.w[MOE_ROLE_ROUTER], d->n_experts, d->hidden, L)) {
		say("  skipped: cannot prepare the routed inputs\n");
		goto out;
	}
	for (int r = 0; r < ROUTE_COUNT; r++) {
		if (!o->routing_on[r])
			continue;
		for (int i = 0; i < o->n_tokens; i++) {
			struct input *p = &in[n_in];
			memset(p, 0, sizeof *p);
			p->T = o->tokens[i];
			p->routing = (enum routing)r;
			base[n_in] = (struct result){-1, -1, -1, -1};
			n_in++;
			if (make_input(d, w.w[MOE_ROLE_ROUTER], L, p)) {
				say("  skipped: out of memory for the inputs\n");
				goto out;
			}
		}
	}
	y = malloc((size_t)T_max * d->hidden * sizeof *y);
	if (!y)
		goto out;
	say("  setup (random weights, routed inputs) %.1f s\n", moe_now() - t0);

	/* Baseline, f32. */
	int bc = copies_for(d, 4, mc->llc, o->copies);
	if (base_init(&b, d, &w, T_max, bc) == 0) {
		for (int i = 0; i < n_in; i++) {
			struct base_ctx c = {&b, &in[i], y};
			struct timed tm = {base_run, &c, b.n_copies, NULL, NULL};
			snprintf(progress_item, sizeof progress_item, "(%s T=%u %s, baseline)",
				 s->name, in[i].T, routing_names[in[i].routing]);
			base[i].ms = time_median(&tm, o->reps) * 1e3;
			base[i].match = match_rate(&in[i], b.ids, d->top_k);
			/* Keep the output to compare the generated layer with. */
			size_t ny = (size_t)in[i].T * d->hidden;
			in[i].y_base = malloc(ny * sizeof(float));
			if (in[i].y_base)
				memcpy(in[i].y_base, y, ny * sizeof(float));
		}
		say("  baseline: %d weight cop%s, OpenBLAS %u threads\n", b.n_copies,
		    b.n_copies == 1 ? "y" : "ies", o->threads);
		base_free(&b);
	} else {
		say("  baseline: out of memory\n");
	}
	moe_ref_weights_free(&w);

	for (int wt = 0; wt < N_WFMT; wt++) {
		if (!o->fmt_on[wt])
			continue;
		const char *wname = wfmts[wt].name;
		shape_desc(s, &wfmts[wt], dg);
		struct gen g = {0};
		int have_gen = 0;
		struct result res[MAX_TOKENS_LIST * ROUTE_COUNT];
		for (int i = 0; i < n_in; i++)
			res[i] = (struct result){-1, -1, -1, -1};
		if (o->generated) {
			int copies = copies_for(dg, ffn_wbytes(dg), mc->llc, o->copies);
			/* the packed copies, and one f32 draw (quantized: its codes too) */
			double gneed = total_params(dg) * (ffn_wbytes(dg) * copies + 4 +
							   (moe_desc_quantized(dg) ? 2 : 0));
			avail = mem_available();
			t0 = moe_now();
			if (avail > 0 && gneed > 0.9 * avail)
				say("  generated %s: skipped, needs about %.1f GB, %.1f GB "
				    "available\n",
				    wname, gneed * 1e-9, avail * 1e-9);
			else if (gen_open(dg, tmpdir, o->threads, copies, &g, err, sizeof err))
				say("  generated %s: unavailable: %s\n", wname, err);
			else {
				have_gen = 1;
				say("  generated %s: compiled and initialized in %.1f s, %d "
				    "weight cop%s\n",
				    wname, moe_now() - t0, g.n_copies,
				    g.n_copies == 1 ? "y" : "ies");
			}
		}
		for (int i = 0; have_gen && i < n_in; i++) {
			struct input *p = &in[i];
			/* Routing and output check on an untimed call. */
			int32_t *ids = malloc((size_t)p->T * d->top_k * sizeof *ids);
			struct moe_routing rt = {.expert_ids = ids};
			enum moe_status st =
			    ids ? g.forward(g.m[0], 0, p->x, y, p->T, &rt, NULL) : MOE_ERR_NOMEM;
			if (st != MOE_OK) {
				say("  generated %s T=%u: %s: %s\n", wname, p->T,
				    moe_status_name(st), g.last_error());
				free(ids);
				continue;
			}
			res[i].match = match_rate(p, ids, d->top_k);
			free(ids);
			/* the baseline runs the unquantized f32 draw: no output check
			 * for kept-quantized weights (test_quant checks them) */
			if (p->y_base && !moe_desc_quantized(dg)) {
				double mx = 0, md = 0;
				for (size_t j = 0; j < (size_t)p->T * d->hidden; j++) {
					mx = fmax(mx, fabs(p->y_base[j]));
					md = fmax(md, fabs((double)y[j] - p->y_base[j]));
				}
				res[i].check = mx > 0 ? md / mx : md;
			}
			struct gen_ctx c = {&g, p, y, err, sizeof err};
			struct timed tm = {gen_run, &c, g.n_copies, mc->now, &res[i].tp};
			snprintf(progress_item, sizeof progress_item, "(%s T=%u %s %s)", s->name,
				 p->T, routing_names[p->routing], wname);
			res[i].ms = time_median(&tm, o->reps) * 1e3;
			if (res[i].ms < 0)
				say("  generated %s T=%u: %s\n", wname, p->T, err);
		}
		if (have_gen)
			gen_close(&g);
		if (!printed_header++)
			print_header(stdout);
		for (int i = 0; i < n_in && tab->n < MAX_ROWS; i++) {
			struct row *r = &tab->r[tab->n++];
			r->shape = s->name;
			r->T = in[i].T;
			r->wname = wname;
			r->routing = in[i].routing;
			r->flops = layer_flops(dg, in[i].T);
			r->bytes = layer_bytes(dg, in[i].T, in[i].touched, ffn_wbytes(dg));
			r->gen = res[i];
			r->base = base[i];
			emit_row(r, mc, stdout, NULL);
		}
	}
out:
	for (int i = 0; i < n_in; i++) {
		free(in[i].x);
		free(in[i].target);
		free(in[i].y_base);
	}
	moe_ref_weights_free(&w);
	free(L);
	free(y);
	free(d);
	free(dg);
}

/* Research modes ---------------------------------------------------------- */

/* One layer per research router, the shape of its specs/ file scaled where
 * the full size would not set up in seconds (docs/benchmarks.md). */
struct mode {
	const char *name;  /* --modes and the csv */
	const char *label; /* the spec it follows */
	enum moe_mode mode;
	enum moe_dtype wt;
	uint32_t H, E, I, k;
	enum moe_kind kind;
	enum moe_act act;
	int training; /* forward with opts.training = 1 (noise drawn) */
	uint32_t R;   /* product key: sub_keys */
	/* The token-choice twin timed after the mode: the same experts behind
	 * a plain softmax top-twin_k router (the mode's assignments per token),
	 * inference, no capacity; NULL: none (soft, product key). */
	const char *twin;
	uint32_t twin_k;
	uint32_t group; /* soft: tokens per group (0: one group) */
};

static const struct mode modes[] = {
    {"hier", "shazeer-hierarchical", MOE_MODE_HIERARCHICAL, MOE_DTYPE_F32, 512, 256, 1024, 4,
     MOE_KIND_MLP, MOE_ACT_RELU, 0, 0, "hier-tc", 4, 0},
    {"sparsemixer", "phi-3.5-moe / 4", MOE_MODE_SPARSEMIXER, MOE_DTYPE_BF16, 1024, 16, 1600, 2,
     MOE_KIND_GLU, MOE_ACT_SILU, 0, 0, "sparsemixer-tc", 2, 0},
    {"noisy", "noisy-top-k, training", MOE_MODE_TOKEN_CHOICE, MOE_DTYPE_F32, 512, 32, 1024, 4,
     MOE_KIND_MLP, MOE_ACT_RELU, 1, 0, "noisy-tc", 4, 0},
    {"ec", "expert-choice, E 64 -> 16", MOE_MODE_EXPERT_CHOICE, MOE_DTYPE_F32, 768, 16, 3072, 0,
     MOE_KIND_MLP, MOE_ACT_GELU, 0, 0, "ec-tc", 2, 0},
    {"soft", "soft-moe, E 128 -> 16", MOE_MODE_SOFT, MOE_DTYPE_F32, 768, 16, 3072, 0, MOE_KIND_MLP,
     MOE_ACT_GELU, 0, 0, NULL, 0, 0},
    {"soft-g", "soft-moe, E 128 -> 16, groups of 256 tokens", MOE_MODE_SOFT, MOE_DTYPE_F32, 768, 16,
     3072, 0, MOE_KIND_MLP, MOE_ACT_GELU, 0, 0, NULL, 0, 256},
    {"peer", "peer-1m, R 1024 -> 128", MOE_MODE_PRODUCT_KEY, MOE_DTYPE_F32, 1024, 0, 1, 128,
     MOE_KIND_SINGLE_NEURON, MOE_ACT_RELU, 0, 128, NULL, 0, 0},
    {"peer-1m", "peer-1m, full size", MOE_MODE_PRODUCT_KEY, MOE_DTYPE_F32, 1024, 0, 1, 128,
     MOE_KIND_SINGLE_NEURON, MOE_ACT_RELU, 0, 1024, NULL, 0, 0},
};
#define N_MODES (sizeof modes / sizeof *modes)
_Static_assert(N_MODES == N_MODE_NAMES, "modes[] and mode_names[] list the same modes");
#define PK_HEADS 8
#define PK_TOP_K 16
#define PK_QUERY_DIM 256
#define HIER_GROUPS 16

static void mode_desc(const struct mode *md, struct moe_desc *d)
{
	memset(d, 0, sizeof *d);
	d->version = MOE_DESC_VERSION;
	snprintf(d->name, sizeof d->name, "bench-%s", md->name);
	for (char *c = d->name; *c; c++)
		if (*c == '-' && c > d->name + 5)
			*c = '_';
	d->hidden = md->H;
	d->n_layers = 1;
	d->n_moe_layers = 1;
	d->dense_kind = MOE_KIND_MLP;
	d->dense_act = MOE_ACT_GELU;
	d->attn = MOE_ATTN_NONE;
	d->weight_dtype = md->wt;
	d->act_dtype = MOE_DTYPE_F32;
	d->mode = md->mode;
	d->score = MOE_SCORE_SOFTMAX;
	d->top_k = md->k;
	d->norm = MOE_NORM_NONE;
	d->norm_p = 1;
	d->scale = 1;
	d->n_groups = 1;
	d->group_top = 1;
	d->group_score = MOE_GROUP_SCORE_MAX;
	d->capacity = MOE_CAPACITY_NONE;
	d->priority = MOE_PRIORITY_POSITION;
	d->overflow = MOE_OVERFLOW_DROP;
	d->noise = MOE_NOISE_NONE;
	d->apply_to = MOE_APPLY_OUTPUT;
	d->kind = md->kind;
	d->n_experts = md->E;
	d->intermediate = md->I;
	d->act = md->act;
	d->split = 1;
	d->shared_kind = MOE_KIND_GLU;
	d->shared_act = MOE_ACT_SILU;
	d->shared_gate = MOE_SHARED_GATE_NONE;
	switch (md->mode) {
	case MOE_MODE_HIERARCHICAL:
		d->noise = MOE_NOISE_LEARNED_GAUSSIAN; /* drawn in training only */
		d->n_levels = 2;
		d->levels[0] = (struct moe_level){HIER_GROUPS, 2};
		d->levels[1] = (struct moe_level){0, 2};
		break;
	case MOE_MODE_SPARSEMIXER:
		d->sparsemixer_eps = 0.01f;
		d->noise = MOE_NOISE_JITTER; /* training only */
		d->jitter_eps = 0.01f;
		break;
	case MOE_MODE_TOKEN_CHOICE:
		d->norm = MOE_NORM_SUM;
		d->noise = MOE_NOISE_LEARNED_GAUSSIAN;
		d->capacity = MOE_CAPACITY_FACTOR;
		d->capacity_factor = 1.25f;
		break;
	case MOE_MODE_EXPERT_CHOICE:
		d->ec_capacity_factor = 2;
		break;
	case MOE_MODE_SOFT:
		d->soft_slots_per_expert = 1;
		d->soft_group = md->group;
		break;
	case MOE_MODE_PRODUCT_KEY:
		d->n_experts = md->R * md->R;
		d->pk_sub_keys = md->R;
		d->pk_heads = PK_HEADS;
		d->pk_top_k = PK_TOP_K;
		d->pk_query_dim = PK_QUERY_DIM;
		d->pk_score = MOE_SCORE_SOFTMAX;
		d->pk_query_bn = 1;
		break;
	default:
		break;
	}
}

/* md's token-choice twin: its experts behind softmax top-twin_k, inference,
 * no noise, no capacity. */
static void twin_desc(const struct mode *md, struct moe_desc *d)
{
	mode_desc(md, d);
	snprintf(d->name, sizeof d->name, "bench_%s_tc", md->name);
	d->mode = MOE_MODE_TOKEN_CHOICE;
	d->score = MOE_SCORE_SOFTMAX;
	d->top_k = md->twin_k;
	d->norm = MOE_NORM_NONE;
	d->noise = MOE_NOISE_NONE;
	d->capacity = MOE_CAPACITY_NONE;
	d->n_levels = 0;
	memset(d->levels, 0, sizeof d->levels);
	d->sparsemixer_eps = 0;
	d->ec_capacity_factor = 0;
}

/* Weight matrices per expert (GLU: gate, up, down; MLP: up, down). */
static double mode_mats(const struct moe_desc *d)
{
	return d->kind == MOE_KIND_GLU ? 3 : 2;
}

/* The router's f32 bytes: the matrices every token reads whatever it picks
 * (hierarchical: both levels; learned noise in training: the noise
 * projection; soft: the slot parameters; product key: the query projection
 * and its bias, and the two sub-key sets). */
static double mode_router_bytes(const struct moe_desc *d, int training)
{
	double H = d->hidden, E = d->n_experts;
	switch (d->mode) {
	case MOE_MODE_HIERARCHICAL:
		return 4 * H * (E + d->levels[0].groups);
	case MOE_MODE_PRODUCT_KEY: {
		double Q = (double)d->pk_heads * d->pk_query_dim;
		return 4 * (Q * H + Q) + 4 * 2.0 * d->pk_sub_keys * (d->pk_query_dim / 2);
	}
	case MOE_MODE_SOFT:
		return 4 * H * E * d->soft_slots_per_expert;
	default:
		return 4 * H * E * (training && d->noise == MOE_NOISE_LEARNED_GAUSSIAN ? 2 : 1);
	}
}

static double mode_params(const struct moe_desc *d, int training)
{
	double H = d->hidden, E = d->n_experts, I = d->intermediate;
	if (d->mode == MOE_MODE_PRODUCT_KEY)
		return mode_router_bytes(d, 0) / 4 + 2 * E * H;
	return mode_router_bytes(d, training || d->noise == MOE_NOISE_LEARNED_GAUSSIAN) / 4 +
	       E * mode_mats(d) * H * I;
}

/* FLOPs of one forward (multiply-adds count 2, elementwise work 0): the
 * router's products, then 2 * mats * H * I per (row, expert) assignment the
 * layer actually ran (A: after capacity, expert choice's C per expert, soft's
 * slots); product key: the query 2 H Q, the sub-key scores 2 heads R d, and
 * 4 H per retrieved neuron (u . x and the scaled v). */
static double mode_flops(const struct moe_desc *d, int training, double T, double A)
{
	double H = d->hidden, E = d->n_experts, I = d->intermediate;
	double expert = A * 2 * mode_mats(d) * H * I;
	switch (d->mode) {
	case MOE_MODE_HIERARCHICAL:
		return T * 2 * H * (E + d->levels[0].groups) + expert;
	case MOE_MODE_PRODUCT_KEY: {
		double Q = (double)d->pk_heads * d->pk_query_dim;
		return T * (2 * H * Q + 2.0 * d->pk_heads * d->pk_sub_keys * d->pk_query_dim) +
		       A * 4 * H;
	}
	case MOE_MODE_SOFT: {
		/* logits, slot inputs D^T x and the combine C Y: 2 T S H each */
		double S = E * d->soft_slots_per_expert;
		return 3 * 2 * T * S * H + expert;
	}
	default:
		return T * 2 * H * E *
			   (training && d->noise == MOE_NOISE_LEARNED_GAUSSIAN ? 2 : 1) +
		       expert;
	}
}

/* Bytes of one forward: the router's, each distinct expert (or neuron) that
 * ran once, the input and the output. */
static double mode_bytes(const struct moe_desc *d, int training, double T, double touched)
{
	double H = d->hidden, I = d->intermediate, wb = dtype_bytes(d->weight_dtype);
	double per = d->mode == MOE_MODE_PRODUCT_KEY ? 2 * H * wb : mode_mats(d) * H * I * wb;
	return mode_router_bytes(d, training) + touched * per + 2 * T * H * 4;
}

struct mode_row {
	const char *mode;
	uint32_t T;
	enum moe_dtype wt;
	double ms, flops, bytes;
	double touched, assigned; /* distinct experts, (row, expert) pairs */
	/* product key only (< 0: not measured): the forward and its two phases,
	 * timed interleaved on one model */
	double fwd_ms, route_ms, experts_ms;
	double tp; /* struct result's */
	/* a mode with a twin: its GFLOP/s over the twin's, in %, the median over
	 * repetitions that ran the two back to back (-1: none) */
	double vs_twin;
};

#define MAX_MODE_ROWS ((int)(N_MODES * MAX_TOKENS_LIST))

static void print_mode_header(FILE *out)
{
	moe_progress_clear(&progress);
	fprintf(out, "%-14s %5s %4s %10s %8s %7s %6s %6s %5s %10s %9s %6s\n", "mode", "T", "wt",
		"ms", "GFLOP/s", "GB/s", "%peakF", "%peakB", "%nowB", "tokens/s", "experts",
		"%twin");
}

static void emit_mode_row(const struct mode_row *r, const struct machine *mc, FILE *out, FILE *csv)
{
	double s = r->ms * 1e-3;
	double gf = r->ms > 0 ? r->flops / s * 1e-9 : -1, gb = r->ms > 0 ? r->bytes / s * 1e-9 : -1;
	double pf = gf > 0 && mc->peak_gflops > 0 ? 100 * gf / mc->peak_gflops : -1;
	double pb = gb > 0 && mc->dram_gbps > 0 ? 100 * gb / mc->dram_gbps : -1;
	double pn = r->ms > 0 ? pct_now(r->bytes, r->tp) : -1;
	double tps = r->ms > 0 ? r->T / s : -1;
	char c[8][32];
	fmt_num(c[7], 32, r->vs_twin, "%.1f");
	fmt_num(c[0], 32, r->ms, "%.3f");
	fmt_num(c[1], 32, gf, "%.1f");
	fmt_num(c[2], 32, gb, "%.1f");
	fmt_num(c[3], 32, pf, "%.1f");
	fmt_num(c[4], 32, pb, "%.1f");
	fmt_num(c[5], 32, tps, "%.0f");
	fmt_num(c[6], 32, pn, "%.1f");
	if (out) {
		moe_progress_clear(&progress);
		fprintf(out, "%-14s %5u %4s %10s %8s %7s %6s %6s %5s %10s %9.0f %6s\n", r->mode,
			r->T, moe_dtype_names[r->wt], c[0], c[1], c[2], c[3], c[4], c[6], c[5],
			r->touched, c[7]);
		if (r->route_ms >= 0) {
			double tot = r->route_ms + r->experts_ms;
			fprintf(out,
				"%-11s   interleaved, one model: forward %.3f ms; alone: retrieval "
				"%.3f ms (%.0f%%), expert gathers %.3f ms (%.0f%%)\n",
				"", r->fwd_ms, r->route_ms, tot > 0 ? 100 * r->route_ms / tot : 0,
				r->experts_ms, tot > 0 ? 100 * r->experts_ms / tot : 0);
		}
		fflush(out);
	}
	if (csv) {
		for (int i = 0; i < 8; i++)
			if (!strcmp(c[i], "-"))
				c[i][0] = 0;
		/* the shape columns, with the mode as the routing */
		fprintf(csv, "%s,%u,%s,mode,%s,%s,%s,%s,%s,,,%s,%s\n", r->mode, r->T,
			moe_dtype_names[r->wt], c[0], c[1], c[2], c[3], c[4], c[6], c[7]);
	}
}

/* The two phases of the product-key layer, each over all tokens in tasks of
 * 8 tokens like the runtime's: the generated moe_pk_route alone, then the
 * generated moe_pk_experts alone on its selections. The model's internal
 * table (moe_kernels.h) gives the functions and the packed weights. */
struct pk_phase {
	const struct moe_model *m;
	const float *x;
	float *y, *q; /* q: the queries, the model's workspace */
	int32_t *ids;
	float *wts;
	size_t T;
	int experts;
};

#define PK_TASK_TOKENS 8

static void pk_task(void *ctx, size_t task, unsigned thread)
{
	(void)thread;
	struct pk_phase *p = ctx;
	const struct moe_layer_w *lw = &p->m->layers[0];
	int64_t t0 = (int64_t)task * PK_TASK_TOKENS, t1 = t0 + PK_TASK_TOKENS;
	if (t1 > (int64_t)p->T)
		t1 = (int64_t)p->T;
	moe_pk_experts_fn *experts = MOE_KERNEL(p->m, PK_EXPERTS);
	moe_pk_query_fn *query = MOE_KERNEL(p->m, PK_QUERY);
	moe_pk_route_fn *route = MOE_KERNEL(p->m, PK_ROUTE);
	if (p->experts) {
		experts(p->x, t0, t1, p->ids, p->wts, lw->pk_u, lw->pk_v, p->y);
	} else {
		const struct moe_desc *d = p->m->d;
		query(p->x, t0, t1, 0, moe_router_blocks(d->pk_heads * d->pk_query_dim),
		      lw->pk_query, lw->pk_qbias, p->q);
		route(p->q, t0, t1, lw->pk_keys, p->ids, p->wts);
	}
}

/* The forward and its two phases alone, interleaved in every repetition on
 * the same model (copy 0), so that a changing load on a shared machine
 * touches all three alike; the medians. */
static void pk_split(struct gen *g, const float *x, float *y, int32_t *ids, float *wts, uint32_t T,
		     const struct moe_fwd_opts *fo, struct moe_pool *pool, int reps,
		     struct mode_row *r)
{
	double f[25], a[25], b[25];
	const struct moe_model *m = (const struct moe_model *)g->m[0];
	struct pk_phase ph = {m, x, y, m->ws.logits, ids, wts, T, 0};
	size_t tasks = (T + PK_TASK_TOKENS - 1) / PK_TASK_TOKENS;
	int n = reps > 0 ? reps : r->ms > 1000 ? 3 : r->ms > 100 ? 5 : 15;
	n = n > 25 ? 25 : n;
	for (int i = 0; i < n; i++) {
		double t0 = moe_now();
		if (g->forward(g->m[0], 0, x, y, T, NULL, fo) != MOE_OK)
			return;
		double t1 = moe_now();
		ph.experts = 0;
		moe_pool_run(pool, tasks, pk_task, &ph);
		double t2 = moe_now();
		ph.experts = 1;
		moe_pool_run(pool, tasks, pk_task, &ph);
		double t3 = moe_now();
		f[i] = t1 - t0, a[i] = t2 - t1, b[i] = t3 - t2;
	}
	qsort(f, (size_t)n, sizeof *f, cmp_double);
	qsort(a, (size_t)n, sizeof *a, cmp_double);
	qsort(b, (size_t)n, sizeof *b, cmp_double);
	r->fwd_ms = f[n / 2] * 1e3;
	r->route_ms = a[n / 2] * 1e3;
	r->experts_ms = b[n / 2] * 1e3;
}

struct mode_ctx {
	struct gen *g;
	const float *x;
	float *y;
	uint32_t T;
	const struct moe_fwd_opts *fo;
	char *err;
	size_t cap;
};

static int mode_run(void *ctx, int copy)
{
	struct mode_ctx *c = ctx;
	enum moe_status st = c->g->forward(c->g->m[copy], 0, c->x, c->y, c->T, NULL, c->fo);
	if (st != MOE_OK) {
		errf(c->err, c->cap, "moe_forward: %s: %s", moe_status_name(st),
		     c->g->last_error());
		return -1;
	}
	return 0;
}

struct mode_table {
	struct mode_row r[MAX_MODE_ROWS];
	int n;
};

/* One of the layers bench_mode times: the mode's, or its token-choice twin's. */
struct mode_side {
	struct moe_desc d;
	const char *name;
	int training, wb, copies, have_gen;
	double params;
	struct gen g;
	struct moe_fwd_opts fo;
};

/* The bytes a side's copies and inputs need. */
static double side_need(const struct mode_side *sd, uint32_t T_max)
{
	return sd->params * (sd->wb * sd->copies + (sd->wb < 4 ? 4 : 0)) +
	       4.0 * T_max * sd->d.hidden * 4;
}

/* Time md's generated layer at each T, and its token-choice twin's (if it
 * has one) in the same repetitions, back to back: a mode and its twin see
 * the same moments of a shared machine, and each T's row of the mode says
 * its GFLOP/s as a share of the twin's over those moments. */
static void bench_mode(const struct mode *md, const struct opts *o, const struct machine *mc,
		       struct moe_pool *pool, const char *tmpdir, struct mode_table *tab)
{
	int ns = md->twin ? 2 : 1;
	struct mode_side *sd = calloc((size_t)ns, sizeof *sd);
	float *x = NULL, *y = NULL, *wts = NULL;
	int32_t *ids = NULL;
	int64_t *counts = NULL;
	char err[2048];
	if (!sd)
		return;
	uint32_t T_max = 0;
	for (int i = 0; i < o->n_tokens; i++)
		T_max = o->tokens[i] > T_max ? o->tokens[i] : T_max;
	/* Enough copies that the bytes one T = 1 forward nominally reads, times
	 * the copies, exceed four times the cache (as for the shapes); a mode
	 * and its twin alternate, so their reads add up. */
	double t1_bytes = 0;
	for (int i = 0; i < ns; i++) {
		struct mode_side *s = &sd[i];
		if (i)
			twin_desc(md, &s->d);
		else
			mode_desc(md, &s->d);
		s->name = i ? md->twin : md->name;
		s->training = i ? 0 : md->training;
		s->fo = (struct moe_fwd_opts){.training = s->training, .seed = SEED};
		s->wb = dtype_bytes(s->d.weight_dtype);
		s->params = mode_params(&s->d, s->training);
		double t1_touched =
		    s->d.mode == MOE_MODE_SOFT || s->d.mode == MOE_MODE_EXPERT_CHOICE
			? s->d.n_experts
			: s->d.top_k;
		t1_bytes += mode_bytes(&s->d, s->training, 1, t1_touched);
	}
	int copies = o->copies;
	if (!copies) {
		copies = (int)ceil(4.0 * (double)mc->llc / t1_bytes);
		copies = copies < 1 ? 1 : copies > MAX_COPIES ? MAX_COPIES : copies;
	}
	double need = 0;
	for (int i = 0; i < ns; i++) {
		struct mode_side *s = &sd[i];
		s->copies = copies;
		need += side_need(s, T_max);
		say("\n%s (%s%s): %s, H=%u, ", s->name, md->label, i ? ", token-choice twin" : "",
		    moe_mode_names[s->d.mode], s->d.hidden);
		if (s->d.mode == MOE_MODE_PRODUCT_KEY)
			say("N=%u^2, %u heads, top-%u, d=%u", md->R, PK_HEADS, PK_TOP_K,
			    PK_QUERY_DIM);
		else
			say("E=%u k=%u I=%u %s/%s", s->d.n_experts, s->d.top_k, s->d.intermediate,
			    moe_kind_names[s->d.kind], moe_act_names[s->d.act]);
		say(", %s weights %.2f GB%s\n", moe_dtype_names[s->d.weight_dtype],
		    s->params * s->wb * 1e-9, s->training ? ", training forward" : "");
	}
	/* moe_init_random draws f32 canonical weights before packing. Fewer
	 * copies where memory is short: a layer this large is far beyond the
	 * cache anyway. */
	double avail = mem_available();
	while (!o->copies && avail > 0 && need > 0.9 * avail) {
		int big = ns > 1 && sd[1].copies > sd[0].copies;
		if (sd[big].copies <= 1)
			break;
		need -= side_need(&sd[big], T_max);
		sd[big].copies--;
		need += side_need(&sd[big], T_max);
	}
	if (avail > 0 && need > 0.9 * avail) {
		say("  skipped: needs about %.1f GB, %.1f GB available\n", need * 1e-9,
		    avail * 1e-9);
		goto out;
	}
	for (int i = 0; i < ns; i++) {
		double t0 = moe_now();
		if (gen_open(&sd[i].d, tmpdir, o->threads, sd[i].copies, &sd[i].g, err,
			     sizeof err)) {
			say("  %s: generated: unavailable: %s\n", sd[i].name, err);
			goto out;
		}
		sd[i].have_gen = 1;
		say("  %s: compiled and initialized in %.1f s, %d weight cop%s\n", sd[i].name,
		    moe_now() - t0, sd[i].g.n_copies, sd[i].g.n_copies == 1 ? "y" : "ies");
	}
	const struct moe_desc *d = &sd[0].d;
	size_t W = moe_desc_route_width(d), E = d->n_experts;
	for (int i = 1; i < ns; i++) {
		size_t w = moe_desc_route_width(&sd[i].d);
		W = w > W ? w : W;
		E = sd[i].d.n_experts > E ? sd[i].d.n_experts : E;
	}
	x = malloc((size_t)T_max * d->hidden * sizeof *x);
	y = malloc((size_t)T_max * d->hidden * sizeof *y);
	counts = malloc(E * sizeof *counts);
	ids = malloc((size_t)T_max * (W ? W : 1) * sizeof *ids);
	wts = malloc((size_t)T_max * (W ? W : 1) * sizeof *wts);
	if (!x || !y || !counts || !ids || !wts) {
		say("  skipped: out of memory for the inputs\n");
		goto out;
	}
	/* Random tokens, uniform in [-1, 1): every router spreads them. */
	for (size_t i = 0; i < (size_t)T_max * d->hidden; i++)
		x[i] = 2 * urand(77, i / d->hidden, i % d->hidden) - 1;
	int printed_header = 0;
	for (int i = 0; i < o->n_tokens; i++) {
		uint32_t T = o->tokens[i];
		struct mode_ctx c[MAX_TIMED];
		struct timed tm[MAX_TIMED];
		struct mode_row *r[MAX_TIMED];
		if (tab->n + ns > MAX_MODE_ROWS)
			break;
		int ok = 1;
		for (int k = 0; k < ns; k++) {
			struct mode_side *s = &sd[k];
			/* Which experts ran and how many assignments, on an untimed
			 * call. */
			struct moe_routing rt = {.counts = counts};
			enum moe_status st = s->g.forward(s->g.m[0], 0, x, y, T, &rt, &s->fo);
			if (st != MOE_OK) {
				say("  %s T=%u: %s: %s\n", s->name, T, moe_status_name(st),
				    s->g.last_error());
				ok = 0;
				break;
			}
			double touched = 0, assigned = 0;
			for (size_t e = 0; e < s->d.n_experts; e++) {
				touched += counts[e] > 0;
				assigned += (double)counts[e];
			}
			c[k] = (struct mode_ctx){&s->g, x, y, T, &s->fo, err, sizeof err};
			r[k] = &tab->r[tab->n + k];
			*r[k] = (struct mode_row){
			    .mode = s->name,
			    .T = T,
			    .wt = s->d.weight_dtype,
			    .ms = -1,
			    .flops = mode_flops(&s->d, s->training, T, assigned),
			    .bytes = mode_bytes(&s->d, s->training, T, touched),
			    .touched = touched,
			    .assigned = assigned,
			    .fwd_ms = -1,
			    .route_ms = -1,
			    .experts_ms = -1,
			    .tp = -1,
			    .vs_twin = -1,
			};
			tm[k] = (struct timed){mode_run, &c[k], s->g.n_copies, mc->now, &r[k]->tp};
		}
		if (!ok)
			continue;
		tab->n += ns;
		snprintf(progress_item, sizeof progress_item, "(%s%s T=%u)", md->name,
			 ns > 1 ? " and its twin" : "", T);
		double med[MAX_TIMED], pair;
		time_medians(tm, ns, o->reps, med, &pair);
		for (int k = 0; k < ns; k++) {
			r[k]->ms = med[k] * 1e3;
			if (r[k]->ms < 0)
				say("  %s T=%u: %s\n", sd[k].name, T, err);
		}
		if (ns > 1 && pair > 0)
			r[0]->vs_twin = 100 * pair * r[0]->flops / r[1]->flops;
		if (d->mode == MOE_MODE_PRODUCT_KEY)
			pk_split(&sd[0].g, x, y, ids, wts, T, &sd[0].fo, pool, o->reps, r[0]);
		if (!printed_header++)
			print_mode_header(stdout);
		for (int k = 0; k < ns; k++)
			emit_mode_row(r[k], mc, stdout, NULL);
	}
	if (d->mode == MOE_MODE_PRODUCT_KEY) {
		/* The bandwidth bound: per token the gathers read 2 heads k H weight
		 * bytes; the query projection and the sub-keys are read once per
		 * forward (or per block of tokens, from cache). */
		double per_tok = 2.0 * PK_HEADS * PK_TOP_K * d->hidden * sd[0].wb;
		say("  gathers %.0f KiB per token: at %.1f GB/s at most %.0f tokens/s from "
		    "the gathers alone; query + keys %.1f MiB per forward\n",
		    per_tok / 1024, mc->dram_gbps, mc->dram_gbps * 1e9 / per_tok,
		    mode_router_bytes(d, 0) / (1 << 20));
	}
out:
	for (int i = 0; i < ns; i++)
		if (sd[i].have_gen)
			gen_close(&sd[i].g);
	free(x), free(y), free(ids), free(wts), free(counts);
	free(sd);
}

/* Measure the machine; keep the best of this and any earlier probe. */
static void probe(struct machine *mc, struct moe_pool *pool, int runs, size_t bw_bytes,
		  const char *when)
{
	double f8 = moe_probe_fma(pool, 8, runs), f16 = moe_probe_fma(pool, 16, runs);
	double bw = moe_probe_dram(pool, bw_bytes, runs);
	say("  probes %s: FMA peak f32 %.1f GFLOP/s (AVX2)", when, f8);
	if (f16 > 0)
		say(", %.1f GFLOP/s (AVX-512)", f16);
	say("; DRAM read %.1f GB/s (%zu MiB, best of %d)\n", bw, bw_bytes >> 20, runs);
	if (mc->n_probes < 2)
		mc->probes[mc->n_probes++] = (struct probe_run){when, f8, f16, bw};
	mc->runs = runs;
	mc->dram_bytes = bw_bytes;
	mc->fma8 = fmax(mc->fma8, f8);
	mc->fma16 = fmax(mc->fma16, f16);
	mc->peak_gflops = fmax(mc->fma8, mc->fma16);
	mc->dram_gbps = fmax(mc->dram_gbps, bw);
	fflush(stdout);
}

/* A measured value, or null (not measured: < 0 or not finite). */
static void json_num(cJSON *o, const char *key, double v)
{
	if (v < 0 || !isfinite(v))
		cJSON_AddNullToObject(o, key);
	else
		cJSON_AddNumberToObject(o, key, v);
}

/* The whole run as one JSON document (docs/benchmarks.md): the machine and
 * its best probes, each probe run, and every row with the columns of the
 * csv and the summary table. NULL when out of memory. */
static char *bench_json(const struct table *tab, const struct mode_table *mtab,
			const struct machine *mc)
{
	cJSON *doc = cJSON_CreateObject(), *m = cJSON_AddObjectToObject(doc, "machine");
	cJSON *probes = cJSON_AddArrayToObject(doc, "probes"),
	      *rows = cJSON_AddArrayToObject(doc, "rows");
	if (!doc || !m || !probes || !rows) {
		cJSON_Delete(doc);
		return NULL;
	}
	cJSON_AddStringToObject(doc, "moegen_version", MOE_VERSION);
	cJSON_AddStringToObject(m, "cpu", mc->cpu);
	cJSON_AddNumberToObject(m, "threads", mc->threads);
	cJSON_AddNumberToObject(m, "llc_bytes", (double)mc->llc);
	json_num(m, "fma_avx2_gflops", mc->fma8);
	json_num(m, "fma_avx512_gflops", mc->fma16 > 0 ? mc->fma16 : -1);
	json_num(m, "peak_gflops", mc->peak_gflops);
	json_num(m, "dram_gbps", mc->dram_gbps);
	for (int i = 0; i < mc->n_probes; i++) {
		const struct probe_run *p = &mc->probes[i];
		cJSON *o = cJSON_CreateObject();
		if (!o)
			break;
		cJSON_AddItemToArray(probes, o);
		cJSON_AddStringToObject(o, "when", p->when);
		json_num(o, "fma_avx2_gflops", p->fma8);
		json_num(o, "fma_avx512_gflops", p->fma16 > 0 ? p->fma16 : -1);
		json_num(o, "dram_gbps", p->dram_gbps);
		cJSON_AddNumberToObject(o, "dram_bytes", (double)mc->dram_bytes);
		cJSON_AddNumberToObject(o, "runs", mc->runs);
	}
	for (int i = 0; i < tab->n; i++) {
		const struct row *r = &tab->r[i];
		struct row_metrics k = row_metrics(r, mc);
		cJSON *o = cJSON_CreateObject();
		if (!o)
			break;
		cJSON_AddItemToArray(rows, o);
		cJSON_AddStringToObject(o, "shape", r->shape);
		cJSON_AddNumberToObject(o, "tokens", r->T);
		cJSON_AddStringToObject(o, "weights", r->wname);
		cJSON_AddStringToObject(o, "routing", routing_names[r->routing]);
		cJSON_AddNumberToObject(o, "flops", r->flops);
		cJSON_AddNumberToObject(o, "bytes", r->bytes);
		json_num(o, "ms", k.gms);
		json_num(o, "gflops", k.gf);
		json_num(o, "gbps", k.gb);
		json_num(o, "pct_peak_flops", k.pf);
		json_num(o, "pct_peak_bw", k.pb);
		json_num(o, "pct_now_bw", k.pn);
		json_num(o, "baseline_ms", k.bms);
		json_num(o, "baseline_gflops", k.bgf);
		json_num(o, "speedup", k.sp);
		json_num(o, "match", r->gen.ms >= 0 ? r->gen.match : r->base.match);
		json_num(o, "check", r->gen.check);
	}
	for (int i = 0; i < mtab->n; i++) {
		const struct mode_row *r = &mtab->r[i];
		double sec = r->ms * 1e-3;
		double gf = r->ms > 0 ? r->flops / sec * 1e-9 : -1,
		       gb = r->ms > 0 ? r->bytes / sec * 1e-9 : -1;
		cJSON *o = cJSON_CreateObject();
		if (!o)
			break;
		cJSON_AddItemToArray(rows, o);
		/* as in the csv: the mode in the shape column, routing "mode" */
		cJSON_AddStringToObject(o, "shape", r->mode);
		cJSON_AddNumberToObject(o, "tokens", r->T);
		cJSON_AddStringToObject(o, "weights", moe_dtype_names[r->wt]);
		cJSON_AddStringToObject(o, "routing", "mode");
		cJSON_AddNumberToObject(o, "flops", r->flops);
		cJSON_AddNumberToObject(o, "bytes", r->bytes);
		json_num(o, "ms", r->ms);
		json_num(o, "gflops", gf);
		json_num(o, "gbps", gb);
		json_num(o, "pct_peak_flops",
			 gf > 0 && mc->peak_gflops > 0 ? 100 * gf / mc->peak_gflops : -1);
		json_num(o, "pct_peak_bw",
			 gb > 0 && mc->dram_gbps > 0 ? 100 * gb / mc->dram_gbps : -1);
		json_num(o, "pct_now_bw", r->ms > 0 ? pct_now(r->bytes, r->tp) : -1);
		json_num(o, "tokens_per_s", r->ms > 0 ? r->T / sec : -1);
		cJSON_AddNumberToObject(o, "experts_touched", r->touched);
		json_num(o, "pct_of_twin", r->vs_twin);
	}
	char *text = cJSON_Print(doc);
	cJSON_Delete(doc);
	return text;
}

/* Expert parallelism ------------------------------------------------------ */

/* The number after `key` in line, or -1. */
static double after(const char *line, const char *key)
{
	const char *p = strstr(line, key);
	return p ? strtod(p + strlen(key), NULL) : -1;
}

/* `moegen bench --ep P`: each shape and token count as one layer over P MPI
 * ranks (`moegen run --ep` under mpirun, each rank with its share of the
 * cores), optionally through the simulated slow link; the slowest rank's
 * times, and how much of the link time the computation hid. */
static int bench_ep(const struct opts *o)
{
	char self[PATH_MAX], link_lib[PATH_MAX + 64], err[1024];
	ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
	if (n <= 0) {
		fprintf(stderr, "moegen: error: --ep: cannot find the moegen executable\n");
		return MOE_EXIT_IO;
	}
	self[n] = 0;
	if (o->link && moe_find_beside("libmoe_ep_slowlink.so", link_lib, sizeof link_lib)) {
		fprintf(stderr,
			"moegen: error: --link: libmoe_ep_slowlink.so is not next to moegen "
			"(it is built where MPI is found)\n");
		return MOE_EXIT_IO;
	}
	char tmpdir[] = "/tmp/moegen-bench-ep.XXXXXX";
	if (!mkdtemp(tmpdir)) {
		fprintf(stderr, "moegen: error: cannot create a temporary directory\n");
		return MOE_EXIT_IO;
	}
	long cores = sysconf(_SC_NPROCESSORS_ONLN);
	unsigned per = cores > 0 && (unsigned)cores > o->ep ? (unsigned)cores / o->ep : 1;
	unsigned chunks = o->chunks ? o->chunks : 4;
	printf("expert parallelism: %u ranks (mpirun), %u thread%s each, %u chunks, link %s\n",
	       o->ep, per, per == 1 ? "" : "s", chunks,
	       o->link ? o->link : "as MPI gives it (shared memory here)");
	printf("%-9s %5s %4s %10s %9s %9s %9s %10s %10s %7s\n", "shape", "T", "wt", "ms", "experts",
	       "wait", "MB/rank", "link_ms", "exposed", "overlap");
	int rc = MOE_EXIT_OK;
	for (size_t si = 0; si < N_SHAPES && rc == MOE_EXIT_OK; si++) {
		if (!o->shape_on[si])
			continue;
		for (int wf = 0; wf < N_WFMT && rc == MOE_EXIT_OK; wf++) {
			if (!o->fmt_on[wf])
				continue;
			struct moe_desc d;
			shape_desc(&shapes[si], &wfmts[wf], &d);
			char path[PATH_MAX + 128];
			snprintf(path, sizeof path, "%s/%s.so", tmpdir, d.name);
			struct moe_cpu_target t = {.cpu = "native", .opt_level = 3};
			if (moe_compile_cpu(&d, &t, MOE_EMIT_SO, path, err, sizeof err) != 0) {
				fprintf(stderr, "moegen: error: %s\n", err);
				rc = MOE_EXIT_BACKEND;
				break;
			}
			for (int ti = 0; ti < o->n_tokens; ti++) {
				char cmd[3 * PATH_MAX + 512];
				snprintf(
				    cmd, sizeof cmd,
				    "mpirun %s--oversubscribe -np %u %s%s%s%s %s run '%s' --ep "
				    "--tokens %u --chunks %u --threads %u --reps %d 2>&1",
				    geteuid() == 0 ? "--allow-run-as-root " : "", o->ep,
				    o->link ? "-x MOE_EP_LINK=" : "", o->link ? o->link : "",
				    o->link ? " -x LD_PRELOAD=" : "", o->link ? link_lib : "", self,
				    path, o->tokens[ti], chunks, per, o->reps ? o->reps : 5);
				FILE *f = popen(cmd, "r");
				if (!f) {
					fprintf(stderr, "moegen: error: cannot run mpirun\n");
					rc = MOE_EXIT_IO;
					break;
				}
				char line[1024];
				double fwd = -1, ex = -1, wait = -1, bytes = -1, busy = -1,
				       expo = -1, ov = -1;
				while (fgets(line, sizeof line, f)) {
					if (strstr(line, "ep: forward")) {
						fwd = after(line, "ep: forward ");
						ex = after(line, "experts ");
						wait = after(line, "exchange wait ");
					} else if (strstr(line, "ep: bytes exchanged")) {
						bytes = after(line, "ep: bytes exchanged ");
					} else if (strstr(line, "ep: simulated link")) {
						busy = after(line, "busy ");
						expo = after(line, "exposed ");
						ov = after(line, "overlap ");
					} else if (strstr(line, "error")) {
						fputs(line, stderr);
					}
				}
				int st = pclose(f);
				if (fwd < 0 || st != 0) {
					fprintf(stderr, "moegen: error: --ep: '%s' failed\n", cmd);
					rc = MOE_EXIT_BACKEND;
					break;
				}
				char c[4][32];
				fmt_num(c[0], 32, busy, "%.3f");
				fmt_num(c[1], 32, expo, "%.3f");
				fmt_num(c[2], 32, ov, "%.2f");
				fmt_num(c[3], 32, bytes >= 0 ? bytes / o->ep / 1e6 : -1, "%.2f");
				printf("%-9s %5u %4s %10.3f %9.3f %9.3f %9s %10s %10s %7s\n",
				       shapes[si].name, o->tokens[ti], wfmts[wf].name, fwd, ex,
				       wait, c[3], c[0], c[1], c[2]);
				fflush(stdout);
			}
			unlink(path);
		}
	}
	rmdir(tmpdir);
	return rc;
}

#endif /* MOE_HAVE_OPENBLAS */

int moe_cmd_bench(int argc, char **argv)
{
	struct opts o;
	int rc = parse_opts(argc, argv, &o);
	if (rc == -2)
		return MOE_EXIT_OK;
	if (rc)
		return rc;
#ifndef MOE_HAVE_OPENBLAS
	fprintf(stderr, "moegen: error: bench needs OpenBLAS (libopenblas-dev) for its baseline\n");
	return MOE_EXIT_USAGE;
#else
	if (o.ep)
		return bench_ep(&o);
	/* Fail on an unwritable --csv before the long run, not after it: the
	 * temporary beside it is created now and renamed over it at the end. */
	char csv_err[PATH_MAX + 256];
	struct moe_output csv_out, json_out;
	if (o.csv && moe_output_open(&csv_out, o.csv, NULL, 0, 0666, csv_err, sizeof csv_err)) {
		fprintf(stderr, "moegen: error: %s\n", csv_err);
		return MOE_EXIT_IO;
	}
	if (o.json && moe_output_open(&json_out, o.json, NULL, 0, 0666, csv_err, sizeof csv_err)) {
		fprintf(stderr, "moegen: error: %s\n", csv_err);
		if (o.csv)
			moe_output_abort(&csv_out);
		return MOE_EXIT_IO;
	}
	struct moe_pool *pool = moe_pool_create(o.threads);
	if (!pool) {
		fprintf(stderr, "moegen: error: cannot start %u threads\n", o.threads);
		if (o.csv)
			moe_output_abort(&csv_out);
		if (o.json)
			moe_output_abort(&json_out);
		return MOE_EXIT_BACKEND;
	}
	openblas_set_num_threads((int)o.threads);

	struct machine mc = {0};
	mc.threads = o.threads;
	cpu_model(mc.cpu, sizeof mc.cpu);
	/* the progress total: one step per timed measurement */
	size_t n_rt = (size_t)o.n_tokens * (size_t)(o.routing_on[0] + o.routing_on[1]);
	size_t n_dt = 0;
	for (int i = 0; i < N_WFMT; i++)
		n_dt += (size_t)o.fmt_on[i];
	for (size_t i = 0; i < N_SHAPES; i++)
		progress_total += o.shape_on[i] ? n_rt * (1 + (o.generated ? n_dt : 0)) : 0;
	for (size_t i = 0; i < N_MODES && o.generated; i++)
		progress_total += o.mode_on[i] ? (size_t)o.n_tokens : 0;
	moe_progress_begin(&progress, "bench");
	mc.llc = moe_probe_llc_bytes();
	int runs = o.quick ? 3 : 7;
	size_t bw_bytes = o.quick ? (size_t)256 << 20 : (size_t)1 << 30;
	say("moegen bench: %s, %u threads, last-level cache %zu MiB\n", mc.cpu, o.threads,
	    mc.llc >> 20);
	probe(&mc, pool, runs, bw_bytes, "at the start");
	mc.now = moe_dram_probe_open(pool, NOW_PROBE_BYTES);
	say("  baseline: per-expert cblas_sgemm (sgemv for one row), f32 weights\n");

	struct table *tab = calloc(1, sizeof *tab);
	struct mode_table *mtab = calloc(1, sizeof *mtab);
	char tmpdir[] = "/tmp/moegen-bench.XXXXXX";
	if (!tab || !mtab) {
		if (o.csv)
			moe_output_abort(&csv_out);
		if (o.json)
			moe_output_abort(&json_out);
		free(tab), free(mtab);
		moe_pool_destroy(pool);
		fprintf(stderr, "moegen: error: out of memory\n");
		return MOE_EXIT_BACKEND;
	}
	if (o.generated && !mkdtemp(tmpdir)) {
		fprintf(stderr, "moegen: error: cannot create a temporary directory: %s\n",
			strerror(errno));
		o.generated = 0;
	}
	for (size_t i = 0; i < N_SHAPES; i++)
		if (o.shape_on[i])
			bench_shape(&shapes[i], &o, &mc, pool, tmpdir, tab);
	for (size_t i = 0; i < N_MODES && o.generated; i++)
		if (o.mode_on[i])
			bench_mode(&modes[i], &o, &mc, pool, tmpdir, mtab);
	if (o.generated)
		rmdir(tmpdir);

	/* Probe again: on a shared machine the better of two moments is the
	 * closer estimate of the hardware's limits. */
	moe_dram_probe_close(mc.now);
	mc.now = NULL;
	probe(&mc, pool, runs, bw_bytes, "at the end");
	moe_pool_destroy(pool);
	moe_progress_end(&progress);
	say("\nSummary (%%peakF = GFLOP/s / %.1f, %%peakB = GB/s / %.1f, the better probes;\n"
	    "%%nowB = GB/s over the DRAM read just before each run, median; runs under %.0f ms):\n",
	    mc.peak_gflops, mc.dram_gbps, NOW_PROBE_MAX_S * 1e3);
	if (tab->n) {
		print_header(stdout);
		for (int i = 0; i < tab->n; i++)
			emit_row(&tab->r[i], &mc, stdout, NULL);
	}
	if (mtab->n) {
		say("\nResearch modes (generated layer only):\n");
		print_mode_header(stdout);
		for (int i = 0; i < mtab->n; i++)
			emit_mode_row(&mtab->r[i], &mc, stdout, NULL);
	}

	rc = MOE_EXIT_OK;
	if (o.csv) {
		FILE *csv = moe_output_stream(&csv_out);
		if (csv) {
			fprintf(csv, "shape,tokens,weights,routing,ms,gflops,gbps,pct_peak_flops,"
				     "pct_peak_bw,baseline_ms,speedup,pct_now_bw,pct_of_twin\n");
			for (int i = 0; i < tab->n; i++)
				emit_row(&tab->r[i], &mc, NULL, csv);
			for (int i = 0; i < mtab->n; i++)
				emit_mode_row(&mtab->r[i], &mc, NULL, csv);
		}
		if (!csv || moe_output_commit(&csv_out, csv_err, sizeof csv_err) != 0) {
			fprintf(stderr, "moegen: error: %s\n",
				csv ? csv_err : "cannot write the --csv file");
			moe_output_abort(&csv_out);
			rc = MOE_EXIT_IO;
		}
	}
	if (o.json) {
		char *text = bench_json(tab, mtab, &mc);
		FILE *js = text ? moe_output_stream(&json_out) : NULL;
		if (js)
			fprintf(js, "%s\n", text);
		free(text);
		if (!js || moe_output_commit(&json_out, csv_err, sizeof csv_err) != 0) {
			fprintf(stderr, "moegen: error: %s\n",
				js ? csv_err : "cannot write the --json file");
			moe_output_abort(&json_out);
			rc = MOE_EXIT_IO;
		}
	}
	free(tab);
	free(mtab);
	return rc;
#endif
}
